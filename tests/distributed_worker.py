"""One rank of a test under `mlx.launch` (tests/test_distributed.py starts it); writes what it saw to
OUT/rank<r>.json for the test to read, since mlx.launch's exit code says little.

    python -m tests.distributed_worker transformer OUT       a tiny random transformer, 2 images, 2 steps,
                                                             sharded and not: latents and bytes sent
    python -m tests.distributed_worker training OUT          three optimizer steps, the batch split over
                                                             the ranks and not: the parameters
    python -m tests.distributed_worker sigterm OUT ARGS...   `mflux run ARGS` where rank 1 is sent SIGTERM
                                                             right after writing its first image
    python -m tests.distributed_worker ctrl-c OUT ARGS...    `mflux train ARGS` where rank 1 alone is sent
                                                             SIGINT after step 2
    python -m tests.distributed_worker encode-fails OUT ARGS...  `mflux train ARGS` where rank 0 fails while
                                                             rank 1 waits for the encodings
"""

import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx


def transformer(out: Path) -> None:
    from mflux.distributed import agree
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
    # two images in one batch, as seeds or true CFG's halves make rows
    txt, pooled = mx.random.normal((2, S, 64)), mx.random.normal((2, 64))
    noise = mx.concatenate([sampler.noise(3, height, width), sampler.noise(4, height, width)])
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
        "step_bytes": sp.step_bytes(2, S, L, params.hidden_size, 64, blocks, 4),
        "steps": len(sigmas) - 1,
        "collectives": collectives(group),
        "agreed": agree(group, [2**64 - 1, 12345678901234567890, group.rank()]),
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


def training(out: Path) -> None:
    """Three Adam steps on a small model with a global batch of 4 rows: split over the ranks with the
    gradients averaged, and whole in this one process."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mflux.runtime.parallel import average_gradients

    group = mx.distributed.init(strict=True)
    rows = 4 // group.size()
    mx.random.seed(1)
    x, y = mx.random.normal((3, 4, 8)), mx.random.normal((3, 4, 2))  # 3 steps of 4 rows

    def train(shard: bool):
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
        opt = optim.Adam(learning_rate=0.05)
        grad = nn.value_and_grad(model, lambda m, a, b: nn.losses.mse_loss(m(a), b, reduction="mean"))
        for step in range(3):
            a, b = x[step], y[step]
            if shard:  # this rank's rows of the global batch
                mine = slice(group.rank() * rows, (group.rank() + 1) * rows)
                a, b = a[mine], b[mine]
            _, g = grad(model, a, b)
            if shard:
                g = average_gradients(g, group)
            opt.update(model, g)
            mx.eval(model.parameters(), opt.state)
        return dict(tree_flatten(model.parameters()))

    whole, split = train(False), train(True)
    diff = max(mx.abs(whole[k] - split[k]).max().item() for k in whole)
    (out / f"rank{group.rank()}.json").write_text(json.dumps({"rank": group.rank(), "max_abs_diff": diff}))


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


def ctrl_c(args: list[str]) -> None:
    """`mflux train` with a Ctrl-C that reaches rank 1 alone, after step 2: every rank must stop there.
    Rank 1 is given a --data folder that does not exist, since it must never read the data."""
    from mflux.cli import cli
    from mflux.train import trainer

    if os.environ.get("MLX_RANK") == "1":
        args = [a if a != args[args.index("--data") + 1] else "/nonexistent/data" for a in args]

    train = trainer.train

    def interrupted_on_rank_1(*a, **kw):
        def on_step(step, loss):
            if step == 2 and os.environ.get("MLX_RANK") == "1":
                os.kill(os.getpid(), signal.SIGINT)

        return train(*a, on_step=on_step, **kw)

    trainer.train = interrupted_on_rank_1  # the command imports it when it runs
    cli.main(["train", *args], standalone_mode=True)


def encode_fails(args: list[str]) -> None:
    """`mflux train` where rank 0 fails as it encodes (as a full disk does), while rank 1 waits for it."""
    from mflux.cli import cli
    from mflux.errors import MfluxError
    from mflux.train.trainer import Trainer

    def fail(self):
        raise MfluxError("the disk is full (the test's)")

    Trainer.encode = fail  # only rank 0 encodes
    cli.main(["train", *args], standalone_mode=True)


if __name__ == "__main__":
    what, where = sys.argv[1], Path(sys.argv[2])
    if what == "transformer":
        transformer(where)
    elif what == "training":
        training(where)
    elif what == "ctrl-c":
        ctrl_c(sys.argv[3:])
    elif what == "encode-fails":
        encode_fails(sys.argv[3:])
    else:
        sigterm(where, sys.argv[3:])
