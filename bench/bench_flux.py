"""Time mflux's FLUX.1 runtime on random weights of the real architecture.

Speed does not depend on the weights' values, so every model is built in memory with random weights
(no download), at the real size (`--size full`, for a GPU) or scaled down (`mid`, `tiny`, for a CPU).
Each figure is printed as one JSON line as soon as it is measured, and a table follows at the end.

    python bench/bench_flux.py --size full                       # everything, on a CUDA GPU or a Mac
    python bench/bench_flux.py --size mid --sections step,micro  # a CPU-sized run of two sections

Sections: `step` (transformer step, schnell at 256 text tokens and dev at 512, per quantization),
`levers` (the step with each speed lever turned back off), `micro` (one single-stream block at
4352 tokens in every quantization mode, plus where a block's time goes), `encode` (T5-XXL + CLIP),
`decode` (the VAE), `load` (an MLX-native model written to local disk, then read back).
Step times are the mean of `--steps` evaluated steps after `--warmup` ones; `first_s` is the first
call, which includes compiling kernels (quantized matmuls on CUDA compile at run time).
"""

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mflux.runtime import layers
from mflux.runtime.autoencoder import Autoencoder, AutoencoderConfig
from mflux.runtime.clip import CLIPTextConfig, CLIPTextModel
from mflux.runtime.model import Flux, FluxParams
from mflux.runtime.quantization import QuantSpec, should_quantize
from mflux.runtime.t5 import T5Config, T5Encoder

SECTIONS = ("step", "levers", "micro", "decode", "encode", "load")
# seconds per section; a section stops starting new items once its time is up (or the run's is)
BUDGETS = {"step": 150, "levers": 50, "micro": 150, "decode": 40, "encode": 70, "load": 140}
QUANTS = {"q8": QuantSpec(8), "q4": QuantSpec(4)}
MICRO_QUANTS = {
    "q8": QuantSpec(8),
    "q4": QuantSpec(4),
    "mxfp8": QuantSpec.for_mode("mxfp8"),
    "nvfp4": QuantSpec.for_mode("nvfp4"),
    "mxfp4": QuantSpec.for_mode("mxfp4"),
    "q4-g32": QuantSpec(4, 32),
    "q4-g128": QuantSpec(4, 128),
    "q8-g32": QuantSpec(8, 32),
    "q8-g128": QuantSpec(8, 128),
}


@dataclass
class Size:
    flux: dict  # diffusers transformer config keys
    t5: T5Config
    clip: CLIPTextConfig
    vae: AutoencoderConfig
    res: int  # image side in pixels
    txt: dict  # variant -> text tokens
    matmul: int  # side of the square matmul that measures the ceiling


def _flux_config(
    hidden_heads: tuple[int, int], depth: tuple[int, int], axes: tuple, context: int, vec: int
) -> dict:
    heads, head_dim = hidden_heads
    return {
        "in_channels": 64,
        "num_layers": depth[0],
        "num_single_layers": depth[1],
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": context,
        "pooled_projection_dim": vec,
        "axes_dims_rope": list(axes),
    }


SIZES = {
    "full": Size(
        _flux_config((24, 128), (19, 38), (16, 56, 56), 4096, 768),
        T5Config(),
        CLIPTextConfig(),
        AutoencoderConfig(),
        res=1024,
        txt={"schnell": 256, "dev": 512},
        matmul=8192,
    ),
    "mid": Size(
        _flux_config((4, 128), (2, 4), (16, 56, 56), 1024, 768),
        T5Config(d_model=1024, d_ff=2048, num_layers=2, num_heads=16),
        CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
        AutoencoderConfig(block_out_channels=(32, 64, 64, 64)),
        res=256,
        txt={"schnell": 64, "dev": 128},
        matmul=1024,
    ),
    "tiny": Size(
        _flux_config((2, 64), (1, 1), (8, 28, 28), 64, 64),
        T5Config(vocab_size=512, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2),
        CLIPTextConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
        ),
        AutoencoderConfig(block_out_channels=(32, 32, 32, 32)),
        res=64,
        txt={"schnell": 16, "dev": 32},
        matmul=256,
    ),
}


