class MfluxError(Exception):
    """A problem the user can fix. The CLI prints it as one line, without a traceback."""


class InvalidArgument(MfluxError, ValueError):
    """A bad argument to the Python API or a CLI flag."""


class Interrupted(MfluxError):
    """Ctrl-C, with a message saying what was kept; the CLI exits 130, as a shell does for SIGINT."""
