"""Building MLX's run-time kernels in other processes, while this one goes on without them.

On CUDA, MLX builds each `mx.compile`d graph's kernels with NVRTC the first time a process needs them,
unless its kernel cache (`mflux.backend.kernel_cache_dir`) holds them: a fresh process built the
transformer's and the VAE's one after another inside its first step, 26 s on an H200. A kernel's name
follows its graph's ops, dtypes and broadcasts, not its sizes, so tiny arrays build what full size needs.

So the first load starts one child process per graph the cache lacks (`tasks`). Each builds into its own
staging folder, moves the files into the cache (`publish`: code last, so no process reads half a
module) and writes its task's marker, so later processes start none. Until every task is in the cache
this process evaluates with MLX's compilation off (`compile_when_ready`): the same ops from MLX's
prebuilt kernels. Children outlive their parent; one that fails leaves its output beside the cache
(`LOG`) and no marker, and its graph is then built in-process as without a warm-up.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mflux.backend import kernel_cache_dir
from mflux.runtime.cuda import tuning

STALE_S = 3600  # a staging folder this old was left by a process that died
MARKER = "mflux-warm-{}-{}.done"  # key, task: that task's module is in the cache
TRAIN_MARKER = "mflux-train-{}-{}.done"  # key, base: a training step's kernels are in the cache
STAGING = ".mflux-warm-"  # + key-task-random: a child building it
LOG = "mflux-warm.log"  # the child's output; a failed child's is moved beside the cache


def key(dtype: mx.Dtype) -> str:
    """The markers' key: MLX's version, mflux's and the dtype. Neither the quantization (the tasks hold
    the 8-bit dequantize graph whatever the model) nor the variant (dev adds a conditioning MLP of the
    same graphs) changes the graphs. A graph changed without a new mflux version keeps the marker: that module is then built by
    the first process that needs it, as without a warm-up."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        mflux_version = version("mflux")
    except PackageNotFoundError:  # run from a source tree
        mflux_version = "source"
    what = [mx.__version__, mflux_version, str(dtype)]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


class Warmup:
    """The graphs of one dtype: the children this process started for some of them (`procs`, `stagings`,
    by task), and where each one's marker goes."""

    def __init__(self, cache: Path, key: str, names: list[str], procs: dict, stagings: dict):
        self.cache, self.key, self.names = cache, key, names
        self.procs: dict[str, subprocess.Popen] = procs
        self.stagings: dict[str, Path] = stagings

    def marker(self, task: str) -> Path:
        return self.cache / MARKER.format(self.key, task)

    def ready(self) -> bool:
        """Whether nothing is left to wait for: each task is in the cache, or its child here has ended
        (a failed one: the graph builds in-process), or no child anywhere is building it."""
        return all(self._settled(task) for task in self.names)

    def _settled(self, task: str) -> bool:
        if self.marker(task).exists():
            return True
        if task in self.procs:
            return self.procs[task].poll() is not None
        return not _building(self.cache, self.key, task)  # another process's child, if one is fresh

    def done(self) -> bool:
        """Whether every task is in the cache."""
        return all(self.marker(task).exists() for task in self.names)

    def wait(self, timeout: float = 120) -> bool:
        """Wait until `ready`, at most `timeout` seconds; then whether every task is in the cache."""
        end = time.monotonic() + timeout
        while not self.ready() and time.monotonic() < end:
            time.sleep(0.05)
        return self.done()

    def stop(self) -> None:
        """Kill this process's children that still run, and remove their staging folders (a benchmark's
        or a test's clean-up: a generation leaves them to finish)."""
        for task, proc in self.procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            shutil.rmtree(self.stagings[task], ignore_errors=True)


