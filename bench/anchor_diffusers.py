# Provided material: ../shared/gpu/anchor_diffusers.py (the diffusers anchor the performance issue
# measures against), copied so that it travels to the GPU machine with the working tree; only
# ruff format/--fix touched it. Its loops re-bind the lambdas on purpose, hence the noqa.
# ruff: noqa: B023, F821, E731
"""Anchor: diffusers FLUX.1 (PyTorch, bf16, eager) per-step time on this GPU, random weights.
Prints one JSON line per measurement."""

import json
import sys
import time

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

dev = "cuda"
torch.manual_seed(0)


def timeit(fn, warm=2, n=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def report(**kw):
    print(json.dumps(kw), flush=True)


H = W = 1024
img_tokens = (H // 16) * (W // 16)
# single block, like-for-like with the MLX micro-benchmark
with torch.device(dev):
    blk = FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(
        torch.bfloat16
    )
    dblk = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(torch.bfloat16)
for txt in (256, 512):
    S = img_tokens + txt
    x = torch.randn(1, S, 3072, device=dev, dtype=torch.bfloat16)
    temb = torch.randn(1, 3072, device=dev, dtype=torch.bfloat16)
    cos = torch.randn(S, 128, device=dev)
    sin = torch.randn(S, 128, device=dev)
    with torch.no_grad():
        t1 = timeit(lambda: blk(x[:, txt:], x[:, :txt], temb, image_rotary_emb=(cos, sin)))
        t2 = timeit(lambda: dblk(x[:, txt:], x[:, :txt], temb, image_rotary_emb=(cos, sin)))
    report(what="torch_single_block_ms", txt=txt, ms=t1 * 1e3)
    report(what="torch_double_block_ms", txt=txt, ms=t2 * 1e3)
del blk, dblk
torch.cuda.empty_cache()

for variant in ("schnell", "dev"):
    with torch.device(dev):
        torch.set_default_dtype(torch.bfloat16)
        tr = FluxTransformer2DModel(guidance_embeds=(variant == "dev"))
        torch.set_default_dtype(torch.float32)
    tr.eval()
    txt = 256 if variant == "schnell" else 512
    hs = torch.randn(1, img_tokens, 64, device=dev, dtype=torch.bfloat16)
    ehs = torch.randn(1, txt, 4096, device=dev, dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device=dev, dtype=torch.bfloat16)
    ts = torch.tensor([1.0], device=dev, dtype=torch.bfloat16)
    g = torch.tensor([3.5], device=dev, dtype=torch.bfloat16) if variant == "dev" else None
    img_ids = torch.zeros(img_tokens, 3, device=dev)
    txt_ids = torch.zeros(txt, 3, device=dev)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        f = lambda: tr(
            hidden_states=hs,
            encoder_hidden_states=ehs,
            pooled_projections=pooled,
            timestep=ts,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )
        t = timeit(f, warm=2, n=5)
    report(
        what="diffusers_eager_step_s",
        variant=variant,
        res=H,
        txt=txt,
        s=t,
        peak_gb=torch.cuda.max_memory_allocated() / 2**30,
        params_b=sum(p.numel() for p in tr.parameters()) / 1e9,
    )
    if variant == "schnell" and "--compile" in sys.argv:
        trc = torch.compile(tr)
        t0 = time.perf_counter()
        with torch.no_grad():
            fc = lambda: trc(
                hidden_states=hs,
                encoder_hidden_states=ehs,
                pooled_projections=pooled,
                timestep=ts,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=g,
                return_dict=False,
            )
            fc()
            torch.cuda.synchronize()
            ct = time.perf_counter() - t0
            t = timeit(fc, warm=1, n=5)
        report(what="diffusers_compiled_step_s", variant=variant, res=H, txt=txt, s=t, compile_s=ct)
    del tr
    torch.cuda.empty_cache()

with torch.device(dev):
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).to(torch.bfloat16)
z = torch.randn(1, 16, 128, 128, device=dev, dtype=torch.bfloat16)
with torch.no_grad():
    t = timeit(lambda: vae.decode(z), warm=1, n=3)
report(what="diffusers_vae_decode_s", res=H, s=t)
