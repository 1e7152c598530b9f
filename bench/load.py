"""Loading, in the Hugging Face (diffusers) layout and MLX-native: each component read from a model
folder, then the first image after opening it, in this process, as `mflux run` makes it.

    python bench/load.py --size tiny                                     # a CPU: both layouts, tiny
    python bench/load.py --size full --layout mlx --quant bf16,q8,q4 --tmp /var/tmp   # one at a time
    python bench/load.py --size full --layout hf --keep /var/tmp/flux --what first   # needs torch, diffusers
    python bench/load.py --folder ~/models/schnell --what first          # a model you have

read: `loader.load_component` for each component in turn: seconds, GB on disk, GB/s.
first: `Flux1` opens the folder and makes two images (4 steps; 1024x1024 at full size) as
`mflux run --seed 1 2` does. `load_plus_first_s` runs from opening the folder to the first image,
`second_image_s` from there to the second; `load_s` is the loading inside them. On CUDA the first image
of a fresh machine builds kernels: `--kernel-cache DIR --empty-cache` times it (MLX's kernel cache in
DIR, emptied first), and the same command without `--empty-cache` the warm figure. The process then
waits for mflux's warm-up children, so that the next run finds their kernels.

Without --folder the model is random (speed does not depend on the weights' values): MLX-native, written
by this script at each --quant, or diffusers' layout, written by peer.py (bf16; full or tiny; it needs
torch and diffusers), into --keep DIR (kept, and reused when there) or a temporary folder.
"""

import os
import shutil
import time
from pathlib import Path

from common import (
    COMPONENTS,
    QUANTS,
    SIZES,
    add_folder_arguments,
    add_image_arguments,
    add_model_arguments,
    cuda,
    describe,
    finish,
    folder_gb,
    free,
    make_images,
    model_folder,
    parser,
    peak_gb,
    report,
    report_env,
    split,
    table,
    tuned,
    tuning,
)

WHAT = ("read", "first")


def read(folder: Path, args, tune: dict) -> None:
    from mflux.folders import open_folder
    from mflux.runtime.loader import load_component

    model = open_folder(folder)
    layout, stored = describe(folder)
    seconds = {}
    free()
    with tuned(tune):
        for c in COMPONENTS:
            t = time.perf_counter()
            module = load_component(model, c, args.dtype)
            seconds[c] = time.perf_counter() - t
            del module
    gb = folder_gb(folder)
    report(
        what="read",
        layout=layout,
        stored=stored,
        s=sum(seconds.values()),
        gb=gb,
        gb_per_s=gb / sum(seconds.values()),
        **{f"{c}_s": s for c, s in seconds.items()},
        **{f"{c}_gb": folder_gb(folder, c) for c in COMPONENTS},
        peak_gb=peak_gb(),
        **tuning(tune),
    )


def first(folder: Path, args, tune: dict) -> None:
    from mflux.backend import kernel_cache_dir

    cache = Path(os.environ.get("MLX_PTX_CACHE_DIR") or kernel_cache_dir())  # as mflux sets it
    before = _cached(cache)
    free()
    with tuned(tune):
        (t1, image), (t2, _) = make_images(folder, args)
    waited = _wait_for_warmup(cache)
    layout, stored = describe(folder)
    timings = image.metadata["timings"]
    report(
        what="first",
        layout=layout,
        stored=stored,
        res=args.res,
        steps=args.image_steps,
        cache="empty" if args.empty_cache else "warm",
        load_plus_first_s=t1,
        second_image_s=t2 - t1,
        load_s=timings["load"],
        **{f"{k}_s": v for k, v in timings.items() if k != "load"},
        peak_gb=max(image.peak_memory.values()) / 1e9,
        kernels_built=len(_cached(cache) - before),
        warmup_wait_s=waited,
        **tuning(tune),
    )


