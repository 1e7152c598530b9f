"""The `mflux` command's entry, for the console script and `python -m mflux` alike. It imports nothing
heavy, so its SIGINT handler is in place before click and the CLI's modules load (most of the start-up):
Ctrl-C is `error: interrupted` and exit 130 from the first moment, however often it is pressed."""

import signal
import sys

from mflux.errors import CtrlC
from mflux.runtime import trace  # noqa: F401 - early: where there is no /proc, MFLUX_TRACE counts from here


def main() -> None:
    """The process's whole life as the `mflux` command; it ends in SystemExit."""
    signal.signal(signal.SIGINT, _ctrl_c)
    try:
        from mflux.cli import main as command

        command()
    except KeyboardInterrupt:  # while the CLI's modules load, or while another error was being reported
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
    finally:
        # The exit code is decided; a later press is ignored. A command that finished its work and printed
        # its result exits 0: nothing was cut short, and a script may go on to use what it made (130 would
        # say it may not). Left to Python, a press in an atexit callback printed a traceback, and one after
        # Py_Finalize put back SIGINT's default action killed the process (-2).
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:  # pressed just before: its handler ignored the rest, the exit stands
            pass


def _ctrl_c(signum, frame):
    # Later presses are ignored, to the end of the process: the cleanup and its one line are never cut
    # short by a traceback, nor the exit 130 by the default action restored at interpreter shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise CtrlC


if __name__ == "__main__":
    main()
