"""A LoRA training step: mflux's (the compiled step `mflux train` runs) against diffusers + PEFT's
(train_dreambooth_lora_flux.py's step), on the FLUX.1-dev transformer with random weights.

    python bench/train.py --size full                                # a CUDA GPU: 512 and 1024
    python bench/train.py --size mid --res 128 --txt 64 --quant bf16 # a CPU (float32)

Both train rank-16 LoRAs on diffusers' default targets (to_q, to_k, to_v, to_out.0), batch 1, 512 T5
tokens (the script's default), AdamW, gradients clipped at 1.0, every transformer block checkpointed
(--no-checkpoint: none, on both sides). mflux runs on a bf16 base and on q8 and q4 bases (QLoRA),
evaluating each step as the trainer does (under CUDA's queue bound for training, `Tuning.train_share`);
diffusers at bf16 (float32 on a CPU). Each configuration runs in its own process, so its peak memory is
its own: the framework allocator's peak after the model is built (MLX: mx.get_peak_memory; PyTorch:
torch.cuda.max_memory_allocated, or the process's peak RSS on a CPU). Step time is the mean of --steps
steps after --warmup (the first compiles). On a CPU, mflux's processes get Debian's OpenBLAS preloaded
where it is installed (MLX's own BLAS is about 30x slower there; the same preload slows PyTorch down).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from flux_sizes import FLUX  # MLX-free: diffusers' processes import no MLX

RANK = 16
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]  # the script's default
DEFAULT_RES = {"full": "512,1024", "mid": "128,256", "tiny": "64"}
DEV_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
IMPLS = {"mflux": ["mflux"], "diffusers": ["diffusers"], "both": ["mflux", "diffusers"]}


def run_mflux(args) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from common import QUANTS, SIZES, build, nbytes, tuned, tunings

    from mflux.runtime import memory
    from mflux.train import lora
    from mflux.train.trainer import make_step

    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    flux = build("transformer", SIZES[args.size], dtype, QUANTS.get(args.quant), "dev")
    weights = nbytes(flux)
    layers = lora.attach(
        flux, lora.target_modules(flux.params, lora.target_leaves(TARGETS)), RANK, float(RANK)
    )
    lora_params = sum(v.size for layer in layers.values() for v in [*layer.lora_A, *layer.lora_B])
    p = FLUX[args.size]
    cache = {
        "latents": mx.random.normal((1, (args.res // 16) ** 2, 64)),
        "txt": mx.random.normal((1, args.txt, p["joint_attention_dim"])).astype(dtype),
        "pooled": mx.random.normal((1, p["pooled_projection_dim"])).astype(dtype),
        "caption": mx.array([0], dtype=mx.int32),
    }
    optimizer = optim.AdamW(learning_rate=1e-4, weight_decay=1e-4)
    optimizer.init(flux.trainable_parameters())
    step = make_step(flux, optimizer, cache, DEV_SCHEDULER, args.res, 1, checkpoint=not args.no_checkpoint)
    key, idx = mx.random.key(0), mx.array([0])
    mx.eval(cache, flux.state, optimizer.state)
    mx.reset_peak_memory()

    def one() -> float:
        nonlocal key
        loss, key = step(key, idx)
        memory.evaluate(flux.state, optimizer.state, loss, key, headroom="train")  # as the trainer's loop
        mx.synchronize()
        return loss.item()

    (tune,) = tunings(argparse.ArgumentParser(), args.tune)
    with tuned(tune):
        r = timed(one, args.warmup, args.steps)
    info = {"weights_gb": weights / 1e9, "lora_params": lora_params, "dtype": str(dtype)}
    return {**r, "peak_gb": mx.get_peak_memory() / 1e9, **info}


def run_diffusers(args) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        # On the H200's PyTorch 2.11 cuDNN's attention backward failed (mha_graph.execute, then illegal
        # addresses), with and without checkpointing; PyTorch's flash attention runs it.
        torch.backends.cuda.enable_cudnn_sdp(False)
    with torch.device(device):
        model = FluxTransformer2DModel(**FLUX[args.size], guidance_embeds=True).to(dtype)
    model.requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS)
    )
    if not args.no_checkpoint:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    c, side = model.config, args.res // 16
    x0 = torch.randn(1, side * side, 64, device=device, dtype=dtype)
    txt = torch.randn(1, args.txt, c.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(1, c.pooled_projection_dim, device=device, dtype=dtype)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
    txt_ids = torch.zeros(args.txt, 3, device=device, dtype=dtype)
    guidance = torch.tensor([3.5], device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def one() -> float:
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

    r = timed(one, args.warmup, args.steps)
    peak = (
        torch.cuda.max_memory_allocated()
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    n = sum(p.numel() for p in params)
    return {
        **r,
        "peak_gb": peak / 1e9,
        "lora_params": n,
        "lora_dtype": str(params[0].dtype),
        "dtype": str(dtype),
    }


def timed(fn, warmup: int, n: int) -> dict:
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


def child(impl: str, quant: str, res: int, tune: dict, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--quant",
        quant,
        "--size",
        args.size,
        "--res",
        str(res),
    ]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--txt", str(args.txt)]
    cmd += ["--no-checkpoint"] * args.no_checkpoint
    cmd += [f"--tune={k}={'none' if v is None else v}" for k, v in tune.items()]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if impl == "mflux" and os.path.exists(OPENBLAS) and args.on_cpu:
        env["LD_PRELOAD"] = OPENBLAS
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.timeout:.0f} s (--timeout)"}
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=tuple(DEFAULT_RES), default="full", help="model size (default: full)")
    p.add_argument("--res", help="comma-separated image sides (default: full 512,1024; mid 128,256; tiny 64)")
    p.add_argument("--quant", default="bf16,q8,q4", help="mflux's bases: bf16 (the float dtype), q8, q4")
    p.add_argument(
        "--impl", choices=IMPLS, default="both", help="mflux, diffusers (+ PEFT) or both (default)"
    )
    p.add_argument("--txt", type=int, default=512, help="T5 tokens (default 512, the script's)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument(
        "--warmup", type=int, default=2, help="steps before timing, the first included (default 2)"
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration (default 300)")
    p.add_argument("--no-checkpoint", action="store_true", help="keep every activation (no recomputation)")
    p.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="FIELD=VALUE[,VALUE...]",
        help="mflux on CUDA: its tuning's FIELD at each VALUE (e.g. --tune train_share=none,0.25)",
    )
    p.add_argument("--child", choices=("mflux", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.res = int(args.res)
        print(json.dumps(run_mflux(args) if args.child == "mflux" else run_diffusers(args)))
        return
    impls = IMPLS[args.impl]
    quants = [q for q in args.quant.split(",") if q]
    for q in quants:
        if q not in ("bf16", "q8", "q4"):
            p.error(f"--quant: unknown {q!r} (choose from bf16, q8, q4)")
    tunes, args.on_cpu = [{}], False
    if "mflux" in impls:  # MLX, for the backend and --tune's fields
        import mlx.core as mx
        from common import tunings

        args.on_cpu = mx.default_device() == mx.cpu
        tunes = tunings(p, args.tune)
    elif args.tune:
        p.error("--tune changes mflux's tuning; it needs --impl mflux or both")
    for res in [int(r) for r in (args.res or DEFAULT_RES[args.size]).split(",")]:
        jobs = [("mflux", q, t) for q in quants for t in tunes] if "mflux" in impls else []
        jobs += [("diffusers", "bf16", {})] if "diffusers" in impls else []
        for impl, quant, tune in jobs:
            row = {"impl": impl, "base": quant, "size": args.size, "res": res, "rank": RANK, "txt": args.txt}
            row |= {"checkpoint": not args.no_checkpoint} | ({"tune": tune} if tune else {})
            row |= child(impl, quant, res, tune, args)
            print(
                json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )


if __name__ == "__main__":
    main()