# ---------------------------------------------------------------- reporting and timing

RESULTS: list[dict] = []


def report(**kw) -> None:
    kw = {k: round(v, 6) if isinstance(v, float) else v for k, v in kw.items()}
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


class Budget:
    """Deadlines for the whole run and for the current section."""

    def __init__(self, total: float):
        self.end = time.monotonic() + total
        self.section_end = self.end

    def start(self, section: str, seconds: float) -> None:
        self.section_end = min(self.end, time.monotonic() + seconds)

    def left(self) -> bool:
        return time.monotonic() < self.section_end

    def skip(self, section: str, item: str) -> bool:
        if self.left():
            return False
        report(what="skipped", section=section, item=item, why="time budget")
        return True


def run(fn) -> None:
    mx.eval(fn())
    mx.synchronize()


def timeit(fn, warmup: int, n: int) -> dict:
    """first call (compiles), then `warmup - 1` more, then `n` timed calls, each evaluated."""
    t = time.perf_counter()
    run(fn)
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        run(fn)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run(fn)
        times.append(time.perf_counter() - t)
    return {
        "s": statistics.fmean(times),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "first_s": first,
    }


def peak_gb() -> float:
    return mx.get_peak_memory() / 1e9


def free() -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


# ---------------------------------------------------------------- random models


def randomize(module: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """Random weights in `dtype`, drawn directly on the device; norms keep their ones."""
    params = []
    for i, (name, p) in enumerate(tree_flatten(module.parameters())):
        if p.ndim >= 2:
            p = mx.random.normal(p.shape, dtype=dtype, scale=p.shape[-1] ** -0.5)
        params.append((name, p.astype(dtype)))
        if i % 16 == 15:  # bound the lazy float32 initial values kept alive
            mx.eval([q for _, q in params[-16:]])
    module.update(tree_unflatten(params))
    mx.eval(module.parameters())
    return module


def quantize(module: nn.Module, component: str, spec: QuantSpec | None) -> nn.Module:
    """The project's rule (mflux.runtime.quantization.should_quantize) decides which layers."""
    if spec is None:
        return module

    def predicate(path, m):
        return hasattr(m, "to_quantized") and should_quantize(
            component, f"{path}.weight", m.weight.shape, spec
        )

    nn.quantize(module, group_size=spec.group_size, bits=spec.bits, mode=spec.mode, class_predicate=predicate)
    mx.eval(module.parameters())
    return module


def params_count(module: nn.Module) -> int:
    return sum(p.size for _, p in tree_flatten(module.parameters()))


def nbytes(module: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))


def construct(component: str, size: Size, variant: str = "schnell") -> nn.Module:
    """The module with MLX's lazy initial weights: its shapes are known, nothing is computed yet."""
    if component == "transformer":
        return Flux(FluxParams.from_diffusers_config({**size.flux, "guidance_embeds": variant == "dev"}))
    if component == "text_encoder_2":
        return T5Encoder(size.t5)
    if component == "text_encoder":
        return CLIPTextModel(size.clip)
    return Autoencoder(size.vae)


def build(component: str, size: Size, dtype, spec: QuantSpec | None, variant: str = "schnell") -> nn.Module:
    return quantize(randomize(construct(component, size, variant), dtype), component, spec)


def image_ids(res: int, txt_len: int, batch: int = 1) -> tuple[mx.array, mx.array]:
    side = res // 16
    rows = mx.repeat(mx.arange(side), side)
    cols = mx.tile(mx.arange(side), side)
    img = mx.stack([mx.zeros_like(rows), rows, cols], axis=-1).astype(mx.float32)
    return mx.broadcast_to(img[None], (batch, side * side, 3)), mx.zeros((batch, txt_len, 3))