def _cached(cache: Path) -> set[str]:
    """The kernel modules in MLX's cache (MLX_PTX_CACHE_DIR)."""
    return {p.name for p in cache.rglob("*.ptx")} if cache.is_dir() else set()


def _wait_for_warmup(cache: Path, limit: float = 120) -> float | None:
    """Seconds waited for mflux's warm-up children (CUDA) to leave the kernel cache (their staging
    folders gone), so that the next process finds their kernels; None where none run."""
    c = cuda()
    if c is None or not cache.is_dir():
        return None
    t = time.perf_counter()
    while any(cache.glob(c.warmup.STAGING + "*")) and time.perf_counter() - t < limit:
        time.sleep(0.1)
    return time.perf_counter() - t


def print_table() -> None:
    from common import FIGURES

    rows = []
    for f in FIGURES:
        name = f"{f.get('layout')} {f.get('stored')}" + (f" {f['tune']}" if f.get("tune") else "")
        if f["what"] == "write":
            rows.append([f"write {name}", f"{f['s']:.1f} s", f"{f['gb']:.3g} GB", ""])
        elif f["what"] == "read":
            parts = ", ".join(f"{c} {f[f'{c}_s']:.2f} s" for c in COMPONENTS)
            rows.append(
                [f"read {name}", f"{f['s']:.2f} s", f"{f['gb']:.3g} GB, {f['gb_per_s']:.2f} GB/s", parts]
            )
        elif f["what"] == "first":
            rows.append(
                [f"load + first image, {name}, {f['cache']} kernel cache", f"{f['load_plus_first_s']:.2f} s"]
                + [
                    f"peak {f['peak_gb']:.3g} GB",
                    f"second image {f['second_image_s']:.2f} s, load {f['load_s']:.2f} s",
                ]
            )
    table(["figure", "time", "size", "other"], rows)


def main(argv=None) -> None:
    p = parser(__doc__)
    add_model_arguments(p, default_size="full")
    add_folder_arguments(p)
    add_image_arguments(p)
    p.add_argument("--layout", default="hf,mlx", help="random folders to write: hf, mlx (default both)")
    p.add_argument("--quant", default="bf16", help="mlx: stored as bf16 (the float dtype), q8, q4")
    p.add_argument("--what", default=",".join(WHAT), help="read, first (default both)")
    p.add_argument("--kernel-cache", help="MLX's kernel cache for this run (MLX_PTX_CACHE_DIR)")
    p.add_argument("--empty-cache", action="store_true", help="empty --kernel-cache first")
    args = p.parse_args(argv)
    what = split(p, "--what", args.what, WHAT)
    layouts = split(p, "--layout", args.layout, ("hf", "mlx"))
    quants = split(p, "--quant", args.quant, ["bf16", *QUANTS])
    if args.empty_cache and not args.kernel_cache:
        p.error("--empty-cache needs --kernel-cache DIR (the cache to empty)")
    if "hf" in layouts and not args.folder and args.size == "mid":
        p.error("--layout hf writes the full or the tiny size (peer.py's checkpoint); use --layout mlx")
    args = finish(p, args)
    args.res = args.res or SIZES[args.size].res
    if args.kernel_cache:  # MLX reads it at its first kernel build
        if args.empty_cache:
            shutil.rmtree(args.kernel_cache, ignore_errors=True)
        os.environ["MLX_PTX_CACHE_DIR"] = str(Path(args.kernel_cache).resolve())
        os.environ["CUDA_CACHE_PATH"] = str(Path(args.kernel_cache).resolve() / "nv")  # the driver's own
    report_env(args)
    runs = (
        [("folder", "")]
        if args.folder
        else [(lay, q) for lay in layouts for q in (quants if lay == "mlx" else ["bf16"])]
    )
    for layout, quant in runs:
        with model_folder(args, layout, quant) as folder:
            for tune in args.tunings:
                for w in what:
                    (read if w == "read" else first)(folder, args, tune)
    print_table()


if __name__ == "__main__":
    main()
