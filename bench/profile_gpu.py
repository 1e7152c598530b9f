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
- `decode`: the VAE decode of one 1024x1024 latent, whole-tensor (`--band-mb 0`) or in row bands;
- `train`: one LoRA training step of `bench_train.py`'s mflux side (dev, rank 16, 512 text tokens, every
  block checkpointed) at `--res`.

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
from contextlib import contextmanager, nullcontext
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


@contextmanager
def _tracer(kind: str, trace: str | None):
    """`nsys`: open Nsight Systems' capture range (run under `nsys profile --capture-range=cudaProfilerApi`).
    `torch`: PyTorch's profiler, whose CUPTI activity records every kernel of the process, MLX's too;
    its Chrome trace goes to `trace`."""
    import mlx.core as mx

    if kind == "nsys":
        start, stop = _cudart() if mx.default_device() != mx.cpu else (lambda: 0, lambda: 0)
        start()
        try:
            yield
        finally:
            stop()
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    gpu = mx.default_device() != mx.cpu and torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        yield
    prof.export_chrome_trace(trace)


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

        bound = "auto"  # the runtime's queue bound, 2 GB on CUDA
    elif args.what == "train":  # bench_train.py's mflux step: dev, rank 16, batch 1, blocks checkpointed
        import bench_train

        step, _ = bench_train.mflux_step(
            argparse.Namespace(
                size=args.size,
                quant=args.quant,
                res=args.res,
                txt=512,
                no_checkpoint=False,
                headroom=bf.parse_headroom(args.headroom),
            )
        )

        def call():
            step()  # evaluated under its own bound (--headroom)
            return mx.array(0)

        bound = None
    else:
        vae = bf.build("vae", size, dtype, None)
        z = mx.random.normal((1, size.res // 8, size.res // 8, size.vae.latent_channels)).astype(dtype)
        mx.eval(z)
        band = args.band_mb * 2**20 if args.band_mb else None

        def call():
            return vae.decode(z, band_bytes=band)

        bound = "auto"  # the runtime's queue bound, 2 GB on CUDA
    with memory.bounded(bound) if bound else nullcontext():
        for _ in range(2):
            mx.eval(call())
        mx.synchronize()
        mx.reset_peak_memory()
        with _tracer(args.tracer, args.trace):
            times = []
            for _ in range(args.calls):
                t = time.perf_counter()
                mx.eval(call())
                mx.synchronize()
                times.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "what": "profiled",
                "call": args.what,
                "quant": args.quant,
                "band_mb": args.band_mb,
                "res": args.res if args.what == "train" else None,
                "calls_s": [round(t, 5) for t in times],
                "peak_gb": mx.get_peak_memory() / 1e9,
            }
        ),
        flush=True,
    )


CLASSES = [  # first match wins; MLX's kernel names, cuBLAS's, cuDNN's, ours
    ("glue", r"mflux_qk_rope|mflux_gelu_concat"),  # runtime.kernels
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


def _sqlite_records(path: str) -> tuple[list, list, list]:
    """(kernels, host ranges, API calls) from Nsight Systems' SQLite export: (start_ns, end_ns, name)."""
    db = sqlite3.connect(path)
    names = dict(db.execute("SELECT id, value FROM StringIds"))
    kernels = [
        (s, e, names.get(n, str(n)))
        for s, e, n in db.execute(
            "SELECT start, end, COALESCE(demangledName, shortName) FROM CUPTI_ACTIVITY_KIND_KERNEL"
        )
    ]

    def rows(query):
        try:
            return [(s, e, names.get(n, n) if isinstance(n, int) else n) for s, e, n in db.execute(query)]
        except sqlite3.Error:
            return []

    ranges = rows("SELECT start, end, COALESCE(text, textId) FROM NVTX_EVENTS WHERE end > start")
    api = rows("SELECT start, end, nameId FROM CUPTI_ACTIVITY_KIND_RUNTIME")
    return kernels, ranges, api


def _trace_records(path: str) -> tuple[list, list, list]:
    """The same from a Chrome trace of PyTorch's profiler (times in microseconds)."""
    events = json.loads(Path(path).read_text()).get("traceEvents", [])

    def rows(cats):
        return [
            (e["ts"] * 1e3, (e["ts"] + e.get("dur", 0)) * 1e3, e.get("name", "?"))
            for e in events
            if e.get("cat") in cats and e.get("ph") == "X"
        ]

    return (
        rows({"kernel"}),
        rows({"user_annotation", "gpu_user_annotation"}),
        rows({"cuda_runtime", "cuda_driver"}),
    )


def analyze(args) -> None:
    records = _sqlite_records if args.file.endswith(".sqlite") else _trace_records
    kernels, ranges, api = records(args.file)
    kernels.sort()
    calls = max(1, args.calls)
    ms = 1e6 * calls  # ns -> ms per call
    if not kernels:
        print(json.dumps({"what": "profile", "file": Path(args.file).name, "kernels": 0}))
        return
    span = kernels[-1][1] - kernels[0][0]
    busy, gaps, cur_end = 0, [], kernels[0][0]
    by_class: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for s, e, name in kernels:
        if s > cur_end:
            gaps.append(s - cur_end)
        busy += max(0, e - max(s, cur_end))
        cur_end = max(cur_end, e)
        by_class[_class(name)] = by_class.get(_class(name), 0) + (e - s)
        entry = by_name.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += e - s
    print(
        json.dumps(
            {
                "what": "profile",
                "file": Path(args.file).name,
                "calls": calls,
                "kernels_per_call": len(kernels) / calls,
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
    for name, (count, total) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(
            json.dumps(
                {
                    "what": "kernel",
                    "class": _class(name),
                    "ms_per_call": round(total / ms, 3),
                    "count_per_call": count / calls,
                    "avg_us": round(total / count / 1e3, 2),
                    "name": name[:300],
                }
            )
        )
    # host time: MLX's NVTX ranges (per primitive's eval_gpu: a cuDNN plan built, a wait), API calls
    for what, recs in (("host_range", ranges), ("api", api)):
        sums: dict[str, list] = {}
        for s, e, name in recs:
            entry = sums.setdefault(str(name), [0, 0])
            entry[0] += 1
            entry[1] += e - s
        for name, (count, total) in sorted(sums.items(), key=lambda kv: -kv[1][1])[:12]:
            print(
                json.dumps(
                    {
                        "what": what,
                        "name": name[:120],
                        "count_per_call": count / calls,
                        "ms_per_call": round(total / ms, 3),
                    }
                )
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--what", choices=("step", "decode", "train"), default="step")
    r.add_argument("--quant", default="bf16", help="bf16, q8 or q4 (step, train)")
    r.add_argument("--res", type=int, default=1024, help="train: the training resolution")
    r.add_argument("--headroom", default="train", help="train: the step's queue bound (bench_train.py's)")
    r.add_argument("--band-mb", type=int, default=0, help="decode: row bands of this size; 0 whole-tensor")
    r.add_argument("--calls", type=int, default=3)
    r.add_argument("--size", default="full", help="full, or tiny to check it on a CPU")
    r.add_argument("--tracer", choices=("torch", "nsys"), default="torch")
    r.add_argument("--trace", default="trace.json", help="torch: where the Chrome trace goes")
    a = sub.add_parser("analyze")
    a.add_argument("file", help="an Nsight Systems .sqlite export, or a torch profiler's Chrome trace")
    a.add_argument("--calls", type=int, default=3)
    a.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    run(args) if args.cmd == "run" else analyze(args)


if __name__ == "__main__":
    main()