# ---------------------------------------------------------------- sections


def step_inputs(flux: Flux, size: Size, variant: str, dtype) -> dict:
    p = flux.params
    txt_len = size.txt[variant]
    img_ids, txt_ids = image_ids(size.res, txt_len)
    x = {
        "img": mx.random.normal((1, img_ids.shape[1], p.in_channels)).astype(dtype),
        "txt": mx.random.normal((1, txt_len, p.context_in_dim)).astype(dtype),
        "y": mx.random.normal((1, p.vec_in_dim)).astype(dtype),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "g": mx.array([3.5]) if variant == "dev" else None,
    }
    mx.eval([v for v in x.values() if v is not None])
    return x


def section_step(size: Size, args, budget: Budget) -> None:
    # predict() is one network for both variants: dev's guidance only enters the modulations,
    # computed once per generation. So one dev-sized model per quantization times both shapes.
    for quant in args.quants:
        if not budget.skip("step", quant):
            free()
            _step_figures(size, args, quant, budget)


def _step_figures(size: Size, args, quant: str, budget: Budget) -> None:
    flux = build("transformer", size, args.dtype, QUANTS.get(quant), "dev")
    for variant in ("schnell", "dev"):
        if budget.skip("step", f"{variant} {quant}"):
            continue
        x = step_inputs(flux, size, variant, args.dtype)
        t = time.perf_counter()
        pe = flux.positions(x["img_ids"], x["txt_ids"])
        mods = flux.modulations([1.0, 0.75, 0.5, 0.25], x["y"], mx.array([3.5]))
        mx.eval(pe, mods)
        prepare = time.perf_counter() - t
        # the graph is built in Python before it runs: its cost is part of every step
        t = time.perf_counter()
        flux.predict(x["img"], x["txt"], pe, mods[0])
        graph = time.perf_counter() - t
        r = timeit(
            lambda x=x, pe=pe, mods=mods: flux.predict(x["img"], x["txt"], pe, mods[0]),
            args.warmup,
            args.steps,
        )
        report(
            what="step",
            variant=variant,
            quant=_label(quant, args),
            res=size.res,
            txt=size.txt[variant],
            **r,
            modulations_once_s=prepare,
            graph_build_s=graph,
            peak_gb=peak_gb(),
            weights_gb=nbytes(flux) / 1e9,
        )


def section_levers(size: Size, args, budget: Budget) -> None:
    """The bf16 schnell step with one lever at a time turned back to the plain way."""
    free()
    flux = build("transformer", size, args.dtype, None)
    x = step_inputs(flux, size, "schnell", args.dtype)
    pe = flux.positions(x["img_ids"], x["txt_ids"])
    mods = flux.modulations([1.0], x["y"], None)[0]
    t = mx.array([1.0])

    def step():
        return flux.predict(x["img"], x["txt"], pe, mods)

    def per_step_modulation():
        return flux(x["img"], x["img_ids"], x["txt"], x["txt_ids"], t, x["y"], None)

    variants = [
        ("all levers", step, None),
        ("modulations every step", per_step_modulation, None),
        ("no mx.compile", step, "nocompile"),
        ("layer norm, then scale and shift", step, "unfused_modulate"),
        ("rope rounded in the model dtype", step, "lowp_rope"),
    ]
    for name, fn, patch in variants:
        if budget.skip("levers", name):
            continue
        with _lever_off(patch):
            r = timeit(fn, args.warmup, args.steps)
        report(what="lever", variant="schnell", lever=name, res=size.res, txt=size.txt["schnell"], **r)


