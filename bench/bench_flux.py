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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from flux_sizes import FLUX
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mflux.runtime import engine, kernels, layers, loader, memory, qmatmul, sampler, warmup
from mflux.runtime.autoencoder import Autoencoder, AutoencoderConfig
from mflux.runtime.clip import CLIPTextConfig, CLIPTextModel
from mflux.runtime.model import Flux, FluxParams
from mflux.runtime.quantization import (
    QuantSpec,
    quantize_model_from_weights,
    quantize_tensor,
    should_quantize,
)
from mflux.runtime.t5 import T5Config, T5Encoder

SECTIONS = ("step", "levers", "qmatmul", "micro", "decode", "encode", "pipeline", "firstrun", "load")
# seconds per section; a section stops starting new items once its time is up (or the run's is)
BUDGETS = {
    "step": 150,
    "levers": 50,
    "qmatmul": 90,
    "micro": 150,
    "decode": 40,
    "encode": 70,
    "pipeline": 150,
    "firstrun": 360,
    "load": 140,
}
# the two ways a quantized layer multiplies (mflux.runtime.qmatmul): MLX's quantized_matmul at every
# size, or dequantize-then-matmul from `--min-rows` rows on (the CUDA default)
PATHS = ("qmm", "dequant", "fused", "kernel")
# --load-stream / --load-ways: the ways mx.load reads, as loader.LOAD_STREAM names them
WAYS = {"gpu": "default", "cpu": "cpu", "cpu-copy": "cpu-copy"}
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


