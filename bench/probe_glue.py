"""The transformer's glue around attention, each piece both ways (issue 12, target 5): runtime.kernels'
CUDA kernels against MLX's ops, at a schnell 1024x1024 step's shapes (`--size full`) or tiny ones.

    python bench/probe_glue.py [--size full|tiny] [--calls 20]

Prints JSON lines:
- `build`: the kernels' PTX compiled by NVRTC, then read from the kernel cache, then their first
  launch;
- `piece`: each piece's time per call both ways, with the largest and mean difference between their
  outputs and the share of elements that differ:
  - `qk_single`: a single block's q and k (norm and rope) from linear1's output;
  - `qk_double`: a double block's joint q, k and v from the text and image qkv outputs;
  - `gelu_concat`: a single block's input to linear2 (the ops: MLX's bf16 `nn.gelu_approx`, as mflux
    ran it before, and the float32 GELU the kernel computes);
  - `gelu`: a double block's MLP activation, `nn.gelu_approx` against `layers.gelu_f32`;
- `grads`: a whole single and double block's parameter gradients through the kernels, eager, under
  `mx.compile`, and compiled with the trainer's per-block `mx.checkpoint` (the trainer's compiled step gave
  a NaN loss through them, round 10), each against the ops' eager gradients: the loss, the count of
  non-finite values and the largest difference relative to the largest gradient.
Needs MLX's CUDA backend for the kernel side; elsewhere it times the ops alone.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from contextlib import contextmanager  # noqa: E402
from functools import partial  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from bench_flux import image_ids, randomize, report  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from mflux.runtime import kernels, layers  # noqa: E402
from mflux.runtime.model import _forward  # noqa: E402

SHAPES = {  # tokens of text and image, heads, MLP width
    "full": dict(txt=256, img=4096, heads=24, mlp=12288),
    "tiny": dict(txt=16, img=64, heads=4, mlp=2048),
}


def timed(fn, calls: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def diff(a, b) -> dict:
    a, b = (mx.array(x).astype(mx.float32) for x in (a, b))
    d = mx.abs(a - b)
    return {
        "max_diff": d.max().item(),
        "mean_diff": d.mean().item(),
        "differ": (d > 0).astype(mx.float32).mean().item(),
        "max_ref": mx.abs(b).max().item(),
    }


def compare(name: str, ours, ops, calls: int, **extra) -> None:
    """Time `ops` and, with the kernels on, `ours`; compare their outputs (tuples compare elementwise)."""
    kernels.USE["cuda"] = False
    ref = ops()
    mx.eval(ref)
    fig = {"what": "piece", "piece": name, "ops_ms": timed(ops, calls) * 1e3, **extra}
    if kernels.backend() == "cuda":
        kernels.USE["cuda"] = True
        try:
            out = ours()
            mx.eval(out)
        except Exception as e:  # noqa: BLE001 - reported, and the other pieces still run
            report(**fig, failed=str(e)[:4000])
            return
        fig["kernel_ms"] = timed(ours, calls) * 1e3
        fig["speedup"] = fig["ops_ms"] / fig["kernel_ms"]
        pairs = zip(out, ref) if isinstance(out, tuple) else [(out, ref)]
        fig["outputs"] = [diff(o, r) for o, r in pairs]
    report(**fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="full")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--grads-only", action="store_true", help="only the blocks' gradients")
    args = parser.parse_args()
    s = SHAPES[args.size]
    dtype = mx.bfloat16 if kernels.backend() == "cuda" else mx.float32
    H, D = s["heads"], kernels.HEAD_DIM
    hidden = H * D
    report(what="env", device=str(mx.default_device()), mlx=mx.__version__, size=args.size, **s)

    if kernels.backend() == "cuda":
        # the PTX compiled (MLX_PTX_CACHE_DIR empty), then read back from the cache; then the first
        # launch of each kernel (the driver builds the card's code from the PTX)
        t = time.perf_counter()
        try:
            kernels._cached_or_compiled()
        except (OSError, RuntimeError) as e:
            report(what="build", failed=str(e)[:4000])
            return
        compiled = time.perf_counter() - t
        t = time.perf_counter()
        kernels._cached_or_compiled()
        cached = time.perf_counter() - t
        t = time.perf_counter()
        x, w = mx.zeros((1, 2, 3 * 2 * D), dtype), mx.ones((D,), dtype)
        mx.eval(kernels._qk_launch(x, x, w, w, w, w, mx.zeros((1, 4, 1, D // 2, 2)), 2, True))
        mx.eval(kernels._gelu_launch(mx.zeros((1, 2, 8), dtype), mx.zeros((1, 2, 24), dtype), 8))
        report(what="build", compile_s=compiled, cached_s=cached, first_launch_s=time.perf_counter() - t)

    res = int((s["img"] ** 0.5) * 16)
    img_ids, txt_ids = image_ids(res, s["txt"])
    pe = layers.rope(mx.concatenate([txt_ids, img_ids], axis=1), (16, 56, 56))
    N = s["txt"] + s["img"]

    def rand(*shape, scale=1.0):
        return (mx.random.normal(shape) * scale).astype(dtype)

    if not args.grads_only:
        pieces(s, H, hidden, pe, N, rand, args.calls)

    # gradients through whole blocks (random weights drawn as bench_flux does)
    vec = mx.random.normal((1, hidden)).astype(dtype)
    single = randomize(layers.SingleStreamBlock(hidden, H, 4.0), dtype)
    grads("single", single, [rand(1, N, hidden)], single.modulations(vec), pe)
    del single
    double = randomize(layers.DoubleStreamBlock(hidden, H, 4.0, qkv_bias=True), dtype)
    grads(
        "double", double, [rand(1, s["img"], hidden), rand(1, s["txt"], hidden)], double.modulations(vec), pe
    )


def pieces(s: dict, H: int, hidden: int, pe, N: int, rand, calls: int) -> None:
    """Each piece both ways (see the module's docstring)."""
    D = kernels.HEAD_DIM
    wq, wk = (1 + rand(D, scale=0.1) for _ in range(2))
    h = rand(1, N, 3 * hidden + s["mlp"], scale=2.0)
    mx.eval(pe, h, wq, wk)
    one = [(h, wq, wk)]
    compare(
        "qk_single",
        lambda: kernels.qk_rope(one, H, pe, layers.qk_rope_ops)[:2],
        lambda: layers.qk_rope_ops(one, H, pe)[:2],
        calls,
    )

    txt, img = rand(1, s["txt"], 3 * hidden, scale=2.0), rand(1, s["img"], 3 * hidden, scale=2.0)
    w = [1 + rand(D, scale=0.1) for _ in range(4)]
    mx.eval(txt, img, w)
    two = [(txt, w[0], w[1]), (img, w[2], w[3])]
    compare(
        "qk_double",
        lambda: kernels.qk_rope(two, H, pe, layers.qk_rope_ops),
        lambda: layers.qk_rope_ops(two, H, pe),
        calls,
    )

    attn = rand(1, N, hidden)
    mx.eval(attn)
    for act, ops in (("gelu_approx", nn.gelu_approx), ("gelu_f32", layers.gelu_f32)):
        compare(
            "gelu_concat",
            lambda: kernels.gelu_concat(attn, h, 3 * hidden, layers._concat_act),
            lambda: mx.concatenate([attn, ops(h[..., 3 * hidden :])], axis=-1),  # noqa: B023
            calls,
            ops_act=act,
        )

    x = rand(1, s["img"], s["mlp"], scale=2.0)
    mx.eval(x)
    kernels.USE["cuda"] = False
    fig = {
        "what": "piece",
        "piece": "gelu",
        "gelu_approx_ms": timed(lambda: nn.gelu_approx(x), calls) * 1e3,
    }
    fig["gelu_f32_ms"] = timed(lambda: layers.gelu_f32(x), calls) * 1e3
    fig["outputs"] = [diff(layers.gelu_f32(x), nn.gelu_approx(x))]
    report(**fig)


def grads(name: str, block, xs: list, mod, pe) -> None:
    """`block`'s parameter gradients each way (see the module's docstring), against the ops' eager ones."""
    params = block.trainable_parameters()
    weights = [mx.random.normal(o.shape) for o in _outputs(block, xs, mod, pe)]
    mx.eval(weights)

    def loss(params, *xs, checkpoint=False):
        block.update(params)
        if checkpoint:
            out = _forward(block, True)(*xs, mod, pe)
        else:
            out = block.forward(*xs, mod, pe)
        out = out if isinstance(out, tuple) else (out,)
        return sum((o.astype(mx.float32) * w).sum() for o, w in zip(out, weights))

    plain = mx.value_and_grad(loss)
    ways = {  # way: (kernels on, which of them: "qk", "gelu" or both, the gradient function)
        "ops": (False, "", plain),
        "kernels": (True, "qk,gelu", plain),
        "qk_kernel_only": (True, "qk", plain),
        "gelu_kernels_only": (True, "gelu", plain),
        "kernels_compiled": (True, "qk,gelu", mx.compile(plain)),
        "kernels_compiled_checkpoint": (
            True,
            "qk,gelu",
            mx.compile(mx.value_and_grad(partial(loss, checkpoint=True))),
        ),
    }
    if kernels.backend() != "cuda":  # the ops' own paths, so that the probe runs (and is checked) here
        ways = {"ops": ways["ops"], "ops_compiled": (False, "", mx.compile(plain))}
    ref = None
    for way, (use, which, fn) in ways.items():
        kernels.USE["cuda"] = use
        try:
            with _only(which if use else "qk,gelu"):
                value, g = fn(params, *xs)
                mx.eval(value, g)
        except Exception as e:  # noqa: BLE001 - reported, and the other ways still run
            report(what="grads", block=name, way=way, failed=str(e)[:4000])
            continue
        finally:
            block.update(params)
        flat = {k: a.astype(mx.float32) for k, a in tree_flatten(g)}
        bad = {k: int((~mx.isfinite(a)).sum()) for k, a in flat.items()}
        fig = {"loss": value.item(), "nonfinite": sum(bad.values())}
        fig["nonfinite_in"] = {k: (n, flat[k].size) for k, n in bad.items() if n}
        if ref is None:
            ref = flat
        else:
            top = max(mx.abs(r).max().item() for r in ref.values())
            fig["max_diff_rel"] = max(mx.abs(flat[k] - r).max().item() for k, r in ref.items()) / top
        report(what="grads", block=name, way=way, kernels=which if use else "", **fig)
    kernels.USE["cuda"] = kernels.backend() == "cuda"


@contextmanager
def _only(which: str):
    """With the kernels on, the other one as MLX's ops: "qk" keeps the MLPs' GELU and gelu_concat on the
    ops (nn.gelu_approx), "gelu" runs qk_rope's ops."""
    saved = kernels.qk_rope, kernels.gelu_concat, layers.mlp_act
    if "qk" not in which:
        kernels.qk_rope = lambda streams, heads, pe, ops: ops(streams, heads, pe)
    if "gelu" not in which:
        kernels.gelu_concat = lambda attn, h, offset, ops: mx.concatenate(
            [attn, nn.gelu_approx(h[..., offset:])], axis=-1
        )
        layers.mlp_act = nn.gelu_approx
    try:
        yield
    finally:
        kernels.qk_rope, kernels.gelu_concat, layers.mlp_act = saved


def _outputs(block, xs, mod, pe):
    out = block.forward(*xs, mod, pe)
    return out if isinstance(out, tuple) else (out,)


if __name__ == "__main__":
    main()
