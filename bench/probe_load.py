"""What bounds reading weights onto the device (issue 12, target 2): a folder of safetensors shards read
several ways, each in its own process, each printing GB/s as a JSON line.

    python bench/probe_load.py DIR [--ways read,mx_load,...] [--threads 8]

- read: the files' bytes into host memory, one file after another (the page cache or disk's rate).
- read_threads: the same from `--threads` threads at once.
- mx_load: what mflux's loader does per shard, `mx.load` then `mx.eval` of its arrays, one shard at a time.
- mx_load_all: every shard's `mx.load` first, then one `mx.eval` of all the arrays.
- mx_load_threads: `mx.load` + `mx.eval` of a different shard in each of `--threads` threads.
- numpy_threads: each thread reads its shard's bytes and makes each tensor with `mx.array` from a numpy
  view of them (no second read of the file).
- mx_load_cpu_threads: `mx_load_threads` on MLX's CPU stream (`Load` reads straight into the array's
  buffer there, where the GPU stream's reads into host memory and copies that over). Its line adds two
  GPU passes over every array after the load (`touch1_s`, `touch2_s`): the first moves what the GPU
  needs, the second shows whether it stays on the device. Every way's line has those passes too.
- mx_load_cpu_prefetch: `mx_load_cpu_threads`, and each thread asks the CUDA driver to move its shard's
  arrays to the GPU as soon as they are read (`cuMemPrefetchAsync` on their managed memory, in bulk,
  where the first GPU pass moves them page fault by page fault: `mflux.runtime.device.prefetch`, as
  the loader calls it). Its line adds `prefetch_refused`.
- mx_load_cpu_prefetch_detached: the same, then each array passed through `mx.stop_gradient` on the GPU
  stream (a new array on the same buffer, made by the GPU stream, not the CPU stream).
- mx_load_cpu_prefetch_copy: `mx_load_cpu_prefetch`, then each thread copies its shard's arrays on the
  default stream (`mflux.runtime.loader._device_copy`: into the device's own memory, where MLX gives
  CPU-stream arrays managed memory) and drops the managed ones, as `loader.LOAD_STREAM` "cpu-copy" does.
- asarray: not a read. A 1 GiB array computed on the GPU, then `np.asarray` of it twice, timed (`as1_s`,
  `as2_s`), and whether the driver calls its memory managed after (`managed`): a first call far slower
  than the second means MLX moved a device buffer into managed memory to hand out its host pointer.

Every GPU way's line also has three matmul passes over the arrays after the touches (`mm*_s`: a
16-row product with each, memory-bound), the compute a model does with its weights.

`--write-gb N` first writes N GB of random bf16 shards (1 GiB each) into the folder, if it has none.

The files are expected to be in the page cache (bench/gpu.sh writes them just before), so `read` is the
rate a loader could reach if copying onto the device cost nothing.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WAYS = (
    "read",
    "read_threads",
    "mx_load",
    "mx_load_all",
    "mx_load_threads",
    "numpy_threads",
    "mx_load_cpu_threads",
    "mx_load_cpu_prefetch",
    "mx_load_cpu_prefetch_detached",
    "mx_load_cpu_prefetch_copy",
    "asarray",
)


def _read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _numpy_arrays(path: Path) -> list:
    import mlx.core as mx
    import numpy as np

    data = _read(path)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    base, out = 8 + n, []
    kinds = {"BF16": (np.uint16, mx.bfloat16), "F16": (np.float16, None), "F32": (np.float32, None)}
    kinds |= {"U32": (np.uint32, None), "U8": (np.uint8, None)}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        np_dtype, view = kinds[t["dtype"]]
        a, b = t["data_offsets"]
        arr = mx.array(
            np.frombuffer(data, dtype=np_dtype, count=(b - a) // np.dtype(np_dtype).itemsize, offset=base + a)
        )
        out.append((arr.view(view) if view else arr).reshape(t["shape"]))
    mx.eval(out)
    return out


def _write(folder: Path, gb: float) -> None:
    """Random bf16 shards of 1 GiB, eight 128 MiB tensors each, written with the safetensors layout."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 2**16, 2**26, dtype=np.uint16)  # 128 MiB, reused: the bytes don't matter
    for i in range(max(1, round(gb * 1e9 / 2**30))):
        header = {
            f"t{j}": {"dtype": "BF16", "shape": [2**13, 2**13], "data_offsets": [j * 2**27, (j + 1) * 2**27]}
            for j in range(8)
        }
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / f"shard-{i:03d}.safetensors", "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for _ in range(8):
                f.write(block.tobytes())


