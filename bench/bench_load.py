"""Load speed of one mid-size FLUX.1 transformer, in the Hugging Face (diffusers) layout and MLX-native.

A transformer of hidden 1024 (8 heads of 128), 10 double and 20 single blocks, 1.32 GB in bf16, is
written with random bytes into a folder: diffusers' names split into 3 shards as the real repo has
them, and the MLX-native layout (Black Forest Labs' names, fused qkv, 1 GiB shards). Each is then read
with `loader.load_component`, and the seconds cover building the module, reading, renaming/fusing,
casting and evaluating every parameter. GB/s is the bytes on disk over those seconds.

Each read runs in a fresh process, so its peak RSS is its own (it includes Python, MLX and the
loaded model). `cpu_s` is the CPU time of all its threads during the load, which a busy shared
machine disturbs less than the wall time; `load_avg` says how busy it was. Before each cold read the files are dropped from the page cache with
posix_fadvise(DONTNEED), which needs no root; a warm read follows with the files still cached. `--diffusers` also times diffusers'
`FluxTransformer2DModel.from_pretrained` on the same hf folder, as an anchor.

    python bench/bench_load.py [--dir /tmp] [--dtype bfloat16|float32] [--diffusers]
"""

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PARAMS = dict(
    hidden_size=1024,
    num_heads=8,
    axes_dim=(16, 56, 56),
    depth=10,
    depth_single_blocks=20,
    context_in_dim=4096,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints are written")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers' from_pretrained")
    ap.add_argument("--repeat", type=int, default=2, help="cold/warm pairs per layout")
    ap.add_argument(
        "--keep", type=Path, help="write the checkpoints here once and keep them (reused if there)"
    )
    ap.add_argument("--child", nargs=4, metavar=("WHO", "LAYOUT", "CACHE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child, args.dtype)
    root = args.keep or Path(tempfile.mkdtemp(prefix="mflux-bench-load-", dir=args.dir))
    try:
        if not (root / "mlx").is_dir():
            write_checkpoints(root)
        runs = [("mflux", "hf"), ("mflux", "mlx")] + ([("diffusers", "hf")] if args.diffusers else [])
        for who, layout in runs:
            for _ in range(args.repeat):
                for cache in ("cold", "warm"):
                    # a fresh process each time, so its peak RSS is this load's alone
                    cmd = [
                        sys.executable,
                        __file__,
                        "--dtype",
                        args.dtype,
                        "--child",
                        who,
                        layout,
                        cache,
                        str(root),
                    ]
                    subprocess.run(cmd, check=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def write_checkpoints(root: Path) -> None:
    hf = root / "hf" / "transformer"
    write_layout(hf, _diffusers_shapes(_bfl_shapes()), 3, "diffusion_pytorch_model")
    (hf / "config.json").write_text(json.dumps(_diffusers_config()))
    write_layout(root / "mlx" / "transformer", _bfl_shapes(), None, "model")


def child(who: str, layout: str, cache: str, root: str, dtype: str) -> None:
    folder = Path(root) / layout
    files = _files(folder)
    if cache == "cold":
        _evict(files)
    load = time_mflux if who == "mflux" else time_diffusers
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = load(folder, layout, dtype)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime  # all threads
    report(who, layout, cache, dtype, seconds, cpu, sum(f.stat().st_size for f in files))


def time_mflux(folder: Path, layout: str, dtype: str) -> float:
    import mlx.core as mx

    from mflux.runtime.folder import ModelFolder
    from mflux.runtime.loader import load_component

    mf = ModelFolder(folder, layout, "schnell", {"transformer": _diffusers_config()}, None, layout, {})
    t = time.perf_counter()
    load_component(mf, "transformer", getattr(mx, dtype))
    return time.perf_counter() - t


def time_diffusers(folder: Path, layout: str, dtype: str) -> float:
    import torch
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging

    logging.disable_progress_bar()
    t = time.perf_counter()
    FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=getattr(torch, dtype))
    return time.perf_counter() - t


def report(who: str, layout: str, cache: str, dtype: str, seconds: float, cpu: float, nbytes: int) -> None:
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    line = dict(who=who, layout=layout, cache=cache, dtype=dtype, gb=round(nbytes / 1e9, 3))
    line.update(s=round(seconds, 3), gb_per_s=round(nbytes / 1e9 / seconds, 2), cpu_s=round(cpu, 3))
    line.update(peak_rss_gb=round(peak_gb, 2), load_avg=round(os.getloadavg()[0], 1))
    print(json.dumps(line), flush=True)


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def _evict(files: list[Path]) -> None:
    # Clean pages of a file on disk leave the page cache on DONTNEED; on tmpfs this does nothing.
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _params():
    from mflux.runtime.model import FluxParams

    return FluxParams(in_channels=64, vec_in_dim=768, guidance_embed=False, **PARAMS)


def _bfl_shapes() -> dict[str, tuple[int, ...]]:
    # The module is built lazily: its parameters are never evaluated, only their shapes read.
    from mlx.utils import tree_flatten

    from mflux.runtime.model import Flux

    return {k: tuple(v.shape) for k, v in tree_flatten(Flux(_params()).parameters())}


def _diffusers_shapes(bfl: dict) -> dict[str, tuple[int, ...]]:
    import mlx.core as mx
    from mflux.converters.diffusers import transformer_to_diffusers

    lazy = {k: mx.zeros(s, mx.bfloat16) for k, s in bfl.items()}  # never evaluated
    return {k: tuple(v.shape) for k, v in transformer_to_diffusers(lazy).items()}


def _diffusers_config() -> dict:
    p = _params()
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": p.hidden_size // p.num_heads,
        "axes_dims_rope": list(p.axes_dim),
        "guidance_embeds": False,
        "in_channels": 64,
        "joint_attention_dim": p.context_in_dim,
        "num_attention_heads": p.num_heads,
        "num_layers": p.depth,
        "num_single_layers": p.depth_single_blocks,
        "pooled_projection_dim": p.vec_in_dim,
    }


def write_layout(folder: Path, shapes: dict, count: int | None, prefix: str) -> None:
    """Random bf16 shards of `shapes` (`count` of them, or enough for at most about 1 GiB each) plus the
    index json."""
    folder.mkdir(parents=True)
    sizes = {k: int(np.prod(s)) * 2 for k, s in shapes.items()}
    total = sum(sizes.values())
    count = count or -(-total // 2**30)
    groups, done = [[] for _ in range(count)], 0
    for k in shapes:  # contiguous runs of about total / count bytes each
        groups[min(done * count // total, count - 1)].append(k)
        done += sizes[k]
    rng = np.random.default_rng(0)
    pool = ((rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        name = f"{prefix}-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(folder / name, {k: shapes[k] for k in names}, pool)
        weight_map.update(dict.fromkeys(names, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index))


def _write_shard(path: Path, shapes: dict, pool: np.ndarray) -> None:
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for i, shape in enumerate(shapes.values()):
            f.write(np.resize(np.roll(pool, i * 7919), int(np.prod(shape))).tobytes())


if __name__ == "__main__":
    main()
