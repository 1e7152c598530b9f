"""Several processes started by `mlx.launch`: which rank this is, which images it owes, what it prints.

`mlx.launch -n 2 -- mflux run ...` starts the same command once per rank; `mx.distributed.init()` then
joins them into one group (ring over TCP, MPI, NCCL on CUDA, Thunderbolt RDMA on Macs, whichever the
launcher set up). Started without a launcher, the group has one rank and nothing here changes a run.

- data parallel: every rank makes every size-th image (mflux.runtime.parallel.shard_rows);
- sequence parallel: every rank takes part in every image, rank 0 writes it.

When a rank fails, mlx.launch sends SIGTERM to the others and may still exit 0, so each rank says on
SIGTERM which images it still owed; a user (or a test) reads that, not the exit code.
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

from mflux.errors import MfluxError

PARALLEL_MODES = ("data", "sequence")


def world():
    """This process's `mx.distributed` group: one rank when not started by mlx.launch."""
    import mlx.core as mx

    return mx.distributed.init()


def agree(group, values: list[int]) -> list[int]:
    """Rank 0's `values` (integers in 0..2**64-1, such as seeds drawn at random) on every rank.

    An all_sum to which only rank 0 adds anything: every backend has all_sum (early NCCL builds had
    nothing else). MLX has no 64-bit unsigned array from Python beyond 2**63, so each value travels as
    two 32-bit halves in int64."""
    import mlx.core as mx

    if group.size() == 1:
        return list(values)
    halves = [[v >> 32, v & 0xFFFFFFFF] if group.rank() == 0 else [0, 0] for v in values]
    summed = mx.distributed.all_sum(mx.array(halves, dtype=mx.int64).reshape(-1, 2), group=group)
    return [(int(hi) << 32) | int(lo) for hi, lo in summed.tolist()]


class Owed:
    """The files this rank has still to write. Inside `with`, SIGTERM prints them on stderr and exits
    at once (128 + 15), as a process killed by the signal would, but saying what is missing."""

    def __init__(self, rank: int, paths: list[Path]):
        self.rank = rank
        self.left = dict.fromkeys(paths)
        self._writing = self._pending = False

    @contextlib.contextmanager
    def writing(self, path: Path):
        """Write `path` inside: a SIGTERM meanwhile waits until it is written and crossed off, so the
        list printed is exactly the files missing."""
        self._writing = True
        try:
            yield
            self.left.pop(path, None)
        finally:
            self._writing = False
        if self._pending:
            self._stop(signal.SIGTERM, None)

    def __enter__(self) -> "Owed":
        self._previous = signal.signal(signal.SIGTERM, self._stop)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _stop(self, signum, frame) -> None:
        if self._writing:
            self._pending = True
            return
        left = ", ".join(str(p) for p in self.left) or "none"
        # os.write, not print: the handler may run while the main thread is inside a print; the
        # newline first ends a progress line
        os.write(
            sys.stderr.fileno(), f"\nrank {self.rank}: stopped by SIGTERM; not written: {left}\n".encode()
        )
        os._exit(128 + signum)


def total(group, count: int) -> int:
    """The sum of every rank's `count`; one clear error when a rank has gone (its own message says why)."""
    import mlx.core as mx

    if group.size() == 1:
        return count
    try:
        return int(mx.distributed.all_sum(mx.array([count], dtype=mx.int64), group=group).item())
    except RuntimeError as e:
        raise MfluxError(
            f"rank {group.rank()}: another rank stopped before the end ({e}); its messages say which "
            "images it did not write"
        ) from None
