"""Kernel-by-kernel profile of one thing mflux does on CUDA, under Nsight Systems (issue 12).

    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx -o REP \
        python bench/profile_gpu.py run --what step --quant q8
    nsys export -t sqlite -o REP.sqlite REP.nsys-rep
    python bench/profile_gpu.py analyze REP.sqlite --calls 3

`run` builds the full-size model with random weights (`bench_flux.build`), makes two untimed calls
(kernel builds, cuDNN plans), then opens the profiler's capture range (`cudaProfilerStart`), makes
`--calls` timed calls, each evaluated and synchronized, and closes it. It prints one JSON line with each
call's seconds. What a call is:
- `step`: one schnell transformer step at 1024x1024 (`Flux.predict`, modulations precomputed), under the
  runtime's 2 GB queue bound, as `bench_flux.py --sections step` times it;
- `decode`: the VAE decode of one 1024x1024 latent, whole-tensor (`--band-mb 0`) or in row bands.

`analyze` reads the capture's kernels from the exported SQLite file and prints JSON lines: the capture's
span, the time the GPU ran a kernel (the union of kernel intervals), the idle rest and its gaps, kernel
time by class (gemm, attention, dequantize, conv, copy, fused, elementwise, reduce, other) and the
top kernels by time; then MLX's NVTX ranges (host time per primitive) and the CUDA API calls, by
total host time (where the host waits, or builds plans).
"""

import argparse
import ctypes
import glob
import json
import os
import re
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cudart():
    """The CUDA runtime MLX uses (pip's nvidia packages), for cudaProfilerStart/Stop; else the driver."""
    try:
        import nvidia

        for root in nvidia.__path__:
            for path in sorted(glob.glob(os.path.join(root, "**", "libcudart.so*"), recursive=True)):
                lib = ctypes.CDLL(path)
                return lib.cudaProfilerStart, lib.cudaProfilerStop
    except (ImportError, OSError):
        pass
    lib = ctypes.CDLL("libcuda.so.1")
    return lib.cuProfilerStart, lib.cuProfilerStop