class _lever_off:
    """Swap one lever of mflux.layers back to the plain way for the duration of a with-block."""

    def __init__(self, patch: str | None):
        self.patch = patch
        self.saved = {}

    def __enter__(self):
        if self.patch == "nocompile":
            mx.disable_compile()
        elif self.patch == "unfused_modulate":
            self._swap("modulate", _plain_modulate)
        elif self.patch == "lowp_rope":
            self._swap("_rotate", _lowp_rotate)
        return self

    def _swap(self, name, fn):
        self.saved[name] = getattr(layers, name)
        setattr(layers, name, fn)

    def __exit__(self, *exc):
        if self.patch == "nocompile":
            mx.enable_compile()
        for name, fn in self.saved.items():
            setattr(layers, name, fn)


def _plain_modulate(x, shift, scale1):
    return mx.fast.layer_norm(x, None, None, layers.EPS) * scale1[:, None] + shift[:, None]


@mx.compile
def _lowp_rotate(x0, x1, a, b):
    return x0 * a.astype(x0.dtype) + x1 * b.astype(x0.dtype)


def section_micro(size: Size, args, budget: Budget) -> None:
    """One single-stream block at the schnell sequence length: bf16 against every quantization mode,
    the double block, the parts of a block, and the matmul and attention ceilings."""
    p = FluxParams.from_diffusers_config({**size.flux, "guidance_embeds": False})
    tokens = (size.res // 16) ** 2 + size.txt["schnell"]
    dtype = args.dtype
    img_ids, txt_ids = image_ids(size.res, size.txt["schnell"])
    pe = layers.rope(mx.concatenate([txt_ids, img_ids], axis=1), p.axes_dim)
    x = mx.random.normal((1, tokens, p.hidden_size)).astype(dtype)
    _ceilings(size, p, tokens, dtype, args, budget)

    block = randomize(layers.SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio), dtype)
    mod = block.modulations(mx.random.normal((1, p.hidden_size)).astype(dtype))
    mx.eval(x, pe, mod)
    bf16 = timeit(lambda: block.forward(x, mod, pe), args.warmup, args.steps * 4)
    label = _dtype_name(dtype)
    report(
        what="single_block",
        quant=label,
        tokens=tokens,
        ms=bf16["s"] * 1e3,
        first_s=bf16["first_s"],
        bytes_per_param=2.0 if dtype == mx.bfloat16 else 4.0,
    )
    _block_parts(block, x, mod, pe, p, args)

    _double_block(p, x, pe, size.txt["schnell"], label, args)

    for name, spec in MICRO_QUANTS.items():
        if not budget.skip("micro", name):
            _quant_block(p, spec, name, x, mod, pe, bf16["s"], args)


def _double_block(p: FluxParams, x, pe, txt_len: int, label: str, args) -> None:
    block = layers.DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias)
    block = randomize(block, args.dtype)
    mod = block.modulations(mx.random.normal((1, p.hidden_size)).astype(args.dtype))
    mx.eval(mod)
    r = timeit(lambda: block.forward(x[:, txt_len:], x[:, :txt_len], mod, pe), args.warmup, args.steps * 4)
    report(what="double_block", quant=label, tokens=x.shape[1], ms=r["s"] * 1e3, first_s=r["first_s"])


