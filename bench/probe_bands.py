"""Which of the VAE decoder's layer kinds gives other bits in row bands than on the whole tensor (issue
12, target 4): each kind run both ways on the same input, at the size's full resolution, one JSON line
each with the largest and mean difference relative to the output's largest value, and whether the two
are equal.

    python bench/probe_bands.py --size full --band-mb 1024     # a CUDA GPU, bf16
    python bench/probe_bands.py --size tiny --band-mb 1        # this CPU
    python bench/probe_bands.py --size full --walk             # also every layer of a decode, in order

The kinds are `BandedDecoder`'s pieces: the group norm's statistics and its application (`norm`), a 3x3
convolution on normed input (`conv3x3`), a 1x1 shortcut convolution (`conv1x1`), the 2x upsampling
convolution (`upsample`), and attention over bands of queries (`attention`). On this CPU all of them
give the same bits both ways (tests/test_vae.py); a kind that differs on a GPU is where the banded
decode's pixels part from the whole-tensor ones there.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flux as bf  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mflux.runtime.autoencoder import BandedDecoder  # noqa: E402


def compare(name: str, whole: mx.array, banded: mx.array) -> dict:
    w, b = whole.astype(mx.float32), banded.astype(mx.float32)
    d = mx.abs(w - b)
    scale = max(mx.abs(w).max().item(), 1e-30)
    return {
        "what": "bands_vs_whole",
        "kind": name,
        "shape": list(whole.shape),
        "equal": bool(mx.array_equal(whole, banded).item()),
        "max_rel": d.max().item() / scale,
        "mean_rel": d.mean().item() / scale,
        "share_differ": (d > 0).mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=bf.SIZES, default="full")
    ap.add_argument("--band-mb", type=float, default=1024)
    ap.add_argument("--dtype", default=None, help="bfloat16 (a GPU's default) or float32 (a CPU's)")
    ap.add_argument("--walk", action="store_true", help="also each layer of a whole decode, in order")
    args = ap.parse_args()
    size = bf.SIZES[args.size]
    dtype = getattr(mx, args.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16"))
    vae = bf.build("vae", size, dtype, None)
    d = vae.decoder
    banded = BandedDecoder(d, int(args.band_mb * 2**20))
    # the last up block works at the full resolution: its first resnet (a shortcut where the widths
    # change), and the upsampler of the block before it; the mid block's attention at the latent's size
    last, before = d.up_blocks[-1], d.up_blocks[-2]
    latent = size.res // 8
    r = last.resnets[0]
    cin = r.norm1.weight.shape[0]
    x = mx.random.normal((1, size.res, size.res, cin)).astype(dtype)
    mid = mx.random.normal((1, latent, latent, d.mid_block.resnets[0].norm1.weight.shape[0])).astype(dtype)
    up_in = mx.random.normal((1, size.res // 2, size.res // 2, before.upsamplers[0].conv.weight.shape[-1]))
    up_in = up_in.astype(dtype)
    mx.eval(x, mid, up_in)

    def emit(name, whole_fn, banded_fn):
        w = whole_fn()
        mx.eval(w)
        b = banded_fn()
        mx.eval(b)
        print(json.dumps(compare(name, w, b)), flush=True)
        bf.free()

    emit("norm", lambda: r.norm1(x), lambda: banded._apply_norm(r.norm1, x, banded._group_stats(r.norm1, x)))
    emit("conv3x3", lambda: r.conv1(nn.silu(r.norm1(x))), lambda: banded.conv(r.conv1, x, norm=r.norm1))
    if "conv_shortcut" in r:
        sc = r.conv_shortcut
        emit("conv1x1", lambda: sc(x), lambda: banded.conv(sc, x))
    up = before.upsamplers[0]
    emit("upsample", lambda: up(up_in), lambda: banded.conv(up.conv, up_in, upsample=True))
    if "attentions" in d.mid_block:
        att = d.mid_block.attentions[0]
        emit("attention", lambda: att(mid), lambda: banded.attention(att, mid))
    emit("resnet", lambda: r(x), lambda: banded.resnet(r, x))
    if args.walk:
        walk(d, banded, mx.random.normal((1, latent, latent, d.conv_in.weight.shape[-1])).astype(dtype), emit)


def walk(d, banded: BandedDecoder, z: mx.array, emit) -> None:
    """Each layer of the decode in `BandedDecoder`'s order, whole against banded, both on the whole
    path's input to that layer: which layer of the decode the banded pixels part at."""
    layers = [("conv_in", lambda x: d.conv_in(x), lambda x: banded.conv(d.conv_in, x))]
    mid = d.mid_block
    layers.append(("mid.resnet0", mid.resnets[0], lambda x: banded.resnet(mid.resnets[0], x)))
    if "attentions" in mid:
        layers.append(("mid.attention", mid.attentions[0], lambda x: banded.attention(mid.attentions[0], x)))
    layers.append(("mid.resnet1", mid.resnets[1], lambda x: banded.resnet(mid.resnets[1], x)))
    for i, block in enumerate(d.up_blocks):
        for j, r in enumerate(block.resnets):
            layers.append((f"up{i}.resnet{j}", r, lambda x, r=r: banded.resnet(r, x)))
        if "upsamplers" in block:
            up = block.upsamplers[0]
            layers.append((f"up{i}.upsample", up, lambda x, up=up: banded.conv(up.conv, x, upsample=True)))
    layers.append(
        (
            "conv_out",
            lambda x: d.conv_out(nn.silu(d.conv_norm_out(x))),
            lambda x: banded.conv(d.conv_out, x, norm=d.conv_norm_out),
        )
    )
    x = z
    for name, whole, band in layers:
        emit(f"walk:{name}", lambda x=x, whole=whole: whole(x), lambda x=x, band=band: band(x))
        x = whole(x)
        mx.eval(x)


if __name__ == "__main__":
    main()
