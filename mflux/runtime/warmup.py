"""Building MLX's run-time kernels in other processes while this one loads weights (issue 12, target 3).

On CUDA, MLX builds each `mx.compile`d graph's kernels with NVRTC the first time a process needs them,
unless its kernel cache (`mflux.backend.kernel_cache_dir`) holds them already. The transformer's steps
and the VAE need six such modules (`tasks`), each a few seconds of one CPU core: on the H200 a fresh
process built them one after another inside its first step, 26 s in all (round 4 in
docs/PERFORMANCE.md). A module's name comes from its graph's ops, dtypes and broadcasts, not from the
array sizes, so a call on tiny arrays builds the very module a full-size step needs.

So the first time a `Flux1` on CUDA loads a component, `start` launches one child process per graph,
all at once. Each builds its module into its own staging folder, then moves it into the cache
(`publish`: each file renamed into place, a module's kernel list before its code, so no process reads
a half-written one). Meanwhile this process reads the weights and encodes the prompts (the encoders
use no run-time kernels on CUDA, `mflux.runtime.jitfree`); before its first transformer computation it
waits for the children (`Warmup.wait`), finds every module in the cache, and marks the cache as
holding them, so that later processes start none.

Each child costs a CUDA context on the same GPU (a few hundred MB) and one CPU core for the seconds it
runs. `WARM` says where this happens: on Metal MLX builds its kernels too, but no Mac was measured, so
Metal keeps today's behaviour; the CPU backend builds compiled graphs with the system compiler into its
own temporary folder, which MLX_PTX_CACHE_DIR does not move.
"""

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mflux.runtime.qmatmul import backend

WARM = {"cuda": True, "metal": False, "cpu": False}
WAIT_S = 90  # the most the first transformer computation waits for the children; then it builds for itself
STALE_S = 3600  # a staging folder this old was left by a process that died
MARKER = "mflux-warm-{}.done"
STAGING = ".mflux-warm-"
LOG = "mflux-warm.log"  # the child's output; a failed child's is moved beside the cache


def key(dtype: mx.Dtype) -> str:
    """The marker's key: MLX's version, mflux's and the dtype. Neither the quantization (dequantizing uses
    MLX's prebuilt kernel) nor the variant (dev adds a conditioning MLP of the same graphs) changes the
    graphs. A graph changed without a new mflux version keeps the marker: that module is then built by
    the first process that needs it, as without a warm-up."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mflux_version = version("mflux")
    except PackageNotFoundError:  # run from a source tree
        mflux_version = "source"
    what = [mx.__version__, mflux_version, str(dtype)]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


class Warmup:
    """Child processes, each building one graph's kernels into its own staging folder and moving them into
    the cache; `wait` before the first computation that needs them."""

    def __init__(self, names: list[str], procs: list[subprocess.Popen], stagings: list[Path], marker: Path):
        self.names, self.procs, self.stagings, self.marker = names, procs, stagings, marker
        atexit.register(self.stop)

    def wait(self, timeout: float = WAIT_S) -> bool:
        """Whether every child finished within `timeout` seconds; then the cache is marked as holding
        them all, and later processes start none."""
        end = time.monotonic() + timeout
        try:
            codes = [p.wait(max(0.0, end - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            return False
        if any(codes):
            return False
        try:
            self.marker.write_text(json.dumps({"tasks": self.names}))
        except OSError:
            pass
        return True

    def stop(self) -> None:
        """Kill the children that still run, and remove their staging folders; a failed child's output
        is kept as <cache>/mflux-warm.log."""
        for proc, staging in zip(self.procs, self.stagings):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            elif proc.returncode and (staging / LOG).exists():
                os.replace(staging / LOG, staging.parent / LOG)
            shutil.rmtree(staging, ignore_errors=True)


def start(dtype: mx.Dtype, cache: Path | None = None) -> Warmup | None:
    """The children for this backend and dtype, or None where none is needed (`WARM`, or the cache holds
    its marker already) or the cache folder can't be written."""
    if not WARM[backend()]:
        return None
    cache = Path(cache or os.environ.get("MLX_PTX_CACHE_DIR") or "")
    if not str(cache):
        return None
    marker = cache / MARKER.format(key(dtype))
    if marker.exists():
        return None
    names = sorted(tasks(dtype))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _remove_stale(cache)
        stagings = [Path(_mkdtemp(cache)) for _ in names]
    except OSError:
        return None  # a read-only cache: MLX builds in-process, as without this
    procs = []
    for task, staging in zip(names, stagings):
        args = {"dtype": str(dtype).split(".")[-1], "task": task, "cache": str(cache)}
        with open(staging / LOG, "w") as log:  # kept only if the child fails (see Warmup.stop)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mflux.runtime.warmup", json.dumps(args)],
                    env={**os.environ, "MLX_PTX_CACHE_DIR": str(staging)},
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            )
    return Warmup(names, procs, stagings, marker)


def _mkdtemp(cache: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=STAGING, dir=cache)


def _remove_stale(cache: Path) -> None:
    now = time.time()
    for p in cache.glob(STAGING + "*"):
        try:
            if now - p.stat().st_mtime > STALE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def publish(staging: Path, cache: Path) -> list[str]:
    """Move what was built in `staging` into `cache`, at the same relative paths (MLX turns a '/' in a
    long graph name into folders), and return the modules moved. Each file is renamed into place
    (atomic on one file system), a module's kernel list and source before its code: MLX takes a
    module as cached once its code file (.ptx) exists."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != LOG)
    for p in [*(p for p in files if p.suffix != ".ptx"), *(p for p in files if p.suffix == ".ptx")]:
        dest = cache / p.relative_to(staging)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, dest)
    return [str(p.relative_to(staging).with_suffix("")) for p in files if p.suffix == ".ptx"]


# ---------------------------------------------------------------- what the children run


def tasks(dtype: mx.Dtype) -> dict:
    """One call per compiled graph of a generation, on tiny arrays shaped and typed as the model passes
    them (a graph's kernel name follows its ops, dtypes and broadcasts, not its sizes). Each child runs
    one, so the graphs build side by side. tests/test_warmup.py checks that together they build every
    graph that real generations build."""
    from mflux.runtime import layers

    def x(*shape):
        return mx.random.normal(shape).astype(dtype)

    def rope():
        ids = mx.zeros((1, 8, 3))
        return layers.rope(ids, (16, 56, 56))

    return {
        "silu": lambda: nn.silu(x(1, 64)),  # the conditioning MLPs, the modulations and the VAE
        "gelu": lambda: nn.gelu_approx(x(1, 8, 64)),  # the transformer's MLPs
        "gated": lambda: layers.gated(x(1, 8, 64), x(1, 64), x(1, 8, 64)),  # every residual
        "scale_shift": lambda: layers.modulate(x(2, 8, 64), x(2, 64), x(2, 64)),  # batches of 2 or more
        "rotate": lambda: layers.rotate(x(1, 8, 2, 128), rope()),  # q and k
    }


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    try:
        os.nice(10)  # the parent's loading threads come first
    except OSError:
        pass
    start = time.perf_counter()
    mx.eval(tasks(getattr(mx, args["dtype"]))[args["task"]]())
    mx.synchronize()
    print(f"{args['task']}: built in {time.perf_counter() - start:.2f} s", flush=True)
    publish(Path(os.environ["MLX_PTX_CACHE_DIR"]), Path(args["cache"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
