"""One rank of a test under `mlx.launch` (tests/test_distributed.py starts it); writes what it saw to
OUT/rank<r>.json for the test to read, since mlx.launch's exit code says little.

    python -m tests.distributed_worker transformer OUT       a tiny random transformer, 2 Euler steps,
                                                             sharded and not: latents and bytes sent
    python -m tests.distributed_worker sigterm OUT ARGS...   `mflux run ARGS` where rank 1 is sent SIGTERM
                                                             right after writing its first image
"""

import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx


def transformer(out: Path) -> None:
    from mflux.runtime import engine, sampler
    from mflux.runtime.model import Flux, FluxParams
    from mflux.runtime.parallel import SequenceParallel

    group = mx.distributed.init(strict=True)
    mx.random.seed(0)  # the same weights and inputs on every rank
    params = FluxParams(
        in_channels=64,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 14, 14),
        context_in_dim=64,
        vec_in_dim=64,
        guidance_embed=False,
    )
    flux = Flux(params)
    mx.eval(flux.parameters())
    # 7 text tokens and a 32x80 image (10 tokens): neither divides by 2 or 3 ranks both ways
    height, width, S = 32, 80, 7
    txt, pooled = mx.random.normal((1, S, 64)), mx.random.normal((1, 64))
    noise = sampler.noise(3, height, width)
    sigmas = engine.schedule(2, (height // 16) * (width // 16), None)
    mods = engine.modulations(flux, pooled, sigmas, None)

    def latents(sp):
        *_, x = engine.denoise(flux, txt, noise, sigmas, height, width, mods, sp=sp)
        mx.eval(x)
        return x

    sp = SequenceParallel(group)
    alone, sharded = latents(None), latents(sp)
    L = noise.shape[1]
    blocks = params.depth + params.depth_single_blocks
    result = {
        "rank": group.rank(),
        "size": group.size(),
        "max_abs_diff": mx.abs(alone - sharded).max().item(),
        "sent_bytes": sp.sent_bytes,
        "step_bytes": sp.step_bytes(1, S, L, params.hidden_size, 64, blocks, 4),
        "steps": len(sigmas) - 1,
        "collectives": collectives(group),
    }
    (out / f"rank{group.rank()}.json").write_text(json.dumps(result))


def collectives(group) -> dict:
    """Which of MLX's collectives this backend runs: True, or the error it raises."""
    x = mx.ones((group.size() * 2,))  # sum_scatter needs a first axis that divides by the ranks
    found = {}
    for name in ("all_sum", "all_gather", "all_max", "sum_scatter"):
        try:
            mx.eval(getattr(mx.distributed, name)(x, group=group))
            found[name] = True
        except RuntimeError as e:
            found[name] = str(e)
    return found


def sigterm(out: Path, args: list[str]) -> None:
    """`mflux run` with rank 1 stopped by SIGTERM after its first image, as mlx.launch stops the ranks
    that are left when one fails."""
    from mflux.cli import cli
    from mflux.flux1 import GeneratedImage

    save = GeneratedImage.save

    def save_then_stop(self, *a, **kw):
        path = save(self, *a, **kw)
        if os.environ.get("MLX_RANK") == "1":
            os.kill(os.getpid(), signal.SIGTERM)
        return path

    GeneratedImage.save = save_then_stop
    cli.main(["run", *args], standalone_mode=True)


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2])
    if what == "transformer":
        transformer(where)
    else:
        sigterm(where, sys.argv[3:])
