"""Sequence parallelism: one transformer step spread over the ranks of `mlx.launch`, on random weights.

    python bench/parallel.py --size mid                                 # one process: the plain step
    mlx.launch -n 2 --backend ring -- python bench/parallel.py --size mid
    mlx.launch -n 4 --backend nccl -- python bench/parallel.py --size full --dtype bfloat16   # 4 GPUs
    python bench/parallel.py --size full --ranks 2 4 8 --volume-only     # bytes only, no compute

Rank 0 prints one JSON line: the median step time over the ranks (the slowest rank's time per step),
the bytes each rank passed to all_gather per step (counted, and computed from the shapes), and the
largest difference from the unsharded step, run once untimed on every rank.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from mflux.runtime import sampler
from mflux.runtime.model import Flux, FluxParams
from mflux.runtime.parallel import SequenceParallel

# (hidden, heads, double blocks, single blocks, image side, text tokens); mid is the other benchmarks' mid
SIZES = {
    "tiny": (128, 2, 1, 1, 64, 16),
    "mid": (512, 4, 2, 4, 256, 64),
    "mid1024": (512, 4, 2, 4, 1024, 256),  # mid's blocks on a 1024 px image: attention dominates
    "full": (3072, 24, 19, 38, 1024, 512),
}


class _Ranks:
    """A stand-in group for --volume-only: the shapes' count needs only the rank count."""

    def __init__(self, n: int):
        self.n = n

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return self.n


def params(size: str) -> FluxParams:
    hidden, heads, depth, single, _, _ = SIZES[size]
    head = hidden // heads
    axis = 2 * round(head * 56 / 128 / 2)
    return FluxParams(64, hidden, heads, depth, single, (head - 2 * axis, axis, axis), 4096, 768, False)


def volume(size: str, ranks: int, itemsize: int) -> dict:
    p = params(size)
    side, S = SIZES[size][4], SIZES[size][5]
    L = (side // 16) ** 2
    per_rank = SequenceParallel(_Ranks(ranks)).step_bytes(
        1, S, L, p.hidden_size, 64, p.depth + p.depth_single_blocks, itemsize
    )
    per_rank = per_rank if ranks > 1 else 0
    # a ring all_gather brings every other rank's shard through each rank: (N - 1) times its own
    return {
        "size": size,
        "ranks": ranks,
        "text": S,
        "image": L,
        "itemsize": itemsize,
        "sent_per_rank_step_bytes": per_rank,
        "received_per_rank_step_bytes": (ranks - 1) * per_rank,
    }


def run(size: str, steps: int, dtype) -> dict:
    group = mx.distributed.init()
    mx.random.seed(0)  # the same weights and inputs on every rank
    p = params(size)
    flux = Flux(p)
    flux.set_dtype(dtype)
    side, S = SIZES[size][4], SIZES[size][5]
    L = (side // 16) ** 2
    img = mx.random.normal((1, L, 64)).astype(dtype)
    txt = mx.random.normal((1, S, 4096)).astype(dtype)
    y = mx.random.normal((1, 768)).astype(dtype)
    pe = flux.positions(
        mx.broadcast_to(sampler.image_ids(side, side), (1, L, 3)),
        mx.broadcast_to(sampler.text_ids(S), (1, S, 3)),
    )
    mod = flux.block_modulations(flux.conditioning(mx.array([1.0]), y))
    mx.eval(flux.parameters(), img, txt, pe, mod)
    sp = SequenceParallel(group) if group.size() > 1 else None
    alone = flux.predict(img, txt, pe, mod)
    out = flux.predict(img, txt, pe, mod, sp)
    mx.eval(alone, out)
    diff = mx.abs(alone.astype(mx.float32) - out.astype(mx.float32)).max().item()
    sent = sp.sent_bytes if sp else 0
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        mx.eval(flux.predict(img, txt, pe, mod, sp))
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    if sp:  # the step is as slow as its slowest rank
        step = mx.distributed.all_gather(mx.array([step]), group=group).max().item()
    return {
        **volume(size, group.size(), mx.zeros((), dtype).itemsize),
        "dtype": str(dtype),
        "step_s": round(step, 4),
        "max_abs_diff": diff,
        "counted_sent_bytes": sent,
        "rank": group.rank(),
    }


def main() -> None:
    first, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=SIZES, default="mid")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--volume-only", action="store_true", help="print the bytes per step for --ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    if args.volume_only:
        for n in args.ranks:
            print(json.dumps(volume(args.size, n, 2 if args.dtype == "bfloat16" else 4)))
        return
    result = run(args.size, args.steps, getattr(mx, args.dtype))
    if result["rank"] == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
