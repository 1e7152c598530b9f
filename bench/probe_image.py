"""How far runtime.kernels move a whole image (issue 12): one schnell generation from the same noise and
conditioning, with the transformer's glue as CUDA kernels (the default there since round 10) and as MLX's
ops (round 9's path: `nn.gelu_approx` rounded to bf16 at each step), each against the same generation
at float32.

    python bench/probe_image.py [--size full|tiny] [--steps 4] [--seed 0]

Random weights of the real architecture (bench_flux.build), random text embeddings. The decoder runs at
float32 for every way, so the differences are the transformer's alone. Prints JSON lines:
- `image`: each way's generation time and its pixels' range;
- `image_diff`: each pair (`a` against `b`): the pixels' largest and mean difference in 1/255 steps, the
  share of 8-bit values that differ, and the final latents' relative L2 distance (random weights can
  push pixels into the clip at 0 or 1, where a difference no longer shows: the latents still show it).
Off CUDA the kernels don't run, and only the ops and float32 ways are compared.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
from bench_flux import SIZES, _pixel_diff, build, free, report  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mflux.runtime import engine, kernels, sampler  # noqa: E402
from mflux.runtime.device import backend  # noqa: E402


def generate(flux, vae, cond: dict, sigmas: list[float], res: int, dtype) -> tuple[mx.array, mx.array, float]:
    """Final latents (float32) and the image in [0, 1] (float32), with the denoise's seconds."""
    mods = engine.modulations(flux, cond["y"].astype(dtype), sigmas, None)
    latents = cond["noise"].astype(dtype)
    t = time.perf_counter()
    for step in engine.denoise(flux, cond["txt"].astype(dtype), latents, sigmas, res, res, mods):
        mx.eval(step)
        latents = step
    seconds = time.perf_counter() - t
    z = vae.unscale(sampler.unpack(latents.astype(mx.float32), res, res))
    image = mx.clip(vae.decode(z) / 2 + 0.5, 0, 1)
    mx.eval(image)
    return latents.astype(mx.float32), image, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    res = size.res
    mx.random.seed(args.seed)
    vae = build("vae", size, mx.float32, None)
    flux = build("transformer", size, mx.bfloat16, None, "schnell")
    p = flux.params
    cond = {
        "noise": sampler.noise(args.seed, res, res),
        "txt": mx.random.normal((1, size.txt["schnell"], p.context_in_dim)),
        "y": mx.random.normal((1, p.vec_in_dim)),
    }
    mx.eval(cond)
    sigmas = engine.schedule(args.steps, (res // 16) ** 2, None)
    runs = {}
    ways = ["kernels", "ops"] if backend() == "cuda" else ["ops"]
    default = kernels.USE[backend()]
    for way in ways:
        kernels.USE[backend()] = way == "kernels"
        try:
            runs[way] = generate(flux, vae, cond, sigmas, res, mx.bfloat16)
        finally:
            kernels.USE[backend()] = default
    flux.update(tree_map(lambda a: a.astype(mx.float32), flux.parameters()))
    free()
    runs["float32"] = generate(flux, vae, cond, sigmas, res, mx.float32)
    for way, (_, image, seconds) in runs.items():
        report(
            what="image",
            way=way,
            res=res,
            steps=args.steps,
            denoise_s=seconds,
            min=image.min().item(),
            max=image.max().item(),
            clipped=((image == 0) | (image == 1)).mean().item(),
        )
    pairs = [(a, b) for i, a in enumerate(runs) for b in list(runs)[i + 1 :]]
    for a, b in pairs:
        la, lb = runs[a][0], runs[b][0]
        rel = (mx.linalg.norm((la - lb).reshape(-1)) / mx.linalg.norm(lb.reshape(-1))).item()
        report(
            what="image_diff", a=a, b=b, res=res, latents_rel_l2=rel, **_pixel_diff(runs[a][1], runs[b][1])
        )


if __name__ == "__main__":
    main()