def start(dtype: mx.Dtype, cache: Path | None = None) -> Warmup | None:
    """The children for this dtype, one per graph that the cache lacks and no other process is
    building; None where nothing is needed (`Tuning.warm` off, or every graph is marked) or the cache
    folder can't be written."""
    if not tuning().warm:
        return None
    cache = Path(cache or os.environ.get("MLX_PTX_CACHE_DIR") or "")
    if not str(cache):
        return None
    k = key(dtype)
    names = sorted(tasks(dtype))
    missing = [t for t in names if not (cache / MARKER.format(k, t)).exists()]
    if not missing:
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _remove_stale(cache)
        todo = [t for t in missing if not _building(cache, k, t)]
        stagings = {t: Path(_mkdtemp(cache, f"{STAGING}{k}-{t}-")) for t in todo}
    except OSError:
        return None  # a read-only cache: MLX builds in-process, as without this
    procs = {}
    for task, staging in stagings.items():
        args = {
            "dtype": str(dtype).split(".")[-1],
            "task": task,
            "cache": str(cache),
            "marker": MARKER.format(k, task),
        }
        with open(staging / LOG, "w") as log:  # moved beside the cache if the child fails
            procs[task] = subprocess.Popen(
                [sys.executable, "-m", "mflux.runtime.cuda.warmup", json.dumps(args)],
                env={**os.environ, "MLX_PTX_CACHE_DIR": str(staging)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in the terminal stops the generation, not the build
            )
    return Warmup(cache, k, names, procs, stagings)


@contextmanager
def compile_when_ready(job: "Warmup | None"):
    """MLX's compilation off inside, if `job` is still building (see the module's docstring); yields
    whether it is off."""
    cold = bool(job) and not job.ready()
    if cold:
        mx.disable_compile()
    try:
        yield cold
    finally:
        if cold and "MLX_DISABLE_COMPILE" not in os.environ:  # the user's own setting stays
            mx.enable_compile()


def compile_when_ready_each(events: Iterator, job: Callable[[], "Warmup | None"]) -> Iterator:
    """`events`, each one produced (and the caller's work on it done) under `compile_when_ready(job())`,
    decided again before each: a generation compiles from the first step after the children finish.
    `job` is called each time, since the warm-up starts with the first load, inside the events."""
    events = iter(events)
    while True:
        with compile_when_ready(job()):
            try:
                event = next(events)
            except StopIteration:
                return
            yield event


def training_marker(dtype: mx.Dtype, base: str) -> Path | None:
    """Where a training step's kernels are marked as built in the kernel cache, where the warm-up runs
    (`Tuning.warm`); None elsewhere. No child builds a training step's: the
    compiled step with its backward pass is hundreds of graphs, built one after another by its first
    call (on the H200, 125-178 s for a bf16 base on an empty cache, then 25-36 s for a q8 base; warm,
    3 s). So the trainer says so before that call when the marker is missing, and writes it after.
    `base`: "float", "q8", "q4" (each quantization adds its own graphs)."""
    if not tuning().warm:
        return None
    return kernel_cache_dir() / TRAIN_MARKER.format(key(dtype), base)


def _building(cache: Path, k: str, task: str) -> bool:
    return any(cache.glob(f"{STAGING}{k}-{task}-*"))


def _mkdtemp(cache: Path, prefix: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=prefix, dir=cache)


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
    from mflux.runtime.cuda import qmatmul

    def x(*shape):
        return mx.random.normal(shape).astype(dtype)

    def dequantize():  # an 8-bit layer's weight (qmatmul's fused dequantize), two groups a row
        return qmatmul.dequantize_fused(*mx.quantize(x(4, 128), 64, 8), 64)

    def rope():
        ids = mx.zeros((1, 8, 3))
        return layers.rope(ids, (16, 56, 56))

    return {
        "silu": lambda: nn.silu(x(1, 64)),  # the conditioning MLPs, the modulations and the VAE
        "gelu": lambda: nn.gelu_approx(x(1, 8, 64)),  # the transformer's MLPs, without runtime.kernels
        "gelu32": lambda: layers.gelu_f32(x(1, 8, 64)),  # the double blocks' MLPs, with them
        "gated": lambda: layers.gated(x(1, 8, 64), x(1, 64), x(1, 8, 64)),  # every residual
        "scale_shift": lambda: layers.modulate(x(2, 8, 64), x(2, 64), x(2, 64)),  # batches of 2 or more
        "rotate": lambda: layers.rotate(x(1, 8, 2, 128), rope()),  # q and k
        "dequantize8": dequantize,
    }


def main(argv: list[str]) -> int:
    """One child: build the task's graph into MLX_PTX_CACHE_DIR (its staging folder), publish it, mark
    it, remove the staging folder. On failure its output (stdout and stderr) goes beside the cache."""
    args = json.loads(argv[0])
    staging, cache = Path(os.environ["MLX_PTX_CACHE_DIR"]), Path(args["cache"])
    try:
        os.nice(10)  # the parent's loading threads come first
    except OSError:
        pass
    start = time.perf_counter()
    try:
        mx.eval(tasks(getattr(mx, args["dtype"]))[args["task"]]())
        mx.synchronize()
        print(f"{args['task']}: built in {time.perf_counter() - start:.2f} s", flush=True)
        publish(staging, cache)
        (cache / args["marker"]).write_text(json.dumps({"task": args["task"]}))
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        if (staging / LOG).exists():
            os.replace(staging / LOG, cache / LOG)  # the open output follows the file
        shutil.rmtree(staging, ignore_errors=True)
        return 1
    shutil.rmtree(staging, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