SIZES = {
    "full": Size(
        FLUX["full"],
        T5Config(),
        CLIPTextConfig(),
        AutoencoderConfig(),
        res=1024,
        txt={"schnell": 256, "dev": 512},
        matmul=8192,
    ),
    "mid": Size(
        FLUX["mid"],
        T5Config(d_model=1024, d_ff=2048, num_layers=2, num_heads=16),
        # CLIP-L's width: its pooled output feeds the transformer's 768-wide vector input
        CLIPTextConfig(hidden_size=768, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
        AutoencoderConfig(block_out_channels=(32, 64, 64, 64)),
        res=256,
        txt={"schnell": 64, "dev": 128},
        matmul=1024,
    ),
    "tiny": Size(
        FLUX["tiny"],
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
    """The project's rule (mflux.runtime.quantization.should_quantize) decides which layers, and the
    backend which matmul they take (mflux.runtime.qmatmul), as the loader does."""
    if spec is None:
        return module

    def predicate(path, m):
        return hasattr(m, "to_quantized") and should_quantize(
            component, f"{path}.weight", m.weight.shape, spec
        )

    nn.quantize(module, group_size=spec.group_size, bits=spec.bits, mode=spec.mode, class_predicate=predicate)
    qmatmul.use_backend_matmul(module)
    mx.eval(module.parameters())
    return module


DEQUANTIZE_OF_PATH = {"dequant": "mlx", "fused": "fused", "kernel": "kernel"}


def set_path(module: nn.Module, path: str, args) -> None:
    """`qmm`: quantized_matmul at every size; `dequant`: mx.dequantize then a matmul from `--min-rows`
    rows; `fused`: the same with qmatmul's compiled dequantize graph; `kernel`: with qmatmul's own
    dequantize kernel (CUDA)."""
    if path == "qmm":
        qmatmul.choose_matmul(module, None)
    else:
        qmatmul.choose_matmul(module, args.min_rows, DEQUANTIZE_OF_PATH[path])


def largest_layer_gb(module: nn.Module, dtype) -> float:
    """The float size of the largest quantized layer: what one dequantize-then-matmul call adds."""
    sizes = [
        m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        for _, m in module.named_modules()
        if isinstance(m, nn.QuantizedLinear)
    ]
    return max(sizes, default=0) * dtype.size / 1e9


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
    """Random weights drawn on the device and quantized tensor by tensor, as the loader reads them, so
    building a quantized model never holds its float weights (peak memory stays near the quantized
    size). Norms keep their ones."""
    module = construct(component, size, variant)
    weights = []
    for name, p in tree_flatten(module.parameters()):
        if p.ndim >= 2:
            p = mx.random.normal(p.shape, dtype=dtype, scale=p.shape[-1] ** -0.5)
        p = p.astype(dtype)
        if should_quantize(component, name, p.shape, spec):
            parts = quantize_tensor(name, p, spec)
            mx.eval(list(parts.values()))
            weights += parts.items()
        else:
            mx.eval(p)
            weights.append((name, p))
    quantize_model_from_weights(module, [n for n, _ in weights], lambda path: spec)
    module.load_weights(weights, strict=True)
    mx.eval(module.parameters())
    return module


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
    weights = nbytes(flux) / 1e9
    for variant in args.variants:
        for path in args.paths if quant in QUANTS else ("float",):
            if budget.skip("step", f"{variant} {quant} {path}"):
                continue
            if quant in QUANTS:
                set_path(flux, path, args)
            try:
                _step_figure(flux, size, args, quant, variant, path, weights)
            except Exception as e:  # noqa: BLE001 - a path that fails (a custom kernel's build) is reported
                report(what="failed", section="step", quant=quant, path=path, error=str(e)[:600])


def _step_figure(flux, size: Size, args, quant: str, variant: str, path: str, weights: float) -> None:
    default = kernels.USE[qmatmul.backend()]
    for glue in args.glue:
        if glue == "kernels" and qmatmul.backend() != "cuda":
            continue  # the kernels are CUDA's
        kernels.USE[qmatmul.backend()] = glue == "kernels"
        try:
            for headroom in args.headrooms:
                _step_figure_at(flux, size, args, quant, variant, path, weights, headroom, glue)
        finally:
            kernels.USE[qmatmul.backend()] = default


def _glue_default() -> str:
    return "kernels" if kernels.enabled() else "ops"


def _step_figure_at(
    flux, size: Size, args, quant: str, variant: str, path: str, weights: float, headroom, glue: str
) -> None:
    """One step figure with MLX's queue bounded at `headroom` bytes over what is held (runtime.memory)."""
    x = step_inputs(flux, size, variant, args.dtype)
    t = time.perf_counter()
    pe = flux.positions(x["img_ids"], x["txt_ids"])
    mods = flux.modulations([1.0, 0.75, 0.5, 0.25], x["y"], mx.array([3.5]))
    mx.eval(pe, mods)
    prepare = time.perf_counter() - t
    mx.reset_peak_memory()
    # the graph is built in Python before it runs: its cost is part of every step
    t = time.perf_counter()
    flux.predict(x["img"], x["txt"], pe, mods[0])
    graph = time.perf_counter() - t
    with memory.bounded(headroom):
        r = timeit(lambda: flux.predict(x["img"], x["txt"], pe, mods[0]), args.warmup, args.steps)
    fig = dict(
        what="step",
        variant=variant,
        quant=_label(quant, args),
        path=path,
        glue=glue,
        headroom_gb=_headroom_gb(headroom),
        res=size.res,
        txt=size.txt[variant],
        **r,
        modulations_once_s=prepare,
        graph_build_s=graph,
        peak_gb=peak_gb(),
        weights_gb=weights,
    )
    # the memory bound for a quantized step: its weights, one layer dequantized, and the
    # activations of the float step (its peak over its weights)
    act = ACTIVATIONS_GB.get((variant, fig["headroom_gb"]))
    if quant == "bf16":
        ACTIVATIONS_GB[variant, fig["headroom_gb"]] = fig["peak_gb"] - weights
    elif act is not None:
        fig["bound_gb"] = weights + largest_layer_gb(flux, args.dtype) + act
        fig["within_bound"] = fig["peak_gb"] <= fig["bound_gb"]
    report(**fig)


ACTIVATIONS_GB: dict[tuple, float] = {}  # (variant, headroom) -> the bf16 step's peak over its weights


def _headroom_gb(headroom) -> float | None:
    """The bound actually applied, in GB of 2**30 bytes (None: MLX's own limit)."""
    h = memory.default_headroom() if headroom == "auto" else headroom
    return None if h is None else h / memory.GB


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


def section_qmatmul(size: Size, args, budget: Budget) -> None:
    """One layer's product at FLUX's and T5's shapes, for 1 row up to the step's tokens: the float
    matmul, MLX's quantized_matmul and dequantize-then-matmul, at 8 and 4 bits. It shows where each
    path wins (the crossover that `qmatmul.MIN_ROWS` encodes) and what the first call costs (kernels
    built at run time)."""
    p = FluxParams.from_diffusers_config({**size.flux, "guidance_embeds": False})
    D, F = p.hidden_size, size.t5.d_ff
    shapes = {
        "linear1": (D, 7 * D),
        "linear2": (5 * D, D),
        "qkv": (D, 3 * D),
        "t5_wi": (size.t5.d_model, F),
        "t5_wo": (F, size.t5.d_model),
    }
    tokens = (size.res // 16) ** 2 + size.txt["schnell"]
    rows_list = sorted({1, 8, 32, 77, size.txt["schnell"], size.txt["dev"], tokens})
    # each of qmatmul's own dequantizes that applies here (the kernel is CUDA's only)
    ours = {"fused": _fused, "kernel": kernels.dequantize}
    ours = {k: f for k, f in ours.items() if k in args.paths and (k != "kernel" or kernels.enabled())}
    for layer, (k, n) in shapes.items():
        w = mx.random.normal((n, k), dtype=args.dtype, scale=k**-0.5)
        packed = {b: mx.quantize(w, 64, b) for b in (8, 4)}
        mx.eval(w, packed)
        for rows in rows_list:
            if budget.skip("qmatmul", f"{layer} {rows}"):
                return
            x = mx.random.normal((1, rows, k)).astype(args.dtype)
            mx.eval(x)
            fig = {"float": timeit(lambda x=x, w=w: x @ w.T, args.warmup, args.steps * 2)}
            for b, (q, sc, bi) in packed.items():
                fig[f"q{b}_qmm"] = timeit(
                    lambda x=x, q=q, sc=sc, bi=bi, b=b: mx.quantized_matmul(x, q, sc, bi, True, 64, b),
                    args.warmup,
                    args.steps * 2,
                )
                fig[f"q{b}_dequant"] = timeit(
                    lambda x=x, q=q, sc=sc, bi=bi, b=b: x @ mx.dequantize(q, sc, bi, 64, b, dtype=x.dtype).T,
                    args.warmup,
                    args.steps * 2,
                )
                for name, fn in list(ours.items()):
                    if not _dequantize_figures(
                        fig, args, name, fn, x, w, q, sc, bi, b, layer, rows == rows_list[0]
                    ):
                        del ours[name]
            report(
                what="qmatmul",
                layer=layer,
                k=k,
                n=n,
                rows=rows,
                **{f"{name}_ms": r["s"] * 1e3 for name, r in fig.items()},
                **{f"{name}_first_s": r["first_s"] for name, r in fig.items()},
                q8_faster="dequant" if fig["q8_dequant"]["s"] < fig["q8_qmm"]["s"] else "qmm",
                q4_faster="dequant" if fig["q4_dequant"]["s"] < fig["q4_qmm"]["s"] else "qmm",
            )
        free()


def _fused(q, scales, biases, group_size: int, bits: int) -> mx.array:
    """qmatmul's fused dequantize where it applies (8 bits), mx.dequantize otherwise (as the layers do)."""
    if bits == 8:
        return qmatmul.dequantize_fused(q, scales, biases, group_size)
    return mx.dequantize(q, scales, biases, group_size, bits)


def _dequantize_figures(
    fig: dict, args, name: str, fn, x, w, q, sc, bi, b: int, layer: str, compare: bool
) -> bool:
    """qmatmul's dequantize `fn` (`name`: "fused" or "kernel") then a matmul into `fig`; with `compare`,
    the weight's dequantize alone, timed against mx.dequantize, and how far apart they are. False
    (reported) if it fails to build or run."""
    try:
        fig[f"q{b}_{name}"] = timeit(lambda: x @ fn(q, sc, bi, 64, b).T, args.warmup, args.steps * 2)
        if compare:
            ours, theirs = fn(q, sc, bi, 64, b), mx.dequantize(q, sc, bi, 64, b)
            report(
                what="dequantize",
                path=name,
                layer=layer,
                bits=b,
                max_diff=float(mx.abs(ours.astype(mx.float32) - theirs.astype(mx.float32)).max()),
                differing=int((ours != theirs).sum()),
                # how mx.dequantize rounds `scale * q + bias`: once (a fused multiply-add) or after each op
                **_rounding_of(q, sc, bi, b, theirs),
                mlx_ms=timeit(lambda: mx.dequantize(q, sc, bi, 64, b), args.warmup, args.steps * 2)["s"]
                * 1e3,
                ours_ms=timeit(lambda: fn(q, sc, bi, 64, b), args.warmup, args.steps * 2)["s"] * 1e3,
                weights_gb=(q.nbytes + sc.nbytes + bi.nbytes) / 1e9,
                float_gb=w.nbytes / 1e9,
            )
        return True
    except Exception as e:  # noqa: BLE001
        report(what="failed", section="qmatmul", path=name, error=str(e)[:600])
        return False


def _rounding_of(q, scales, biases, bits: int, dequantized: mx.array) -> dict:
    """How many of `dequantized`'s values differ from `scale * q + bias` rounded once to its dtype, and
    from the same rounded after the product and again after the sum."""
    ones = mx.ones(scales.shape, mx.float32)
    values = mx.dequantize(q, ones, mx.zeros_like(ones), 64, bits, dtype=mx.float32)  # q itself, exact
    s = mx.repeat(scales, 64, axis=-1)
    b = mx.repeat(biases, 64, axis=-1)
    once = (s.astype(mx.float32) * values + b.astype(mx.float32)).astype(s.dtype)
    product = s * values.astype(s.dtype)
    mx.eval(product)  # its own kernel, rounded to the dtype before the sum
    twice = product + b
    return {
        "differing_from_rounded_once": int((dequantized != once).sum()),
        "differing_from_rounded_twice": int((dequantized != twice).sum()),
    }


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
        path="qmm"
        if qmatmul.default_min_rows() is None
        else f"backend (dequant from {qmatmul.default_min_rows()} rows)",
        mode=spec.mode,
        bits=spec.bits,
        group_size=spec.group_size,
        tokens=x.shape[1],
        ms=r["s"] * 1e3,
        vs_bf16=r["s"] / bf16_s,
        vs=_dtype_name(args.dtype),  # what vs_bf16 is against: the float pass, fp32 on a CPU
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
    q, k, v = kernels.qk_rope([block.norm.stream(h)], p.num_heads, pe, layers.qk_rope_ops)
    cat = kernels.gelu_concat(layers.attention(q, k, v), h, 3 * D, layers._concat_act)
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
    weights = (nbytes(t5) + nbytes(clip)) / 1e9
    clip_ids = mx.random.randint(0, size.clip.vocab_size, (1, size.clip.max_position_embeddings))
    for path in args.paths if spec else ("float",):
        if spec:
            set_path(t5, path, args)
            set_path(clip, path, args)
        for variant in args.variants:
            ids = mx.random.randint(0, size.t5.vocab_size, (1, size.txt[variant]))
            mx.reset_peak_memory()
            r = timeit(lambda ids=ids: [t5(ids), clip(clip_ids)[1]], args.warmup, args.steps)
            report(
                what="encode",
                quant=_label(quant, args),
                path=path,
                variant=variant,
                txt=size.txt[variant],
                **r,
                peak_gb=peak_gb(),
                weights_gb=weights,
            )


def section_decode(size: Size, args, budget: Budget) -> None:
    """The VAE decode, whole-tensor layers (`band_mb` 0, the old path) against row bands (the default),
    with each one's peak over its weights and the largest pixel difference between them."""
    free()
    vae = build("vae", size, args.dtype, None)
    weights = nbytes(vae) / 1e9
    res = args.res or size.res
    z = mx.random.normal((1, res // 8, res // 8, size.vae.latent_channels)).astype(args.dtype)
    mx.eval(z)
    images = {}
    for band_mb in args.band_mb:
        for headroom in args.headrooms:
            if budget.skip("decode", f"band {band_mb} MB, headroom {headroom}"):
                continue
            free()
            band = band_mb * 2**20 if band_mb else None
            with memory.bounded(headroom):
                r = timeit(
                    lambda band=band: vae.decode(z, band_bytes=band),
                    max(1, args.warmup - 1),
                    max(1, args.steps // 2),
                )
            peak = peak_gb()
            if band_mb not in images:
                images[band_mb] = mx.clip(vae.decode(z, band_bytes=band).astype(mx.float32) / 2 + 0.5, 0, 1)
                mx.eval(images[band_mb])
            report(
                what="decode",
                res=res,
                band_mb=band_mb,
                headroom_gb=_headroom_gb(headroom),
                **r,
                peak_gb=peak,
                weights_gb=weights,
                over_weights_gb=peak - weights,
            )
    if 0 not in images:
        return
    # the same decoder at float32, whole-tensor and in the widest bands: how far the dtype's rounding
    # alone moves the pixels, so the bands' difference can be read against it
    if args.dtype != mx.float32 and not budget.skip("decode", "float32 reference"):
        free()
        vae.update(tree_map(lambda p: p.astype(mx.float32), vae.parameters()))
        z32 = z.astype(mx.float32)
        for band_mb in [0, *sorted(b for b in images if b)[-1:]]:
            img = vae.decode(z32, band_bytes=band_mb * 2**20 if band_mb else None).astype(mx.float32)
            images[f"{band_mb}-float32"] = mx.clip(img / 2 + 0.5, 0, 1)
            mx.eval(images[f"{band_mb}-float32"])
    reference = images.get("0-float32")
    for name, img in images.items():
        if name != 0:
            report(what="decode_diff", res=res, band_mb=name, against="whole", **_pixel_diff(img, images[0]))
        if reference is not None and name != "0-float32":
            diff = _pixel_diff(img, reference)
            report(what="decode_diff", res=res, band_mb=name, against="whole_float32", **diff)


def _pixel_diff(a: mx.array, b: mx.array) -> dict:
    """Two images in [0, 1]: their largest and mean difference in 1/255 steps, and the share of 8-bit
    pixel values (as the pipeline rounds them) that differ, by more than 1 and at all."""
    d = mx.abs(a - b) * 255
    d8 = mx.abs(mx.round(a * 255) - mx.round(b * 255))
    return {
        "max_diff_255": d.max().item(),
        "mean_diff_255": d.mean().item(),
        "share_8bit_over_1": (d8 > 1).mean().item(),
        "share_8bit_differ": (d8 > 0).mean().item(),
    }


class _Phases:
    """Seconds and MLX's allocator peak per phase of one generation; the peak is reset as each starts."""

    def __init__(self):
        self.figures: dict[str, dict] = {}

    def __call__(self, name: str):
        phases = self

        class _Phase:
            def __enter__(self):
                gc.collect()
                mx.clear_cache()
                mx.reset_peak_memory()
                self.start = mx.get_active_memory() / 1e9
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                mx.synchronize()
                s = time.perf_counter() - self.t
                phases.figures[name] = {"s": s, "peak_gb": peak_gb(), "start_gb": self.start}

        return _Phase()


class _Source:
    """Where the pipeline section's modules come from: a model folder (`--folder`, Hugging Face layout
    or MLX-native, read by mflux's loader) or random weights built on the device."""

    def __init__(self, size: Size, args, spec: QuantSpec | None):
        self.size, self.args, self.spec = size, args, spec
        self.folder = None
        if args.folder:
            from mflux.folders import open_folder

            self.folder = open_folder(args.folder)
        self.variant = self.folder.variant if self.folder else "schnell"
        d = self.folder.defaults if self.folder else {"max_sequence_length": size.txt["schnell"]}
        self.txt_len = d["max_sequence_length"]
        self.res = args.res or size.res

    def module(self, component: str) -> nn.Module:
        if self.folder is None:
            return build(component, self.size, self.args.dtype, self.spec, self.variant)
        from mflux.runtime.loader import load_component

        stored = self.folder.quant_spec(component)
        return load_component(self.folder, component, self.args.dtype, None if stored else self.spec)

    def token_ids(self) -> tuple:
        if self.folder is None or not (self.folder.path / "tokenizer").is_dir():  # the load section's models
            clip_ids = mx.random.randint(
                0, self.size.clip.vocab_size, (1, self.size.clip.max_position_embeddings)
            )
            return clip_ids, mx.random.randint(0, self.size.t5.vocab_size, (1, self.txt_len))
        from mflux.runtime.tokenizers import clip_ids, load_tokenizers, t5_ids

        clip_tok, t5_tok = load_tokenizers(self.folder.path)
        prompt = ["Luxury food photograph of a chocolate cake on a marble table"]
        return clip_ids(clip_tok, prompt), t5_ids(t5_tok, prompt, self.txt_len)

    def sigmas(self, steps: int) -> list[float]:
        # the folder's defaults carry dev's shift settings, as Flux1 passes them to the engine
        d = self.folder.defaults if self.folder else {}
        return engine.schedule(steps, (self.res // 16) ** 2, d if d.get("use_dynamic_shifting") else None)


def section_pipeline(size: Size, args, budget: Budget) -> None:
    for quant in args.quants:
        if not budget.skip("pipeline", quant):
            free()
            _pipeline_run(size, args, quant)


def _pipeline_run(size: Size, args, quant: str) -> None:
    """`--images` images as `mflux run` makes them, phase by phase: load T5 and CLIP, encode, free them;
    load the transformer, compute every image's modulations and free the layers behind them, denoise
    every image; free the transformer (unless `--keep-transformer`), load
    the VAE, decode. The first image pays for building kernels; later ones show the warm figure."""
    src = _Source(size, args, QUANTS.get(quant))
    ph = _Phases()
    res, steps, n = src.res, args.pipeline_steps, args.images
    guidance = 3.5 if src.variant == "dev" else None
    # as Flux1 does: the compiled graphs' kernels are built by children, and every phase runs
    # uncompiled until they are done (warmup.compile_when_ready)
    warm = warmup.start(args.dtype) if args.kernel_warmup == "on" else None
    uncompiled = []  # the phases that ran uncompiled
    with ph("load_text"):
        t5, clip = src.module("text_encoder_2"), src.module("text_encoder")
    clip_ids, t5_ids = src.token_ids()
    # as Flux1 does where memory allows: the transformer is read in a thread while the prompt encodes
    overlap = _overlap_load(args, src)
    pending = None
    if overlap:
        pool = ThreadPoolExecutor(1, thread_name_prefix="bench-prefetch")
        pending = pool.submit(src.module, "transformer")
        pool.shutdown(wait=False)
    conds = []
    for i in range(n):
        with ph(f"encode_{i}"):
            cond = engine.encode_prompt(clip, t5, clip_ids, t5_ids, args.dtype)
            mx.eval(cond)
        conds.append(cond)
    weights = {"text": (nbytes(t5) + nbytes(clip)) / 1e9}
    del t5, clip  # the prompt is encoded: free T5 and CLIP before the transformer loads
    with ph("load_transformer"):
        flux = pending.result() if pending else src.module("transformer")
        del pending  # else it holds the transformer through the decode
    weights["transformer"] = nbytes(flux) / 1e9
    sigmas = src.sigmas(steps)
    # as `mflux run` does (free_modulation_weights): every image's modulations first, then the layers
    # behind them (3.2B parameters at full size) are dropped before the first step
    with (
        ph("modulate"),
        _compiling(warm, "modulate", uncompiled),
        memory.bounded("tight" if args.headrooms[0] == "auto" else args.headrooms[0]),
    ):
        mods = [engine.modulations(flux, pooled, sigmas, guidance, evaluate=True) for _, pooled in conds]
        mx.eval(mods)
        flux.free_modulation_weights()
        mx.clear_cache()
    weights["denoiser"] = nbytes(flux) / 1e9
    latents = []
    for i, (txt, _) in enumerate(conds):
        with ph(f"denoise_{i}"), _compiling(warm, f"denoise_{i}", uncompiled):
            noise = sampler.noise(i, res, res).astype(args.dtype)
            for x in engine.denoise(flux, txt, noise, sigmas, res, res, mods[i]):
                memory.evaluate(x, headroom=args.headrooms[0])
        latents.append(x)
    if not args.keep_transformer:
        del flux  # every image is denoised: the decode needs only the VAE
    with ph("load_vae"):
        vae = src.module("vae")
    weights["vae"] = nbytes(vae) / 1e9
    for i, x in enumerate(latents):
        with ph(f"decode_{i}"), _compiling(warm, f"decode_{i}", uncompiled):
            engine.decode(vae, x, res, res)  # evaluated: it returns the uint8 pixels
    f = ph.figures
    image = [f[f"encode_{i}"]["s"] + f[f"denoise_{i}"]["s"] + f[f"decode_{i}"]["s"] for i in range(n)]
    image[0] += f["modulate"]["s"]  # every image's modulations, computed before the first step
    load = sum(f[k]["s"] for k in ("load_text", "load_transformer", "load_vae"))
    report(
        what="pipeline",
        source=args.folder and src.folder.format or "random",
        quant=_label(quant, args),
        res=res,
        steps=steps,
        txt=src.txt_len,
        kept_transformer=args.keep_transformer,
        overlap_load=overlap,
        kernel_warmup_children=len(warm.procs) if warm else 0,
        uncompiled_phases=uncompiled,
        load_s=load,
        first_image_s=image[0],
        load_plus_first_s=load + image[0],
        **({"second_image_s": image[1], "step_s": f["denoise_1"]["s"] / steps} if n > 1 else {}),
        peak_gb=max(v["peak_gb"] for v in f.values()),
        **{f"{k}_s": v["s"] for k, v in f.items()},
        **{f"{k}_peak_gb": v["peak_gb"] for k, v in f.items()},
        # what was held when each phase began: shows T5/CLIP and the transformer freed in time
        **{f"{k}_start_gb": v["start_gb"] for k, v in f.items()},
        **{f"{k}_weights_gb": v for k, v in weights.items()},
    )


@contextmanager
def _compiling(warm, phase: str, uncompiled: list):
    with warmup.compile_when_ready(warm) as cold:
        if cold:
            uncompiled.append(phase)
        yield


def _overlap_load(args, src) -> bool:
    if args.overlap_load != "auto":
        return args.overlap_load == "on"
    if src.folder is None:
        return False  # random weights are drawn, not read: nothing to overlap
    return loader.may_overlap(src.folder, src.spec)


def section_firstrun(size: Size, args, budget: Budget) -> None:
    """A fresh process with an empty kernel cache, then a fresh process with the cache it left, each
    running the pipeline section (load + two images). MLX's CUDA backend compiles its fused
    (`mx.compile`) and JIT kernels with NVRTC on first use and keeps them in MLX_PTX_CACHE_DIR
    (default `$TMPDIR/mlx/<version>/ptx`); the count of modules it wrote says how many were built.
    `--ptx-cache DIR` keeps the caches (DIR/<quant>) for a later run's `--caches warm`."""
    root = (
        Path(args.ptx_cache) if args.ptx_cache else Path(tempfile.mkdtemp(prefix="mflux-ptx-", dir=args.tmp))
    )
    try:
        for quant in args.quants:
            cache = root / quant
            for state in args.caches:
                if budget.skip("firstrun", f"{quant} {state}"):
                    continue
                if state == "empty":
                    shutil.rmtree(cache, ignore_errors=True)
                before = _cached(cache)
                figs = _child_pipeline(size, args, quant, cache, budget)
                # the warm-up's children outlive the run: wait for them before the next one
                t = time.perf_counter()
                while list(cache.glob(warmup.STAGING + "*")) and time.perf_counter() - t < 120:
                    time.sleep(0.1)
                after = time.perf_counter() - t
                built = _cached(cache) - before
                for r in figs:
                    report(
                        **{**r, "what": "firstrun", "cache": state, "modules_built": len(built)},
                        children_after_s=after,
                    )
                if built:
                    kinds = sorted({b.split("_")[0] for b in built})
                    report(
                        what="firstrun_kernels",
                        quant=_label(quant, args),
                        cache=state,
                        built=len(built),
                        kinds=kinds[:40],
                    )
    finally:
        if not args.ptx_cache:
            shutil.rmtree(root, ignore_errors=True)


def _cached(cache: Path) -> set[str]:
    return {p.stem for p in cache.glob("*.ptx")} if cache.exists() else set()


def _child_pipeline(size: Size, args, quant: str, cache: Path, budget: Budget) -> list[dict]:
    import os
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--sections", "pipeline"]
    cmd += ["--quant", quant, "--images", "2", "--dtype", DTYPE_ARGS[_dtype_name(args.dtype)]]
    cmd += ["--folder", args.folder] if args.folder else []
    cmd += ["--res", str(args.res)] if args.res else []
    cmd += ["--headroom", args.headroom.split(",")[0], "--kernel-warmup", args.kernel_warmup]
    cmd += ["--load-threads", str(args.load_threads)] if args.load_threads else []
    cmd += ["--load-stream", args.load_stream]
    cmd += ["--overlap-load", args.overlap_load]
    # the driver's own cache of compiled kernels lives beside MLX's, so "empty" empties both
    env = {**os.environ, "MLX_PTX_CACHE_DIR": str(cache), "CUDA_CACHE_PATH": str(cache / "nv")}
    left = max(10.0, budget.section_end - time.monotonic())
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        report(what="failed", section="firstrun", quant=quant, why="timeout")
        return []
    figs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"what": "pipeline"')]
    if out.returncode or not figs:
        report(what="failed", section="firstrun", quant=quant, rc=out.returncode, stderr=out.stderr[-800:])
    return figs


def _passes(module) -> float:
    """Seconds of the second of two GPU passes that read every parameter of a loaded module once (a
    reduction each): what a step pays to read those weights, where they lie (device or managed memory)."""
    arrays = [a for _, a in tree_flatten(module.parameters()) if a.size]
    seconds = 0.0
    for _ in range(2):
        t = time.perf_counter()
        mx.eval([mx.max(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for a in arrays])
        mx.synchronize()
        seconds = time.perf_counter() - t
    return seconds


def section_load(size: Size, args, budget: Budget) -> None:
    """Write an MLX-native model (the converter's layout: one folder of shards per component) with
    random weights to local disk, then time the loader reading it back, component by component."""
    from mflux.runtime import loader
    from mflux.runtime.folder import COMPONENTS, ModelFolder
    from mflux.runtime.loader import load_component
    from mflux.runtime.weights import save_shards

    root = (
        Path(args.keep_model)
        if args.keep_model
        else Path(tempfile.mkdtemp(prefix="mflux-bench-", dir=args.tmp))
    )
    architecture = {
        "transformer": {**size.flux, "guidance_embeds": False},
        "text_encoder": vars(size.clip),
        "text_encoder_2": vars(size.t5),
        "vae": {**vars(size.vae), "block_out_channels": list(size.vae.block_out_channels)},
        # schnell's FlowMatchEulerDiscreteScheduler, so a kept model's manifest is complete
        "scheduler": {
            "shift": 1.0,
            "use_dynamic_shifting": False,
            "base_image_seq_len": 256,
            "max_image_seq_len": 4096,
        },
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
            own = {v: k for k, v in WAYS.items()}[loader.LOAD_STREAM[qmatmul.backend()]]
            ways = [
                (t, w)
                for t in args.read_threads or [loader.LOAD_THREADS[qmatmul.backend()]]
                for w in args.load_ways or [own]
            ]
            for threads, way in ways:
                loader.LOAD_THREADS[qmatmul.backend()], seconds = threads, {}
                loader.LOAD_STREAM[qmatmul.backend()] = WAYS[way]
                free()
                passes = {}
                for c in COMPONENTS:
                    t = time.perf_counter()
                    module = load_component(mf, c, args.dtype)
                    seconds[c] = time.perf_counter() - t
                    passes[c] = _passes(module)
                    del module
                report(
                    what="load",
                    quant=_label(quant, args),
                    threads=threads,
                    stream=way,
                    s=sum(seconds.values()),
                    **{f"{c}_s": v for c, v in seconds.items()},
                    gb=sum(sizes.values()) / 1e9,
                    **{f"{c}_gb": v / 1e9 for c, v in sizes.items()},
                    **{f"{c}_pass_s": v for c, v in passes.items()},
                    peak_gb=peak_gb(),
                )
            loader.LOAD_STREAM[qmatmul.backend()] = WAYS[own]
            for c in COMPONENTS:
                params = params_count(construct(c, size))
                report(
                    what="bytes_per_param",
                    quant=_label(quant, args),
                    component=c,
                    bytes_per_param=sizes[c] / params,
                )
            if args.keep_model:
                mf.dtype = args.dtype
                _write_manifest(mf, spec)
            else:
                shutil.rmtree(folder)
    finally:
        if not args.keep_model:
            shutil.rmtree(root, ignore_errors=True)


def _write_manifest(mf, spec: QuantSpec | None) -> None:
    """Leave the MLX-native model as a store would (a manifest.toml), so `--folder` can load it."""
    from mflux.manifest import Manifest, defaults_for, write_manifest

    quantization = (
        {c: spec.to_dict() for c in ("transformer", "text_encoder", "text_encoder_2")} if spec else None
    )
    # no file hashes: hashing 34 GB would cost more device time than the load being measured
    man = Manifest(
        name=mf.name,
        variant=mf.variant,
        format="mlx",
        dtype=DTYPE_ARGS[_dtype_name(mf.dtype)],
        source={"kind": "path", "path": str(mf.path)},
        files=[],
        architecture=mf.architecture,
        defaults=defaults_for(mf.variant, mf.architecture),
        quantization=quantization,
    )
    write_manifest(mf.path, man)


def _label(quant: str, args) -> str:
    return _dtype_name(args.dtype) if quant == "bf16" else quant


DTYPE_ARGS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dtype_name(dtype) -> str:
    return {mx.bfloat16: "bf16", mx.float16: "fp16", mx.float32: "fp32"}[dtype]


# ---------------------------------------------------------------- the table


def table() -> str:
    rows = ["", "| figure | setting | time | first call | peak GB | other |", "|---|---|---|---|---|---|"]
    for r in RESULTS:
        what = r["what"]
        queue = f", queue {_bound_label(r['headroom_gb'])}" if "headroom_gb" in r else ""
        if what == "step":
            bound = f", bound {r['bound_gb']:.2f} GB" if "bound_gb" in r else ""
            rows.append(
                f"| step {r['variant']} {r['res']}px, {r['txt']} txt | {r['quant']} {r['path']}{queue} | {r['s']:.4f} s | {r['first_s']:.2f} s | {r['peak_gb']:.2f} | weights {r['weights_gb']:.2f} GB{bound}, graph {r['graph_build_s'] * 1e3:.1f} ms |"
            )
        elif what == "qmatmul":
            rows.append(
                f"| {r['layer']} {r['k']}->{r['n']}, {r['rows']} rows | float / q8 qmm, dequant / q4 qmm, dequant | {r['float_ms']:.3f} / {r['q8_qmm_ms']:.3f}, {r['q8_dequant_ms']:.3f} / {r['q4_qmm_ms']:.3f}, {r['q4_dequant_ms']:.3f} ms | | | faster: q8 {r['q8_faster']}, q4 {r['q4_faster']} |"
            )
        elif what in ("pipeline", "firstrun"):
            second = f", second image {r['second_image_s']:.2f} s" if "second_image_s" in r else ""
            phases = ", ".join(f"{k[:-8]} {v:.2f}" for k, v in r.items() if k.endswith("_peak_gb"))
            rows.append(
                f"| {what} {r['source']} {r.get('cache', '')} | {r['quant']} | load {r['load_s']:.2f} s + first image {r['first_image_s']:.2f} s | | {r['peak_gb']:.2f} | {second.lstrip(', ')}; peaks GB: {phases} |"
            )
        elif what == "lever":
            rows.append(f"| lever: {r['lever']} | {r['variant']} | {r['s']:.4f} s | | | |")
        elif what == "single_block" and "ms" in r:
            extra = f"{r['vs_bf16']:.2f}x {r.get('vs', 'bf16')}, " if "vs_bf16" in r else ""
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
                f"| encode T5+CLIP, {r['txt']} tok | {r['quant']} {r['path']} | {r['s']:.4f} s | {r['first_s']:.2f} s | {r['peak_gb']:.1f} | weights {r['weights_gb']:.1f} GB |"
            )
        elif what == "decode":
            rows.append(
                f"| VAE decode {r['res']}px | bands {r['band_mb']} MB{queue} | {r['s']:.4f} s | {r['first_s']:.2f} s | {r['peak_gb']:.2f} | {r['over_weights_gb']:.2f} GB over its weights |"
            )
        elif what == "decode_diff":
            rows.append(
                f"| VAE decode {r['res']}px, bands {r['band_mb']} MB vs {r.get('against', 'whole')} | | | | | "
                f"max diff {r['max_diff_255']:.2f}/255, mean {r.get('mean_diff_255', float('nan')):.3f}/255 |"
            )
        elif what == "failed":
            rows.append(
                f"| failed: {r.get('section')} {r.get('quant', '')} | | | | | {r.get('why', r.get('rc'))} |"
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


def _bound_label(headroom_gb: float | None) -> str:
    return "unbounded" if headroom_gb is None else f"+{headroom_gb:g} GB"


def parse_headroom(h: str):
    """A --headroom value as `memory.bounded` takes it: a name ("auto", "tight", "train"), none, or GB."""
    named = {"auto": "auto", "tight": "tight", "train": "train", "none": None}
    return named[h] if h in named else int(float(h) * memory.GB)


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
    parser.add_argument(
        "--glue",
        default=None,
        help="step: the transformer's glue around attention, kernels (runtime.kernels, CUDA) and/or ops"
        " (MLX's ops), in one process (default: the backend's)",
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
    parser.add_argument(
        "--variants", default="schnell,dev", help="step/encode shapes: schnell (256 text tokens), dev (512)"
    )
    parser.add_argument(
        "--paths", default=",".join(PATHS), help="quantized matmul paths to time: qmm, dequant, fused, kernel"
    )
    parser.add_argument(
        "--min-rows",
        type=int,
        default=qmatmul.MIN_ROWS["cuda"],
        help="rows from which the dequant path dequantizes (default: CUDA's choice)",
    )
    parser.add_argument(
        "--band-mb", default="0,256", help="decode: row-band sizes in MB to time (0: whole-tensor layers)"
    )
    parser.add_argument(
        "--headroom",
        default="auto",
        help="step/decode/pipeline: MLX's queue bound in GB over what is held, comma-separated "
        "(auto: the backend's, mflux.runtime.memory.HEADROOM; none: no bound); pipeline takes the first",
    )
    parser.add_argument("--images", type=int, default=1, help="pipeline: images per run (2 shows a warm one)")
    parser.add_argument("--pipeline-steps", type=int, default=4, help="pipeline: denoising steps per image")
    parser.add_argument(
        "--keep-transformer", action="store_true", help="pipeline: keep the transformer during the decode"
    )
    parser.add_argument(
        "--load-stream",
        choices=("default", *WAYS),
        default="default",
        help="load/pipeline/firstrun: where mx.load reads when a load only reads (loader.LOAD_STREAM): gpu "
        "(the default stream), cpu (MLX's CPU stream, each group then moved onto the device), cpu-copy (then "
        "copied into the device's own memory); default: the backend's",
    )
    parser.add_argument(
        "--load-ways",
        default="",
        help="load: the ways mx.load reads (--load-stream's gpu, cpu, cpu-copy), each timed in turn "
        "(default: the backend's way alone)",
    )
    parser.add_argument(
        "--read-threads",
        default="",
        help="load: the loader's thread counts to time the read with, one after another (default: LOAD_THREADS)",
    )
    parser.add_argument(
        "--load-threads",
        type=int,
        default=None,
        help="pipeline/firstrun: the loader's threads (LOAD_THREADS)",
    )
    parser.add_argument(
        "--kernel-warmup",
        choices=("on", "off"),
        default="on",
        help="pipeline/firstrun: build the compiled graphs' kernels in children, running uncompiled until they are done, as Flux1 does "
        "(mflux.runtime.warmup; CUDA only, and only where the kernel cache lacks them)",
    )
    parser.add_argument(
        "--overlap-load",
        choices=("auto", "on", "off"),
        default="auto",
        help="pipeline/firstrun: read the transformer in a thread while the prompt encodes, as Flux1 does "
        "(auto: where mflux.runtime.loader.may_overlap says so; never for random weights, which are drawn, not read)",
    )
    parser.add_argument("--caches", default="empty,warm", help="firstrun: cache states to run, in order")
    parser.add_argument(
        "--ptx-cache", default=None, help="firstrun: keep the kernel caches here (DIR/<quant>)"
    )
    parser.add_argument(
        "--keep-model", default=None, help="load: write the MLX-native models here and keep them"
    )
    parser.add_argument(
        "--folder", default=None, help="pipeline/firstrun: a model folder to load (default: random)"
    )
    parser.add_argument(
        "--res", type=int, default=None, help="pipeline/firstrun/decode: image side (default: the size's)"
    )
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.paths = [p for p in args.paths.split(",") if p]
    args.glue = [g for g in (args.glue or _glue_default()).split(",") if g]
    if not set(args.glue) <= {"kernels", "ops"}:
        parser.error("--glue takes kernels, ops")
    if args.load_threads:
        loader.LOAD_THREADS[qmatmul.backend()] = args.load_threads
    if args.load_stream != "default":
        loader.LOAD_STREAM[qmatmul.backend()] = WAYS[args.load_stream]
    args.read_threads = [int(t) for t in args.read_threads.split(",") if t]
    args.load_ways = [w for w in args.load_ways.split(",") if w]
    if not set(args.load_ways) <= set(WAYS):
        parser.error(f"--load-ways takes {', '.join(WAYS)}")
    args.band_mb = [int(b) for b in args.band_mb.split(",") if b]
    args.caches = [c for c in args.caches.split(",") if c]
    args.headrooms = [parse_headroom(h) for h in args.headroom.split(",") if h]
    if not set(args.paths) <= set(PATHS) or not set(args.variants) <= {"schnell", "dev"}:
        parser.error(f"--paths takes {', '.join(PATHS)}; --variants takes schnell, dev")
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
        glue_kernels=kernels.status(),
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