def _quant_block(p: FluxParams, spec: QuantSpec, name: str, x, mod, pe, bf16_s: float, args) -> None:
    block = layers.SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio)
    block = quantize(randomize(block, args.dtype), "transformer", spec)
    try:
        r = timeit(lambda: block.forward(x, mod, pe), args.warmup, args.steps * 4)
    except (RuntimeError, ValueError) as e:
        report(what="single_block", quant=name, error=str(e)[:200])
        return
    lin = block.linear1
    stored = sum(a.nbytes for a in (lin.weight, lin.scales, getattr(lin, "biases", None)) if a is not None)
    report(
        what="single_block",
        quant=name,
        mode=spec.mode,
        bits=spec.bits,
        group_size=spec.group_size,
        tokens=x.shape[1],
        ms=r["s"] * 1e3,
        vs_bf16=r["s"] / bf16_s,
        first_s=r["first_s"],
        bytes_per_param=stored / (lin.weight.size * 32 // spec.bits),
    )


def _ceilings(size: Size, p: FluxParams, tokens: int, dtype, args, budget: Budget) -> None:
    n = size.matmul
    a, b = (mx.random.normal((n, n)).astype(dtype) for _ in range(2))
    mx.eval(a, b)
    r = timeit(lambda: a @ b, args.warmup, args.steps * 2)
    report(what="matmul_tflops", n=n, dtype=_dtype_name(dtype), tflops=2 * n**3 / r["s"] / 1e12)
    H, D = p.num_heads, p.hidden_size // p.num_heads
    q, k, v = (mx.random.normal((1, H, tokens, D)).astype(dtype) for _ in range(3))
    mx.eval(q, k, v)
    r = timeit(
        lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5), args.warmup, args.steps * 2
    )
    report(
        what="attention_tflops",
        heads=H,
        tokens=tokens,
        dim=D,
        tflops=4 * H * tokens**2 * D / r["s"] / 1e12,
        ms=r["s"] * 1e3,
    )


def _block_parts(block, x, mod, pe, p: FluxParams, args) -> None:
    """Where a single block's time goes: its two matmuls, attention, and everything else."""
    D = p.hidden_size
    xn = layers.modulate(x, mod[:, 0], mod[:, 1])
    h = block.linear1(xn)
    q, k, v = layers.split_heads(h[..., : 3 * D], p.num_heads)
    q, k = block.norm(q, k, pe)
    cat = mx.concatenate([layers.attention(q, k, v), block.mlp_act(h[..., 3 * D :])], axis=-1)
    mx.eval(xn, h, q, k, cat)
    n = args.steps * 4
    parts = {
        "linear1": timeit(lambda: block.linear1(xn), args.warmup, n)["s"],
        "attention": timeit(lambda: layers.attention(q, k, v), args.warmup, n)["s"],
        "linear2": timeit(lambda: block.linear2(cat), args.warmup, n)["s"],
        "block": timeit(lambda: block.forward(x, mod, pe), args.warmup, n)["s"],
    }
    glue = parts["block"] - parts["linear1"] - parts["attention"] - parts["linear2"]
    tokens = x.shape[1]
    flops = {
        "linear1": 2 * tokens * D * block.linear1.weight.shape[0],
        "linear2": 2 * tokens * block.linear2.weight.shape[1] * D,
        "attention": 4 * tokens**2 * D,
    }
    report(
        what="single_block_parts",
        tokens=tokens,
        **{f"{k}_ms": v * 1e3 for k, v in parts.items()},
        glue_ms=glue * 1e3,
        **{f"{k}_tflops": flops[k] / parts[k] / 1e12 for k in flops},
    )


def section_encode(size: Size, args, budget: Budget) -> None:
    for quant in args.quants:
        if not budget.skip("encode", quant):
            free()
            _encode_figures(size, args, quant)


def _encode_figures(size: Size, args, quant: str) -> None:
    spec = QUANTS.get(quant)
    t5 = build("text_encoder_2", size, args.dtype, spec)
    clip = build("text_encoder", size, args.dtype, spec)
    clip_ids = mx.random.randint(0, size.clip.vocab_size, (1, size.clip.max_position_embeddings))
    for variant in ("schnell", "dev"):
        ids = mx.random.randint(0, size.t5.vocab_size, (1, size.txt[variant]))
        r = timeit(lambda ids=ids: [t5(ids), clip(clip_ids)[1]], args.warmup, args.steps)
        report(
            what="encode",
            quant=_label(quant, args),
            variant=variant,
            txt=size.txt[variant],
            **r,
            peak_gb=peak_gb(),
            weights_gb=(nbytes(t5) + nbytes(clip)) / 1e9,
        )


