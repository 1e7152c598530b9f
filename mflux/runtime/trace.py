"""MFLUX_TRACE=1: one line on stderr the first time each phase is reached (first weight read, weights
ready, prompts encoded, first step, image written), with the seconds since the interpreter started, so a
benchmark that times the whole process from outside can see inside it.

On Linux the process's start comes from /proc; elsewhere the clock starts when this module is imported,
which `mflux/__main__.py` does first (the interpreter's own start-up, some tens of ms, is then missed)."""

import os
import sys
import time

_IMPORTED = time.monotonic()
_origin: float | None = None  # the process's start on the monotonic clock, found at the first mark
_seen: set[str] = set()


def mark(phase: str) -> None:
    """Print `phase` and the seconds since the process started, once per process, under MFLUX_TRACE=1."""
    global _origin
    if os.environ.get("MFLUX_TRACE") != "1" or phase in _seen:
        return
    _seen.add(phase)
    now = time.monotonic()
    if _origin is None:
        age = _process_age()
        _origin = _IMPORTED if age is None else now - age
    print(f"mflux trace: {now - _origin:.3f}s {phase}", file=sys.stderr, flush=True)


def _process_age() -> float | None:
    """Seconds since this process started: the system's uptime less the process's start time, both in
    /proc (10 ms steps); None where there is no /proc."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        # field 22, starttime in clock ticks since boot; counted after the ")" that closes the command name
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
