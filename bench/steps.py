"""Transformer step times (bf16, q8, q4), the quantized matmul against the float one, and the VAE decode,
on random weights of FLUX.1's architecture, built on the device (nothing is read or downloaded).

    python bench/steps.py --size full                                   # a CUDA GPU or a Mac: every figure
    python bench/steps.py --size full --what step --tune kernels=true,false
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python bench/steps.py --size mid --what step --anchor           # a Linux CPU, against diffusers

step: one `Flux.predict` at the schnell (256 text tokens) and dev (512) shapes, with the modulations
computed once per generation as the engine does them; `s` is the mean of --steps evaluated steps after
--warmup, `first_s` the first call (kernels built at run time on CUDA). A quantized step also prints the
bound it should stay under: its weights, one dequantized layer, and the float step's activations.
matmul: one layer's product at FLUX's shapes from 1 row to the step's tokens: the float matmul, MLX's
quantized_matmul, and dequantize-then-matmul (on CUDA also the fused 8-bit dequantize).
decode: the VAE decode, whole-tensor (--band-mb 0) and in row bands, its peak over its weights, and how
far each banded image is from the whole one.
--anchor: diffusers' transformer step at the same size and shapes, after the step section, in a child
process with PyTorch (on its GPU if it has one; on a CPU without LD_PRELOAD, since OpenBLAS preloaded
for MLX slows PyTorch down).
"""

import argparse
import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
from common import (
    QUANTS,
    SIZES,
    add_model_arguments,
    build,
    cuda,
    finish,
    free,
    label,
    nbytes,
    parser,
    peak_gb,
    report,
    report_env,
    split,
    table,
    timeit,
    tuned,
    tuning,
    use_tuned_matmul,
)
from flux_sizes import FLUX, RES, TXT

from mflux.runtime import sampler
from mflux.runtime.model import FluxParams

SECTIONS = ("step", "matmul", "decode")
LAYERS = ("linear1", "linear2", "qkv")


def section_step(size, args) -> None:
    float_activations = {}  # (variant, tuning) -> the float step's peak over its weights
    for quant in args.quants:
        free()
        # one dev-sized network times both shapes: dev's guidance only enters the modulations
        flux = build("transformer", size, args.dtype, QUANTS.get(quant), "dev")
        weights = nbytes(flux) / 1e9
        for variant in args.variants:
            x = step_inputs(flux, size, variant, args.dtype)
            for tune in args.tunings:
                with tuned(tune):
                    use_tuned_matmul(flux)
                    mx.reset_peak_memory()
                    r = timeit(lambda x=x, f=flux: f.predict(*x), args.warmup, args.steps)
                fig = dict(what="step", variant=variant, quant=label(quant, args.dtype), res=size.res)
                fig.update(txt=size.txt[variant], **r, peak_gb=peak_gb(), weights_gb=weights, **tuning(tune))
                key = (variant, json.dumps(tune, sort_keys=True))
                if quant == "bf16":
                    float_activations[key] = fig["peak_gb"] - weights
                elif key in float_activations:
                    fig["bound_gb"] = weights + largest_layer_gb(flux, args.dtype) + float_activations[key]
                report(**fig)
        del flux


