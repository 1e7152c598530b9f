"""Which way of cutting a 3x3 convolution into row bands gives the whole tensor's bits on this backend
(issue 12, target 4): `bench/probe_bands.py --walk` found the banded decode parting from the whole one
on an H200 only at the 512x512 level's 512-channel convolutions. Each line is one band height and one
way of padding, against `mx.conv2d` on the whole tensor with padding 1:

- halo: the band's rows plus one halo row each side, padded by 1 along the columns only (the decoder's
  way, `BandedDecoder._conv`);
- own: the same rows, with the convolution's own padding of 1 on both axes (as the whole tensor's), and
  the two output rows centred on the halo rows dropped.

    python bench/probe_conv_bands.py --size 512 --cin 512 --cout 512 --rows 146,128,64,256
"""

import argparse
import json

import mlx.core as mx


def banded(x: mx.array, w: mx.array, rows: int, way: str) -> mx.array:
    H = x.shape[1]
    out = []
    for a in range(0, H, rows):
        b = min(a + rows, H)
        lo, hi = a - 1, b + 1
        band = x[:, max(lo, 0) : min(hi, H)]
        band = mx.pad(band, [(0, 0), (max(lo, 0) - lo, hi - min(hi, H)), (0, 0), (0, 0)])
        if way == "own":
            y = mx.conv2d(band, w, padding=(1, 1))[:, 1:-1]
        else:
            y = mx.conv2d(band, w, padding=(0, 1))
        mx.eval(y)
        out.append(y)
    return mx.concatenate(out, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--cin", type=int, default=512)
    ap.add_argument("--cout", type=int, default=512)
    ap.add_argument("--rows", default="146,128,64,256")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    x = mx.random.normal((1, args.size, args.size, args.cin)).astype(dtype)
    w = (mx.random.normal((args.cout, 3, 3, args.cin)) * (9 * args.cin) ** -0.5).astype(dtype)
    whole = mx.conv2d(x, w, padding=(1, 1))
    mx.eval(whole)
    for rows in [int(r) for r in args.rows.split(",") if r]:
        for way in ("halo", "own"):
            y = banded(x, w, rows, way)
            d = mx.abs(y.astype(mx.float32) - whole.astype(mx.float32))
            row = {"what": "conv_bands", "size": args.size, "cin": args.cin, "cout": args.cout, "rows": rows}
            row |= {"way": way, "dtype": args.dtype, "equal": bool(mx.array_equal(y, whole).item())}
            row |= {"share_differ": (d > 0).mean().item(), "max_diff": d.max().item()}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
