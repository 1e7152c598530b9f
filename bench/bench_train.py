"""Time a LoRA training step: mflux's (the compiled step `mflux train` runs) against diffusers + PEFT's
(train_dreambooth_lora_flux.py's step), on the FLUX.1-dev transformer with random weights.

Both sides train rank-16 LoRAs on diffusers' default targets (to_q, to_k, to_v, to_out.0), batch 1,
512 T5 tokens (the script's default), AdamW, gradient clipping at 1.0, and checkpoint every
transformer block. mflux runs at bf16 and on q8 and q4 bases (QLoRA); diffusers at bf16. Each
configuration runs in its own process, so its peak memory is its own; each figure is one JSON line.

    python bench/bench_train.py --size full                      # a CUDA GPU: 512 and 1024
    python bench/bench_train.py --size mid --res 128 --txt 64    # this CPU (float32)

On a CPU, MLX's children get Debian's OpenBLAS preloaded when it is installed (MLX's own reference
BLAS is ~30x slower; the same preload slows PyTorch, whose child runs without it).

mflux's steps evaluate under the trainer's queue bound (`memory.train_headroom`); `--headroom` sweeps
others (GB over what is held, or none), each configuration in its own process.

Step time is the mean of `--steps` steps after `--warmup` (the first compiles); peak memory is the
framework allocator's peak over the whole process after building the model (MLX: mx.get_peak_memory;
PyTorch: torch.cuda.max_memory_allocated, or the process's peak RSS on a CPU).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RANK = 16
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]  # the script's default
DEFAULT_RES = {"full": "512,1024", "mid": "128,256", "tiny": "64"}
DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def flux_config(size: str) -> dict:
    from flux_sizes import FLUX  # no MLX: diffusers' child runs where MLX may not be installed

    return {**FLUX[size], "guidance_embeds": True}


def mflux_step(args):
    """(one, info): `one()` runs one compiled training step, evaluated and synchronized, and returns its
    loss; info has the weights' bytes, the LoRA's parameter count and the dtype. args: size, quant, res,
    txt, no_checkpoint, headroom (the queue bound each step evaluates under, as `memory.bounded` takes it:
    "train" for the trainer's own, "auto", bytes, or None). The peak memory is reset after building, so it counts from here."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from bench_flux import QUANTS, build, nbytes

    from mflux.runtime import memory
    from mflux.train import lora
    from mflux.train.trainer import make_step

    on_cpu = mx.default_device() == mx.cpu
    dtype = mx.float32 if on_cpu else mx.bfloat16
    size_cfg = flux_config(args.size)
    from bench_flux import SIZES

    flux = build("transformer", SIZES[args.size], dtype, QUANTS.get(args.quant), "dev")
    weights = nbytes(flux)
    modules = lora.target_modules(flux.params, lora.target_leaves(TARGETS))
    layers = lora.attach(flux, modules, RANK, float(RANK))
    lora_params = sum(v.size for layer in layers.values() for v in [*layer.lora_A, *layer.lora_B])
    tokens = (args.res // 16) ** 2
    cache = {
        "latents": mx.random.normal((1, tokens, 64)),
        "txt": mx.random.normal((1, args.txt, size_cfg["joint_attention_dim"])).astype(dtype),
        "pooled": mx.random.normal((1, size_cfg["pooled_projection_dim"])).astype(dtype),
        "caption": mx.array([0], dtype=mx.int32),
    }
    optimizer = optim.AdamW(learning_rate=1e-4, weight_decay=1e-4)
    optimizer.init(flux.trainable_parameters())
    step = make_step(flux, optimizer, cache, DEV_SCHEDULER, args.res, 1, checkpoint=not args.no_checkpoint)
    key, idx = mx.random.key(0), mx.array([0])
    mx.eval(cache, flux.state, optimizer.state)
    mx.reset_peak_memory()

    def one():
        nonlocal key
        loss, key = step(key, idx)
        # as the trainer's loop evaluates it ("train": its own bound), unless a bound is asked for
        memory.evaluate(flux.state, optimizer.state, loss, key, headroom=args.headroom)
        mx.synchronize()
        return loss.item()

    return one, {"weights_gb": weights / 1e9, "lora_params": lora_params, "dtype": str(dtype)}


def run_mflux(args) -> dict:
    import mlx.core as mx

    one, info = mflux_step(args)
    r = _timed(one, args.warmup, args.steps)
    return {**r, "peak_gb": mx.get_peak_memory() / 1e9, **info}


def run_diffusers(args) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        # On the H200's PyTorch 2.11 the cuDNN attention backward failed (mha_graph.execute, then illegal
        # addresses), with and without checkpointing; PyTorch's flash attention runs it.
        torch.backends.cuda.enable_cudnn_sdp(False)
    cfg = {k: v for k, v in flux_config(args.size).items() if k != "in_channels"}
    with torch.device(device):
        model = FluxTransformer2DModel(in_channels=64, **cfg).to(dtype)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    if not args.no_checkpoint:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lora_dtype = str(params[0].dtype)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    tokens, side = (args.res // 16) ** 2, args.res // 16
    x0 = torch.randn(1, tokens, 64, device=device, dtype=dtype)
    txt = torch.randn(1, args.txt, cfg["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(args.txt, 3, device=device, dtype=dtype)
    guidance = torch.tensor([3.5], device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def one():
        # the script's step: sigma from a uniform index, noisy latents, flow target, MSE, clip, AdamW
        sigma = ((1000 - torch.randint(0, 1000, (1,))) / 1000).to(device, dtype)
        noise = torch.randn_like(x0)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        pred = model(
            hidden_states=noisy,
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=txt,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        loss = ((pred.float() - (noise - x0).float()) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    r = _timed(one, args.warmup, args.steps)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    n = sum(p.numel() for p in params)
    return {**r, "peak_gb": peak / 1e9, "lora_params": n, "lora_dtype": lora_dtype, "dtype": str(dtype)}


def _timed(fn, warmup: int, n: int) -> dict:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        fn()
    times, losses = [], []
    for _ in range(n):
        t = time.perf_counter()
        losses.append(fn())
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.fmean(times), "min_s": min(times), "first_s": first, "loss": losses[-1]}


def child(impl: str, quant: str, res: int, headroom: str | None, args) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--quant", quant, "--size", args.size]
    cmd += ["--headroom", headroom] if headroom else []
    cmd += [
        "--res",
        str(res),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--txt",
        str(args.txt),
    ]
    cmd += ["--no-checkpoint"] * args.no_checkpoint
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if impl == "mflux" and os.path.exists(OPENBLAS) and not _has_gpu():
        env["LD_PRELOAD"] = OPENBLAS
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.timeout:.0f} s (--timeout)"}
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=tuple(DEFAULT_RES), default="full")
    parser.add_argument("--res", help="comma-separated image sides (default: full 512,1024; mid 128,256)")
    parser.add_argument("--quant", default="bf16,q8,q4", help="mflux bases: bf16 (the float dtype), q8, q4")
    parser.add_argument("--impl", default="mflux,diffusers", help="mflux, diffusers or both")
    parser.add_argument("--txt", type=int, default=512, help="T5 tokens (default 512, the script's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    parser.add_argument(
        "--no-checkpoint", action="store_true", help="keep every activation (no recomputation)"
    )
    parser.add_argument(
        "--headroom",
        default="train",
        help="mflux: comma-separated queue bounds, GB over what is held (none: MLX's own limit; "
        "train: the trainer's, memory.train_headroom)",
    )
    parser.add_argument("--child", choices=("mflux", "diffusers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.res = int(args.res)
        if args.child == "mflux":
            from bench_flux import parse_headroom

            args.headroom = parse_headroom(args.headroom)
        result = run_mflux(args) if args.child == "mflux" else run_diffusers(args)
        print(json.dumps(result))
        return
    sides = [int(r) for r in (args.res or DEFAULT_RES[args.size]).split(",")]
    impls = [i for i in args.impl.split(",") if i]
    for res in sides:
        bounds = args.headroom.split(",")
        jobs = [("mflux", q, h) for q in args.quant.split(",") for h in bounds if "mflux" in impls]
        jobs += [("diffusers", "bf16", None)] if "diffusers" in impls else []
        for impl, quant, headroom in jobs:
            r = child(impl, quant, res, headroom, args)
            row = {"impl": impl, "base": quant, "size": args.size, "res": res, "rank": RANK, "txt": args.txt}
            row |= {"checkpoint": not args.no_checkpoint} | ({"headroom": headroom} if headroom else {})
            row |= r
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )


if __name__ == "__main__":
    main()