def step_inputs(flux, size, variant: str, dtype) -> tuple:
    """(img, txt, pe, mod): a step's packed latents, text, rotary tables and modulations."""
    p, n = flux.params, size.txt[variant]
    img = mx.random.normal((1, (size.res // 16) ** 2, p.in_channels)).astype(dtype)
    txt = mx.random.normal((1, n, p.context_in_dim)).astype(dtype)
    pe = flux.positions(sampler.image_ids(size.res, size.res), sampler.text_ids(n))
    mod = flux.modulations([1.0], mx.random.normal((1, p.vec_in_dim)).astype(dtype), mx.array([3.5]))[0]
    mx.eval(img, txt, pe, mod)
    return img, txt, pe, mod


def largest_layer_gb(module: nn.Module, dtype) -> float:
    """The float size of the largest quantized layer: what one dequantize-then-matmul call adds."""
    sizes = [
        m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
        for _, m in module.named_modules()
        if isinstance(m, nn.QuantizedLinear)
    ]
    return max(sizes, default=0) * dtype.size / 1e9


def section_matmul(size, args) -> None:
    p = FluxParams.from_diffusers_config({**size.flux, "guidance_embeds": False})
    D = p.hidden_size
    shapes = {"linear1": (D, 7 * D), "linear2": (5 * D, D), "qkv": (D, 3 * D)}  # (in, out)
    tokens = (size.res // 16) ** 2 + size.txt["schnell"]
    c = cuda()
    for layer in args.layers:
        k, n = shapes[layer]
        w = mx.random.normal((n, k), dtype=args.dtype, scale=k**-0.5)
        packed = {b: mx.quantize(w, 64, b) for b in (8, 4)}
        mx.eval(w, packed)
        for rows in sorted({1, 32, size.txt["schnell"], tokens}):
            x = mx.random.normal((1, rows, k)).astype(args.dtype)
            ways = {"float": lambda x=x, w=w: x @ w.T}
            for b, (q, s, z) in packed.items():
                ways[f"q{b}_qmm"] = lambda x=x, q=q, s=s, z=z, b=b: mx.quantized_matmul(
                    x, q, s, z, True, 64, b
                )
                ways[f"q{b}_dequant"] = lambda x=x, q=q, s=s, z=z, b=b: (
                    x @ mx.dequantize(q, s, z, 64, b, dtype=x.dtype).T
                )
            if c is not None:
                q, s, z = packed[8]
                ways["q8_fused"] = lambda x=x, q=q, s=s, z=z: x @ c.qmatmul.dequantize_fused(q, s, z, 64).T
            times = {name: timeit(fn, args.warmup, args.steps) for name, fn in ways.items()}
            report(
                what="matmul",
                layer=layer,
                k=k,
                n=n,
                rows=rows,
                **{f"{name}_ms": r["s"] * 1e3 for name, r in times.items()},
                **{f"{name}_first_s": r["first_s"] for name, r in times.items()},
            )
        free()


def section_decode(size, args) -> None:
    free()
    vae = build("vae", size, args.dtype, None)
    weights = nbytes(vae) / 1e9
    z = mx.random.normal((1, size.res // 8, size.res // 8, size.vae.latent_channels)).astype(args.dtype)
    mx.eval(z)
    images = {}
    for band_mb in args.band_mb:
        band = int(band_mb * 2**20) if band_mb else None  # None: whole-tensor layers
        for tune in args.tunings:
            free()
            with tuned(tune):
                r = timeit(lambda band=band: vae.decode(z, band_bytes=band), args.warmup, args.steps)
            peak = peak_gb()
            report(
                what="decode",
                res=size.res,
                band_mb=band_mb,
                **r,
                peak_gb=peak,
                weights_gb=weights,
                over_weights_gb=peak - weights,
                **tuning(tune),
            )
        images[band_mb] = mx.clip(vae.decode(z, band_bytes=band).astype(mx.float32) / 2 + 0.5, 0, 1)
        mx.eval(images[band_mb])
    for band_mb, img in images.items():
        if band_mb and 0 in images:
            d = mx.abs(mx.round(img * 255) - mx.round(images[0] * 255))  # as the pipeline rounds pixels
            report(
                what="decode_diff",
                res=size.res,
                band_mb=band_mb,
                max_diff_255=(mx.abs(img - images[0]) * 255).max().item(),
                share_8bit_differ=(d > 0).mean().item(),
            )


def anchor(args) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    for variant in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--diffusers-step",
            args.size,
            variant,
            str(args.warmup),
            str(args.steps),
        ]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            report(what="failed", section="anchor", variant=variant, error=out.stderr.strip()[-600:])
        else:
            report(**json.loads(out.stdout.strip().splitlines()[-1]))


def diffusers_step(size: str, variant: str, warmup: int, n: int) -> dict:
    """diffusers' FluxTransformer2DModel step at `size`, random weights, in PyTorch (bf16 on its GPU,
    float32 on a CPU), timed as `timeit` times ours."""
    import statistics
    import time

    import torch
    from diffusers import FluxTransformer2DModel

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**FLUX[size], guidance_embeds=variant == "dev").to(dtype).eval()
        L, S, c = (RES[size] // 16) ** 2, TXT[size][variant], model.config
        inputs = dict(
            hidden_states=torch.randn(1, L, c.in_channels, dtype=dtype),
            encoder_hidden_states=torch.randn(1, S, c.joint_attention_dim, dtype=dtype),
            pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=dtype),
            timestep=torch.tensor([1.0], dtype=dtype),
            guidance=torch.tensor([3.5]) if variant == "dev" else None,
            img_ids=torch.zeros(L, 3),
            txt_ids=torch.zeros(S, 3),
            return_dict=False,
        )

    def call() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        sync()
        return time.perf_counter() - t

    first = call()
    for _ in range(warmup - 1):
        call()
    times = [call() for _ in range(n)]
    return dict(
        what="anchor_step",
        impl="diffusers",
        device=device,
        variant=variant,
        res=RES[size],
        txt=TXT[size][variant],
        s=statistics.fmean(times),
        median_s=statistics.median(times),
        first_s=first,
        torch_threads=torch.get_num_threads(),
    )


def print_table() -> None:
    from common import FIGURES

    rows = []
    for f in FIGURES:
        tune = f" {f['tune']}" if f.get("tune") else ""
        if f["what"] == "step":
            bound = f", bound {f['bound_gb']:.3g} GB" if "bound_gb" in f else ""
            rows.append(
                [f"step {f['variant']}, {f['res']} px, {f['txt']} tokens", f"{f['quant']}{tune}"]
                + [f"{f['s']:.4f} s", f"{f['first_s']:.2f} s", f"{f['peak_gb']:.3g} GB{bound}"]
            )
        elif f["what"] == "anchor_step":
            rows.append([f"diffusers step {f['variant']} ({f['device']})", "", f"{f['s']:.4f} s", "", ""])
        elif f["what"] == "matmul":
            ms = ", ".join(f"{k[:-3]} {v:.3f}" for k, v in f.items() if k.endswith("_ms"))
            rows.append([f"{f['layer']} {f['k']}->{f['n']}, {f['rows']} rows", "", ms + " ms", "", ""])
        elif f["what"] == "decode":
            band = f"bands of {f['band_mb']:g} MB" if f["band_mb"] else "whole"
            rows.append(
                [f"VAE decode {f['res']} px, {band}", tune, f"{f['s']:.4f} s", f"{f['first_s']:.2f} s"]
                + [f"{f['over_weights_gb']:.3g} GB over its weights"]
            )
        elif f["what"] == "decode_diff":
            rows.append(
                [f"bands of {f['band_mb']:g} MB against whole", "", "", "", f"{f['max_diff_255']:.2f}/255"]
            )
    table(["figure", "setting", "time", "first call", "memory"], rows)


def main(argv=None) -> None:
    p = parser(__doc__)
    add_model_arguments(p)
    p.add_argument("--what", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument(
        "--quant", default="bf16,q8,q4", help="step: bf16 (the float dtype), q8, q4 (affine, group 64)"
    )
    p.add_argument("--variants", default="schnell,dev", help="step: schnell (256 text tokens), dev (512)")
    p.add_argument("--layers", default=",".join(LAYERS), help=f"matmul: from {', '.join(LAYERS)}")
    p.add_argument(
        "--band-mb",
        default="0,1024",
        help="decode: row-band sizes in MB (0: whole-tensor layers; default 0,1024)",
    )
    p.add_argument("--steps", type=int, default=5, help="timed calls per figure (default 5)")
    p.add_argument(
        "--warmup", type=int, default=2, help="calls before timing, the first included (default 2)"
    )
    p.add_argument(
        "--anchor", action="store_true", help="also time diffusers' step (needs torch and diffusers)"
    )
    p.add_argument("--diffusers-step", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.diffusers_step:
        size, variant, warmup, n = args.diffusers_step
        print(json.dumps(diffusers_step(size, variant, int(warmup), int(n))))
        return
    sections = split(p, "--what", args.what, SECTIONS)
    args.quants = split(p, "--quant", args.quant, ["bf16", *QUANTS])
    args.variants = split(p, "--variants", args.variants, ("schnell", "dev"))
    args.layers = split(p, "--layers", args.layers, LAYERS)
    args.band_mb = [float(b) for b in args.band_mb.split(",") if b]
    args = finish(p, args)
    size = SIZES[args.size]
    report_env(args)
    for s in sections:
        globals()[f"section_{s}"](size, args)
    if args.anchor:
        anchor(args)
    print_table()


if __name__ == "__main__":
    main()
