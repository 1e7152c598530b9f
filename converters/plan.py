"""A plan maps a checkpoint's tensors onto the runtime's, one target tensor at a time.

Each source format has a function `plan(source) -> Plan` that looks only at names and shapes. Executing
a plan loads just the sources of one target, combines them, and yields the result, so loading and
converting never hold more than a few tensors beyond what they keep.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from mflux.errors import MfluxError


@dataclass(frozen=True)
class Target:
    name: str  # the runtime's tensor name
    sources: tuple[str, ...]  # checkpoint tensor names
    combine: Callable | None = None  # list of source arrays -> array; None takes the one source as is


@dataclass
class Plan:
    targets: list[Target]
    ignored: set[str] = field(default_factory=set)  # source keys dropped on purpose (buffers, tied copies)

    def unmapped(self, keys: Sequence[str]) -> list[str]:
        used = {s for t in self.targets for s in t.sources} | self.ignored
        return sorted(k for k in keys if k not in used)

    def check(self, keys: Sequence[str], what: str) -> None:
        """Refuse a checkpoint with tensors nobody maps, naming the first few."""
        extra = self.unmapped(keys)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise MfluxError(f"{what}: {len(extra)} tensors match nothing in FLUX.1: {shown}")
        missing = sorted({s for t in self.targets for s in t.sources} - set(keys))
        if missing:
            raise MfluxError(f"{what}: missing tensor {missing[0]} (is this a complete FLUX.1 checkpoint?)")


def concat(axis: int = 0) -> Callable:
    import mlx.core as mx

    return lambda arrays: mx.concatenate(arrays, axis=axis)


def execute(plan: Plan, source, dtype=None) -> Iterator[tuple]:
    """Yield (runtime name, mx.array) for each target, cast to `dtype` if given (floats only)."""
    for t in plan.targets:
        arrays = [source.load(s) for s in t.sources]
        arr = t.combine(arrays) if t.combine else arrays[0]
        if dtype is not None and arr.dtype != dtype and _is_float(arr.dtype):
            arr = arr.astype(dtype)
        yield t.name, arr


def _is_float(dtype) -> bool:
    import mlx.core as mx

    return mx.issubdtype(dtype, mx.floating)
