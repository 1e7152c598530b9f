class MfluxError(Exception):
    """A problem the user can fix. The CLI prints it as one line, without a traceback."""


class InvalidArgument(MfluxError, ValueError):
    """A bad argument to the Python API or a CLI flag."""