def section_decode(size: Size, args, budget: Budget) -> None:
    if budget.skip("decode", "vae"):
        return
    free()
    vae = build("vae", size, args.dtype, None)
    z = mx.random.normal((1, size.res // 8, size.res // 8, size.vae.latent_channels)).astype(args.dtype)
    r = timeit(lambda: vae.decode(z), max(1, args.warmup - 1), max(1, args.steps // 2))
    report(what="decode", res=size.res, **r, peak_gb=peak_gb())


def section_load(size: Size, args, budget: Budget) -> None:
    """Write an MLX-native model (the converter's layout: one folder of shards per component) with
    random weights to local disk, then time the loader reading it back, component by component."""
    from mflux.runtime.folder import COMPONENTS, ModelFolder
    from mflux.runtime.loader import load_component
    from mflux.runtime.weights import save_shards

    root = Path(tempfile.mkdtemp(prefix="mflux-bench-", dir=args.tmp))
    architecture = {
        "transformer": {**size.flux, "guidance_embeds": False},
        "text_encoder": vars(size.clip),
        "text_encoder_2": vars(size.t5),
        "vae": {**vars(size.vae), "block_out_channels": list(size.vae.block_out_channels)},
    }
    try:
        for quant in args.quants:
            if budget.skip("load", quant):
                continue
            spec = QUANTS.get(quant)
            folder = root / quant
            sizes = {}
            for c in COMPONENTS:
                free()
                m = build(c, size, args.dtype, spec)
                save_shards(iter(tree_flatten(m.parameters())), folder / c, max_shard_bytes=2**30)
                sizes[c] = sum(f.stat().st_size for f in (folder / c).glob("*.safetensors"))
                del m
            quantization = {
                c: spec.to_dict() for c in ("transformer", "text_encoder", "text_encoder_2") if spec
            }
            defaults = {"steps": 4, "guidance": 3.5, "max_sequence_length": 256}
            mf = ModelFolder(folder, "mlx", "schnell", architecture, quantization or None, quant, defaults)
            seconds = {}
            free()
            for c in COMPONENTS:
                t = time.perf_counter()
                module = load_component(mf, c, args.dtype)
                seconds[c] = time.perf_counter() - t
                del module
            report(
                what="load",
                quant=_label(quant, args),
                s=sum(seconds.values()),
                **{f"{c}_s": v for c, v in seconds.items()},
                gb=sum(sizes.values()) / 1e9,
                **{f"{c}_gb": v / 1e9 for c, v in sizes.items()},
                peak_gb=peak_gb(),
            )
            for c in COMPONENTS:
                params = params_count(construct(c, size))
                report(
                    what="bytes_per_param",
                    quant=_label(quant, args),
                    component=c,
                    bytes_per_param=sizes[c] / params,
                )
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _label(quant: str, args) -> str:
    return _dtype_name(args.dtype) if quant == "bf16" else quant


def _dtype_name(dtype) -> str:
    return {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}[dtype]


# ---------------------------------------------------------------- the table


def table() -> str:
    rows = ["", "| figure | setting | time | first call | peak GB | other |", "|---|---|---|---|---|---|"]
    for r in RESULTS:
        what = r["what"]
        if what == "step":
            rows.append(
                f"| step {r['variant']} {r['res']}px, {r['txt']} txt | {r['quant']} | {r['s']:.4f} s | {r['first_s']:.2f} s | {r['peak_gb']:.1f} | weights {r['weights_gb']:.1f} GB, graph {r['graph_build_s'] * 1e3:.1f} ms |"
            )
        elif what == "lever":
            rows.append(f"| lever: {r['lever']} | {r['variant']} | {r['s']:.4f} s | | | |")
        elif what == "single_block" and "ms" in r:
            extra = f"{r['vs_bf16']:.2f}x bf16, " if "vs_bf16" in r else ""
            rows.append(
                f"| single block {r['tokens']} tok | {r['quant']} | {r['ms']:.2f} ms | {r['first_s']:.2f} s | | {extra}{r['bytes_per_param']:.3f} B/param |"
            )
        elif what == "single_block":
            rows.append(f"| single block | {r['quant']} | failed | | | {r['error']} |")
        elif what == "single_block_parts":
            rows.append(
                f"| single block parts | | {r['block_ms']:.2f} ms | | | linear1 {r['linear1_ms']:.2f}, attention {r['attention_ms']:.2f}, linear2 {r['linear2_ms']:.2f}, glue {r['glue_ms']:.2f} ms |"
            )
        elif what == "double_block":
            rows.append(
                f"| double block {r['tokens']} tok | {r['quant']} | {r['ms']:.2f} ms | {r['first_s']:.2f} s | | |"
            )
        elif what in ("matmul_tflops", "attention_tflops"):
            rows.append(f"| {what} | | | | | {r['tflops']:.1f} TFLOP/s |")
        elif what == "encode":
            rows.append(
                f"| encode T5+CLIP, {r['txt']} tok | {r['quant']} | {r['s']:.4f} s | {r['first_s']:.2f} s | {r['peak_gb']:.1f} | weights {r['weights_gb']:.1f} GB |"
            )
        elif what == "decode":
            rows.append(
                f"| VAE decode {r['res']}px | | {r['s']:.4f} s | {r['first_s']:.2f} s | {r['peak_gb']:.1f} | |"
            )
        elif what == "load":
            rows.append(
                f"| load MLX-native | {r['quant']} | {r['s']:.2f} s | | {r['peak_gb']:.1f} | {r['gb']:.1f} GB on disk |"
            )
        elif what == "bytes_per_param":
            rows.append(f"| bytes/param {r['component']} | {r['quant']} | | | | {r['bytes_per_param']:.3f} |")
        elif what == "skipped":
            rows.append(f"| skipped {r['section']}: {r['item']} | | | | | {r['why']} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--size", choices=SIZES, default="full", help="model and image size (default: full)")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated, from {','.join(SECTIONS)}"
    )
    parser.add_argument(
        "--quant", default="bf16,q8,q4", help="bf16 (the float dtype), q8, q4 (affine, group 64)"
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="float dtype (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed calls per figure")
    parser.add_argument("--warmup", type=int, default=2, help="calls before timing")
    parser.add_argument(
        "--time-limit", type=float, default=540, help="seconds for the whole run; later items are skipped"
    )
    parser.add_argument(
        "--budget", action="append", default=[], metavar="SECTION=SECONDS", help="a section's own time limit"
    )
    parser.add_argument(
        "--tmp", default=None, help="folder for the load section's model (default: the system's temp)"
    )
    args = parser.parse_args(argv)
    args.dtype = getattr(mx, args.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16"))
    args.quants = [q for q in args.quant.split(",") if q]
    for q in args.quants:
        if q != "bf16" and q not in QUANTS:
            parser.error(f"unknown quantization {q!r} (choose from bf16, {', '.join(QUANTS)})")
    sections = [s for s in args.sections.split(",") if s]
    for s in sections:
        if s not in SECTIONS:
            parser.error(f"unknown section {s!r} (choose from {', '.join(SECTIONS)})")
    budgets = dict(BUDGETS)
    for b in args.budget:
        name, _, seconds = b.partition("=")
        budgets[name] = float(seconds)

    size = SIZES[args.size]
    report(
        what="env",
        device=str(mx.default_device()),
        mlx=mx.__version__,
        size=args.size,
        dtype=_dtype_name(args.dtype),
        python=sys.version.split()[0],
    )
    budget = Budget(args.time_limit)
    for s in sections:
        budget.start(s, budgets[s])
        t = time.perf_counter()
        globals()[f"section_{s}"](size, args, budget)
        report(what="section_done", section=s, s=time.perf_counter() - t)
    print(table())


if __name__ == "__main__":
    main()
