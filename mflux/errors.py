class MfluxError(Exception):
    """A problem the user can fix. The CLI prints it as one line, without a traceback."""


class InvalidArgument(MfluxError, ValueError):
    """A bad argument to the Python API or a CLI flag."""


class Interrupted(MfluxError):
    """Ctrl-C, with a message saying what was kept; the CLI exits 130, as a shell does for SIGINT."""


class ReportedElsewhere(MfluxError):
    """Under mlx.launch: another rank refused the run and printed why. The CLI exits 1 without a line of
    its own, so a refusal every rank makes reads as one line, not one per rank."""


class CtrlC(KeyboardInterrupt):
    """Ctrl-C, as the `mflux` command's SIGINT handler raises it. CPython marks a plain KeyboardInterrupt
    that leaves string-compiled code (the methods a dataclass or namedtuple makes, at a lazy import) as
    unhandled, however it is caught later, and `python -m mflux` then kills itself with SIGINT (-2)
    after printing `error: interrupted` and exiting 130. It checks the exact type: a subclass is not
    marked."""
