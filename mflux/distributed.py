"""Several processes started by `mlx.launch`: which rank this is, which images it owes, what it prints.

`mlx.launch -n 2 -- mflux run ...` starts the same command once per rank; `mx.distributed.init()` then
joins them into one group (ring over TCP, MPI, NCCL on CUDA, Thunderbolt RDMA on Macs, whichever the
launcher set up). Started without a launcher, the group has one rank and nothing here changes a run.

- data parallel: every rank makes every size-th image (mflux.runtime.parallel.shard_rows);
- sequence parallel: every rank takes part in every image, rank 0 writes it;
- training (mflux.train): every rank takes its rows of each step's batch, the gradients are averaged,
  and rank 0 alone reads the data, the cache and a checkpoint (`share`, `broadcast`) and writes.

When a rank fails, mlx.launch sends SIGTERM to the others and may still exit 0, so each rank says on
SIGTERM which images it still owed; a user (or a test) reads that, not the exit code.
"""

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from mflux.errors import MfluxError, ReportedElsewhere

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


def total(group, count: int, hint: str = "its messages say why") -> int:
    """The sum of every rank's `count`; one clear error, ending in `hint`, when a rank has gone."""
    import mlx.core as mx

    if group.size() == 1:
        return count
    with lost_peer(group, hint):
        return int(mx.distributed.all_sum(mx.array([count], dtype=mx.int64), group=group).item())


@contextlib.contextmanager
def lost_peer(group, hint: str):
    """A collective that fails because another rank has gone: one line naming this rank, not a
    traceback. In one process an error passes through unchanged."""
    try:
        yield
    except RuntimeError as e:
        if group.size() == 1:
            raise
        raise MfluxError(f"rank {group.rank()}: another rank stopped before the end ({e}); {hint}") from None


def settle(group, error: MfluxError | None) -> None:
    """After each rank's own checks, before any work: every rank stops when one refused, and the reason
    is said once. Rank 0's error is the one raised when it has one (the others' are then the same
    checks failing alike, or come second); else each rank that refused raises its own. The rest raise
    ReportedElsewhere, which the CLI does not print. Without a launcher: raises `error`, if any."""
    import mlx.core as mx

    if group.size() == 1:
        if error is not None:
            raise error
        return
    mine = int(error is not None)
    with lost_peer(group, "its messages say why"):
        votes = [mine if group.rank() == 0 else 0, mine]
        lead, failed = mx.distributed.all_sum(mx.array(votes, dtype=mx.int64), group=group).tolist()
    if error is not None and (group.rank() == 0 or not lead):
        raise error
    if failed:
        raise ReportedElsewhere(f"rank {group.rank()}: another rank refused the run (its error says why)")


def broadcast(group, arrays: dict) -> dict:
    """Rank 0's values for `arrays` on every rank; every rank passes the same names, shapes and dtypes.

    An all_sum to which the other ranks add zeros, so the values arrive exact: floating arrays travel
    as float32, integers as int64 (what every backend sums), then are cast back. Rank 0 keeps its own."""
    import mlx.core as mx

    from mflux.runtime.parallel import all_sum_arrays

    if group.size() == 1:
        return arrays
    mine = {k: v if group.rank() == 0 else mx.zeros_like(v) for k, v in arrays.items()}
    out = {}
    for wide, floating in ((mx.float32, True), (mx.int64, False)):
        names = sorted(k for k, v in mine.items() if mx.issubdtype(v.dtype, mx.floating) == floating)
        if names:
            out |= zip(names, all_sum_arrays([mine[k] for k in names], group, wide))
    with lost_peer(group, "its messages say why"):
        mx.eval(out)  # rank 0 too: a collective nobody evaluates never runs, and the others would wait
    return arrays if group.rank() == 0 else out


def share(group, arrays: dict | None) -> dict:
    """Rank 0's `arrays` on every rank, where the others do not know their names or shapes (they pass
    None): those first, as JSON through `agree`, then the values through `broadcast`."""
    import mlx.core as mx

    if group.size() == 1:
        return arrays
    spec = b""
    if group.rank() == 0:
        spec = json.dumps({k: [list(v.shape), str(v.dtype).split(".")[-1]] for k, v in arrays.items()})
        spec = spec.encode()
    with lost_peer(group, "its messages say why"):  # the others wait here while rank 0 encodes
        (length,) = agree(group, [len(spec)])
        spec = bytes(agree(group, list(spec) or [0] * length))
    if group.rank() != 0:
        arrays = {k: mx.zeros(shape, getattr(mx, dtype)) for k, (shape, dtype) in json.loads(spec).items()}
    return broadcast(group, arrays)