def run(args) -> None:
    import bench_flux as bf
    import mlx.core as mx

    from mflux.runtime import memory

    size = bf.SIZES[args.size]
    dtype = mx.bfloat16
    if args.what == "step":  # one dev-sized network times both variants (bench_flux.section_step)
        flux = bf.build("transformer", size, dtype, bf.QUANTS.get(args.quant), "dev")
        x = bf.step_inputs(flux, size, "schnell", dtype)
        pe = flux.positions(x["img_ids"], x["txt_ids"])
        mods = flux.modulations([1.0, 0.75, 0.5, 0.25], x["y"], mx.array([3.5]))
        mx.eval(pe, mods)
        flux.free_modulation_weights()

        def call():
            return flux.predict(x["img"], x["txt"], pe, mods[0:1].squeeze(0))

        bound = 2.0
    else:
        vae = bf.build("vae", size, dtype, None)
        z = mx.random.normal((1, size.res // 8, size.res // 8, size.vae.latent_channels)).astype(dtype)
        mx.eval(z)
        band = args.band_mb * 2**20 if args.band_mb else None

        def call():
            return vae.decode(z, band_bytes=band)

        bound = 2.0
    start, stop = _cudart() if mx.default_device() != mx.cpu else (lambda: 0, lambda: 0)
    with memory.bounded(bound):
        for _ in range(2):
            mx.eval(call())
        mx.synchronize()
        mx.reset_peak_memory()
        start()
        times = []
        for _ in range(args.calls):
            t = time.perf_counter()
            mx.eval(call())
            mx.synchronize()
            times.append(time.perf_counter() - t)
        stop()
    print(
        json.dumps(
            {
                "what": "profiled",
                "call": args.what,
                "quant": args.quant,
                "band_mb": args.band_mb,
                "calls_s": [round(t, 5) for t in times],
                "peak_gb": mx.get_peak_memory() / 1e9,
            }
        ),
        flush=True,
    )


CLASSES = [  # first match wins; MLX's kernel names, cuBLAS's, cuDNN's, ours
    ("dequantize", r"dequant|affine|mflux_dequantize"),
    ("attention", r"flash|fmha|sdpa|attention|attn"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|matmul|_mm_"),
    ("conv", r"conv|implicit|winograd|fft"),
    ("copy", r"copy|memcpy|transpose|pad|concat"),
    ("fused", r"compiled|fused|jit"),
    ("elementwise", r"unary|binary|ternary|elementwise"),
    ("reduce", r"reduce|norm|softmax|scan|arg"),
]


def _class(name: str) -> str:
    low = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, low):
            return label
    return "other"


def analyze(args) -> None:
    db = sqlite3.connect(args.sqlite)
    names = dict(db.execute("SELECT id, value FROM StringIds"))
    rows = db.execute(
        "SELECT start, end, COALESCE(demangledName, shortName) FROM CUPTI_ACTIVITY_KIND_KERNEL ORDER BY start"
    ).fetchall()
    if not rows:
        print(json.dumps({"what": "profile", "file": args.sqlite, "kernels": 0}))
        return
    span = rows[-1][1] - rows[0][0]
    busy, gaps, cur_end = 0, [], rows[0][0]
    for s, e, _ in rows:
        if s > cur_end:
            gaps.append(s - cur_end)
        busy += max(0, e - max(s, cur_end))
        cur_end = max(cur_end, e)
    by_class: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for s, e, n in rows:
        name = names.get(n, str(n))
        by_class[_class(name)] = by_class.get(_class(name), 0) + (e - s)
        entry = by_name.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += e - s
    calls = max(1, args.calls)
    ms = 1e6 * calls  # ns -> ms per call
    print(
        json.dumps(
            {
                "what": "profile",
                "file": Path(args.sqlite).name,
                "calls": calls,
                "kernels_per_call": len(rows) / calls,
                "span_ms_per_call": span / ms,
                "busy_ms_per_call": busy / ms,
                "idle_ms_per_call": (span - busy) / ms,
                "gaps_over_20us_per_call": sum(1 for g in gaps if g > 20_000) / calls,
                "gap_ms_over_20us_per_call": sum(g for g in gaps if g > 20_000) / ms,
                "largest_gaps_ms": [round(g / 1e6, 3) for g in sorted(gaps)[-5:]],
                "class_ms_per_call": {
                    k: round(v / ms, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])
                },
            }
        )
    )
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]
    for name, (count, total) in top:
        print(
            json.dumps(
                {
                    "what": "kernel",
                    "class": _class(name),
                    "ms_per_call": round(total / ms, 3),
                    "count_per_call": count / calls,
                    "avg_us": round(total / count / 1e3, 2),
                    "name": name[:160],
                }
            )
        )
    try:
        api = db.execute(
            "SELECT nameId, COUNT(*), SUM(end - start) FROM CUPTI_ACTIVITY_KIND_RUNTIME GROUP BY nameId "
            "ORDER BY SUM(end - start) DESC LIMIT 12"
        ).fetchall()
    except sqlite3.Error:
        api = []
    try:  # MLX's own NVTX ranges: host time in each primitive's eval_gpu (a cuDNN plan built, a wait)
        nvtx = db.execute(
            "SELECT COALESCE(text, textId), COUNT(*), SUM(end - start) FROM NVTX_EVENTS WHERE end > start "
            "GROUP BY 1 ORDER BY 3 DESC LIMIT 12"
        ).fetchall()
    except sqlite3.Error:
        nvtx = []
    for n, count, total in nvtx:
        name = names.get(n, str(n)) if isinstance(n, int) else n
        print(
            json.dumps(
                {
                    "what": "nvtx",
                    "name": name,
                    "count_per_call": count / calls,
                    "ms_per_call": round(total / ms, 3),
                }
            )
        )
    for n, count, total in api:
        print(
            json.dumps(
                {
                    "what": "api",
                    "name": names.get(n, str(n)),
                    "count_per_call": count / calls,
                    "ms_per_call": round(total / ms, 3),
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--what", choices=("step", "decode"), default="step")
    r.add_argument("--quant", default="bf16", help="bf16, q8 or q4 (step)")
    r.add_argument("--band-mb", type=int, default=0, help="decode: row bands of this size; 0 whole-tensor")
    r.add_argument("--calls", type=int, default=3)
    r.add_argument("--size", default="full", help="full, or tiny to check it on a CPU")
    a = sub.add_parser("analyze")
    a.add_argument("sqlite")
    a.add_argument("--calls", type=int, default=3)
    a.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else analyze(args)


if __name__ == "__main__":
    main()