def run_way(way: str, files: list[Path], threads: int) -> None:
    import mlx.core as mx

    from mflux.runtime import device, loader

    total = sum(f.stat().st_size for f in files)
    kept: list = []  # the loaded arrays, for the GPU passes after the load
    t = time.perf_counter()
    if way == "read":
        for f in files:
            _read(f)
    elif way == "read_threads":
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(_read, files))
    elif way == "mx_load":
        for f in files:
            arrays = mx.load(str(f))
            mx.eval(arrays)
            del arrays
    elif way == "mx_load_all":
        arrays = [mx.load(str(f)) for f in files]
        mx.eval(arrays)
    elif way == "asarray":
        print(json.dumps({"what": "asarray_probe", **_asarray_probe()}), flush=True)
        return
    elif way in (
        "mx_load_threads",
        "mx_load_cpu_threads",
        "mx_load_cpu_prefetch",
        "mx_load_cpu_prefetch_detached",
        "mx_load_cpu_prefetch_copy",
    ):
        stream = mx.cpu if way.startswith("mx_load_cpu") else None
        prefetch = way.startswith("mx_load_cpu_prefetch")
        refused = []

        def one(f):
            arrays = mx.load(str(f), stream=stream)
            mx.eval(arrays)
            if prefetch:  # as the loader does (mflux.runtime.device), on this thread's own stream
                if not device.prefetch(list(arrays.values())):
                    refused.append(f)
                device.prefetch_wait()
            if way.endswith("_copy"):  # as loader.LOAD_STREAM "cpu-copy" does
                copies = [loader._device_copy(a) for a in arrays.values()]
                mx.eval(copies)
                return copies
            return list(arrays.values())

        with ThreadPoolExecutor(threads) as pool:
            for arrays in pool.map(one, files):
                kept.extend(arrays)
        if way.endswith("_detached"):
            kept = [mx.stop_gradient(a) for a in kept]
            mx.eval(kept)
    elif way == "numpy_threads":
        with ThreadPoolExecutor(threads) as pool:
            for arrays in pool.map(_numpy_arrays, files):
                kept.extend(arrays)
    mx.synchronize()
    s = time.perf_counter() - t
    touches = []
    for _ in range(2 if kept and mx.default_device() != mx.cpu else 0):
        t2 = time.perf_counter()
        mx.eval([mx.max(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a, stream=mx.gpu) for a in kept])
        mx.synchronize()
        touches.append(round(time.perf_counter() - t2, 3))
    matmuls = []
    for _ in range(3 if kept and mx.default_device() != mx.cpu else 0):
        t2 = time.perf_counter()
        mx.eval([(mx.ones((16, a.shape[-1]), a.dtype) @ a.T).sum() for a in kept if a.ndim == 2])
        mx.synchronize()
        matmuls.append(round(time.perf_counter() - t2, 4))
    line = {
        "what": "load_probe",
        "way": way,
        "threads": threads if way not in ("read", "mx_load", "mx_load_all") else 1,
        "files": len(files),
    }
    line |= {"gb": round(total / 1e9, 3), "s": round(s, 3), "gb_per_s": round(total / 1e9 / s, 3)}
    line |= {"peak_gb": round(mx.get_peak_memory() / 1e9, 3)}
    line |= {f"touch{i + 1}_s": v for i, v in enumerate(touches)}
    line |= {f"mm{i + 1}_s": v for i, v in enumerate(matmuls)}
    if way.startswith("mx_load_cpu_prefetch"):
        line["prefetch_refused"] = len(refused)  # shards the driver would not prefetch
    if touches:
        line["load_touch_gb_per_s"] = round(total / 1e9 / (s + touches[0]), 3)
    print(json.dumps(line), flush=True)


def _asarray_probe() -> dict:
    import ctypes

    import mlx.core as mx
    import numpy as np

    a = mx.zeros((2**28,), mx.uint32) + 1  # computed on the GPU stream
    mx.eval(a)
    mx.synchronize()
    out = {}
    for i in (1, 2):
        t = time.perf_counter()
        pointer = np.asarray(a).__array_interface__["data"][0]
        out[f"as{i}_s"] = round(time.perf_counter() - t, 5)
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return out | {"managed": None}  # no CUDA driver here
    managed = ctypes.c_uint(0)
    # CU_POINTER_ATTRIBUTE_IS_MANAGED = 8
    rc = cuda.cuPointerGetAttribute(ctypes.byref(managed), 8, ctypes.c_uint64(pointer))
    return out | {"managed": bool(managed.value) if rc == 0 else f"rc {rc}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a folder of .safetensors files (searched recursively)")
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--write-gb", type=float, default=0, help="first write this many GB of shards, if none")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per way")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one way
    args = ap.parse_args()
    if args.write_gb and not any(Path(args.folder).rglob("*.safetensors")):
        _write(Path(args.folder), args.write_gb)
    files = sorted(Path(args.folder).rglob("*.safetensors"))
    if not files:
        sys.exit(f"error: no .safetensors files under {args.folder}")
    if args.one:
        run_way(args.one, files, args.threads)
        return
    for way in [w for w in args.ways.split(",") if w]:
        cmd = [sys.executable, __file__, args.folder, "--one", way, "--threads", str(args.threads)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=os.environ)
        except subprocess.TimeoutExpired:
            print(json.dumps({"what": "load_probe_failed", "way": way, "why": "timeout"}), flush=True)
            continue
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode or not lines:
            why = {"rc": out.returncode, "stderr": out.stderr[-400:]}
            print(json.dumps({"what": "load_probe_failed", "way": way, **why}), flush=True)
        for x in lines:
            print(x, flush=True)


if __name__ == "__main__":
    main()
