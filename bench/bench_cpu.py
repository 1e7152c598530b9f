"""mflux against diffusers on a CPU: one mid-size FLUX.1 transformer, the same weights, the same shapes.

diffusers' FluxTransformer2DModel is built at bench_flux.py's `mid` size with random weights, saved,
and loaded into mflux through the loader's diffusers path, so both run one network on the same inputs
(their outputs are compared too). Each step is timed as a generation runs it: diffusers' forward, and
mflux's `predict` with the modulations computed once (its `__call__`, which computes them every step,
is timed too). float32, the fast precision of both on a CPU.

MLX's CPU wheel ships a slow reference BLAS, and Debian's OpenBLAS makes it fast when preloaded
(README.md), but the same preload slows PyTorch down many times. So each runs in its own process:
diffusers as installed, mflux as installed and, if the library is there, with OpenBLAS preloaded.

    python bench/bench_cpu.py
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_flux import SIZES  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
SIZE = SIZES["mid"]
CONFIG = {**SIZE.flux, "guidance_embeds": False}
TXT = SIZE.txt["schnell"]


def load_ours(folder: Path, config: dict):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mflux.runtime.loader import evaluate, prepare

    flux, weights = prepare(folder, "transformer", "hf", {"transformer": config}, mx.float32)
    flux.load_weights(list(weights.items()), strict=True)
    del weights
    evaluate(dict(tree_flatten(flux.parameters())))
    return flux


def timed(fn, warmup: int, n: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write(folder: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    FluxTransformer2DModel(**CONFIG).save_pretrained(folder / "transformer", safe_serialization=True)
    rng = np.random.default_rng(0)
    n_img = (SIZE.res // 16) ** 2
    np.savez(
        folder / "inputs.npz",
        img=rng.standard_normal((1, n_img, 64), dtype=np.float32),
        txt=rng.standard_normal((1, TXT, CONFIG["joint_attention_dim"]), dtype=np.float32),
        y=rng.standard_normal((1, CONFIG["pooled_projection_dim"]), dtype=np.float32),
        t=np.array([1.0], np.float32),
    )


def run_diffusers(folder: Path, args) -> dict:
    import torch
    from bench_flux import image_ids
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()
    x = {k: torch.from_numpy(v) for k, v in np.load(folder / "inputs.npz").items()}
    img_ids, txt_ids = (torch.from_numpy(np.array(a[0])) for a in image_ids(SIZE.res, TXT))

    def step():
        with torch.no_grad():
            return model(
                hidden_states=x["img"],
                encoder_hidden_states=x["txt"],
                pooled_projections=x["y"],
                timestep=x["t"],
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]

    np.save(folder / "out-diffusers.npy", step().numpy())
    return {"step_s": timed(step, args.warmup, args.steps), "threads": torch.get_num_threads()}


def run_ours(folder: Path, args) -> dict:
    import mlx.core as mx
    from bench_flux import image_ids

    flux = load_ours(folder / "transformer", CONFIG)
    x = {k: mx.array(v) for k, v in np.load(folder / "inputs.npz").items()}
    img_ids, txt_ids = image_ids(SIZE.res, TXT)
    pe = flux.positions(img_ids, txt_ids)
    mod = flux.modulations([1.0], x["y"])[0]
    mx.eval(pe, mod)

    def step():
        return mx.eval(flux.predict(x["img"], x["txt"], pe, mod))

    def call():
        return mx.eval(flux(x["img"], img_ids, x["txt"], txt_ids, x["t"], x["y"]))

    np.save(folder / "out-ours.npy", np.array(flux.predict(x["img"], x["txt"], pe, mod)))
    return {"step_s": timed(step, args.warmup, args.steps), "call_s": timed(call, args.warmup, args.steps)}


def child(impl: str, folder: Path, args, preload: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    cmd = [sys.executable, __file__, "--child", impl, "--folder", str(folder)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--child", choices=("diffusers", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run = run_diffusers if args.child == "diffusers" else run_ours
        print(json.dumps(run(Path(args.folder), args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write(folder)
        diffusers = child("diffusers", folder, args, None)
        ours = child("ours", folder, args, None)
        a, b = np.load(folder / "out-ours.npy"), np.load(folder / "out-diffusers.npy")
        fast = child("ours", folder, args, OPENBLAS) if Path(OPENBLAS).exists() else None
    d = diffusers["step_s"]
    result = {
        "what": "cpu_step",
        "size": "mid",
        "tokens": (SIZE.res // 16) ** 2 + TXT,
        "config": CONFIG,
        "diffusers_s": d,
        "ours_s": ours["step_s"],
        "ours_call_s": ours["call_s"],
        "ours_openblas_s": fast and fast["step_s"],
        "ours_openblas_call_s": fast and fast["call_s"],
        "ratio": ours["step_s"] / d,
        "ratio_openblas": fast and fast["step_s"] / d,
        "max_relative_difference": float(np.abs(a - b).max() / np.abs(b).max()),
        "torch_threads": diffusers["threads"],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    rows = [
        f"\n| mid-size step ({result['tokens']} tokens, float32, {os.cpu_count()} cores) | seconds | vs diffusers |",
        "|---|---|---|",
        f"| diffusers (PyTorch {diffusers['threads']} threads) | {d:.3f} | 1.00 |",
        f"| mflux predict, MLX's own BLAS | {ours['step_s']:.3f} | {ours['step_s'] / d:.2f} |",
    ]
    if fast:
        rows.append(
            f"| mflux predict, OpenBLAS preloaded | {fast['step_s']:.3f} | {fast['step_s'] / d:.2f} |"
        )
        rows.append(
            f"| mflux __call__, OpenBLAS preloaded | {fast['call_s']:.3f} | {fast['call_s'] / d:.2f} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
