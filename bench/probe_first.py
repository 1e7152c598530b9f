"""Where a fresh process's first image spends its extra time (issue 12, target 3), op class by op class.

In one new process, each probe below runs twice at FLUX.1's full widths and shapes, with a
synchronization after each call; its first call pays for whatever MLX builds or sets up on first use.
Between probes the script counts the modules MLX wrote to its kernel cache (MLX_PTX_CACHE_DIR), so a
probe's extra time can be split into what the disk cache saves and what it cannot:

    python bench/probe_first.py --cache DIR --state empty   # rm -rf DIR first: everything is built
    python bench/probe_first.py --cache DIR --state warm    # a new process on the cache the first left

DIR also holds the driver's cache (CUDA_CACHE_PATH=DIR/nv). empty first - warm first is what
building the kernels costs; warm first - second is per-process set-up
that no disk cache holds (cuBLASLt's algorithm choice per GEMM shape, cuDNN's graphs for attention and
convolution, loading modules). The models are one block deep: the kernels are the same as at full
depth. Each line is a JSON object; `--size tiny` runs the same probes on a CPU.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flux as bf  # noqa: E402
import mlx.core as mx  # noqa: E402

from mflux.runtime import jitfree  # noqa: E402
from mflux.runtime.quantization import QuantSpec  # noqa: E402


def _modules(cache: Path) -> set[str]:
    """The modules in MLX's kernel cache, by name: a long name is stored as nested folders."""
    return {str(p.relative_to(cache))[:-4] for p in cache.rglob("*.ptx")} if cache.is_dir() else set()


def probes(size: bf.Size, dtype):
    """(name, build) pairs; build() makes the inputs and returns the call to time."""
    p, res = size.flux, size.res
    hidden, heads = p["num_attention_heads"] * p["attention_head_dim"], p["num_attention_heads"]
    tokens = (res // 16) ** 2 + size.txt["schnell"]

    def randn(*shape):
        return mx.random.normal(shape).astype(dtype)

    def matmul(n):
        a, b = randn(tokens, hidden), randn(hidden, n)
        return lambda: a @ b

    def sdpa():
        q, k, v = (randn(1, heads, tokens, hidden // heads) for _ in range(3))
        return lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=(hidden // heads) ** -0.5)

    def t5(quant=None):
        cfg = bf.T5Config(**{**size.t5.__dict__, "num_layers": 1})
        model = bf.build("text_encoder_2", bf.Size(**{**size.__dict__, "t5": cfg}), dtype, quant)
        ids = mx.random.randint(0, cfg.vocab_size, (1, size.txt["schnell"]))
        return lambda: model(ids)

    def clip():
        cfg = bf.CLIPTextConfig(**{**size.clip.__dict__, "num_hidden_layers": 1})
        model = bf.build("text_encoder", bf.Size(**{**size.__dict__, "clip": cfg}), dtype, None)
        ids = mx.random.randint(0, cfg.vocab_size, (1, cfg.max_position_embeddings))
        return lambda: model(ids)

    def transformer(quant=None):
        flux_cfg = {**size.flux, "num_layers": 1, "num_single_layers": 1}
        flux = bf.build("transformer", bf.Size(**{**size.__dict__, "flux": flux_cfg}), dtype, quant, "dev")
        x = bf.step_inputs(flux, size, "schnell", dtype)
        pe = flux.positions(x["img_ids"], x["txt_ids"])
        # the step's rows as the engine takes them: a view, where mods[0] would be a gather (built at run
        # time on CUDA, which the probe would count as the transformer's)
        mods = jitfree.item(flux.modulations([1.0], x["y"], mx.array([3.5])), 0)
        mx.eval(pe, mods)
        return lambda: flux.predict(x["img"], x["txt"], pe, mods)

    def vae():
        model = bf.build("vae", size, dtype, None)
        z = randn(1, res // 8, res // 8, size.vae.latent_channels)
        return lambda: model.decode(z, band_bytes=None)

    return [
        ("init", lambda: lambda: mx.ones(4) + 1),
        ("matmul_qkv", lambda: matmul(3 * hidden)),
        ("matmul_linear1", lambda: matmul(7 * hidden)),
        ("sdpa_image", sdpa),
        ("t5_one_layer", t5),
        ("t5_q8_one_layer", lambda: t5(QuantSpec(8))),  # its layers dequantize (qmatmul) on CUDA
        ("clip_one_layer", clip),
        ("transformer_one_block_each", transformer),
        ("transformer_q8", lambda: transformer(QuantSpec(8))),
        ("transformer_q4", lambda: transformer(QuantSpec(4))),
        ("vae_decode_whole", vae),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=bf.SIZES, default="full")
    ap.add_argument("--cache", default=os.environ.get("MLX_PTX_CACHE_DIR", ""), help="MLX_PTX_CACHE_DIR")
    ap.add_argument("--state", default="", help="a label for the cache's state (empty, warm)")
    ap.add_argument("--only", default="", help="comma-separated probe names (default: all)")
    ap.add_argument(
        "--kernel-warmup",
        action="store_true",
        help="first run mflux.runtime.warmup's children (timed) and wait for them (Flux1 runs uncompiled meanwhile)",
    )
    args = ap.parse_args()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and os.environ.get("MLX_PTX_CACHE_DIR") != str(cache):
        # MLX reads the variable when it starts: set it for a child that runs the probes
        env = {**os.environ, "MLX_PTX_CACHE_DIR": str(cache), "CUDA_CACHE_PATH": str(cache / "nv")}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    size = bf.SIZES[args.size]
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    only = {n for n in args.only.split(",") if n}
    total = time.perf_counter()
    if args.kernel_warmup:
        from mflux.runtime import warmup

        job = warmup.start(dtype)
        done = job.wait() if job else None
        line = {"what": "warmup", "children": len(job.procs) if job else 0, "ok": done}
        print(json.dumps(line | {"s": round(time.perf_counter() - total, 2)}), flush=True)
    for name, make in probes(size, dtype):
        if only and name not in only:
            continue
        before = _modules(cache) if cache else set()
        try:
            call = make()
            mx.synchronize()
            times = []
            for _ in range(2):
                t = time.perf_counter()
                mx.eval(call())
                mx.synchronize()
                times.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 - a probe that fails is reported and the rest go on
            print(json.dumps({"what": "probe_failed", "probe": name, "error": str(e)[:300]}), flush=True)
            continue
        built = sorted(_modules(cache) - before) if cache else None
        line = {"what": "probe", "probe": name, "cache": args.state, "first_s": round(times[0], 4)}
        line |= {
            "second_s": round(times[1], 4),
            "extra_s": round(times[0] - times[1], 4),
            "modules_built": None if built is None else len(built),
        }
        if built:
            line["built"] = [name[:120] for name in built]
        print(json.dumps(line), flush=True)
        bf.free()
    print(json.dumps({"what": "probe_done", "cache": args.state, "s": round(time.perf_counter() - total, 2)}))


if __name__ == "__main__":
    main()
