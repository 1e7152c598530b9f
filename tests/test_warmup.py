"""The warm-up process (mflux.runtime.cuda.warmup) and the kernel cache's place (mflux.backend.kernel_cache_dir).

On CUDA the kernels land in MLX_PTX_CACHE_DIR; this CPU has none to build there. But MLX's CPU backend
builds the same compiled graphs, under the same names, into its temporary folder (TMPDIR/mlx/<version>/
cpu), so the names a process built can be compared here: the warm-up's tiny models must build every
compiled graph that real generations at another size build. The generations take CUDA's paths on this
CPU (the `cuda_paths` fixture; in a child process, `_on_cuda_paths`).
"""

import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from mflux.runtime.cuda import Tuning, warmup


def _on_cuda_paths(tuning: Tuning) -> str:
    """The lines that put a child process on the CUDA tuning's paths, as the `cuda_paths` fixture does
    this one, under `tuning`."""
    return (
        "from mflux.runtime import cuda, device\n"
        "device._cuda = cuda\n"
        f"cuda.TUNING = cuda.Tuning(**{asdict(tuning)!r})\n"
    )


GENERATIONS = """
import sys
from PIL import Image
from mflux import Config, Flux1

config = Config(2, 48, 64)
Flux1.from_path(sys.argv[1], precision="float32", quantize=8).generate_images([1], "a red bicycle", config)
flux = Flux1.from_path(sys.argv[1], precision="float32")
flux.generate_images([1, 2], "a red bicycle", config, batch_size=2)
flux.generate_images([3], "a lighthouse", config, negative_prompt="fog", true_cfg_scale=2.0)
init = Image.new("RGB", (64, 48), (200, 30, 30))
flux.generate_images([4], "a lighthouse", config, image=init, strength=0.6)
mask = Image.new("L", (64, 48), 0)
mask.paste(255, (0, 0, 32, 48))
flux.generate_images([5], "a lighthouse", config, image=init, mask_image=mask)
"""

WARM = """
import mlx.core as mx
from mflux.runtime.cuda import warmup

for task in warmup.tasks(mx.float32).values():
    mx.eval(task())
"""


def _built(tmp: Path, script: str, *args: str) -> set[str]:
    """The compiled graphs a fresh process running `script` builds, by name (on CUDA: the modules)."""
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    subprocess.run([sys.executable, "-c", script, *args], env=env, check=True, timeout=600)
    names = set()
    for p in tmp.glob("mlx/*/cpu/*.cpp"):
        # a graph's file per kernel variant: <graph>_<hash>_contiguous, _strided_<ndim>; names too long
        # for a file are cut and end in a hash of the whole name, variant included
        stem = re.sub(r"_(contiguous|strided_\d+)$", "", p.stem)
        names.add(re.sub(r"_[0-9a-f]{16}$", "", stem) if len(stem) > 200 else stem)
    return names


def test_the_warm_up_tasks_build_every_compiled_graph_that_generations_build(tiny_dev, cuda_paths, tmp_path):
    # CUDA's quantized path: every quantized layer's weight dequantized by qmatmul's compiled graph
    tuning = replace(cuda_paths.TUNING, dequantize_min_rows=1, fused_dequantize=True)
    real = _built(tmp_path / "real", _on_cuda_paths(tuning) + GENERATIONS, str(tiny_dev))
    warm = _built(tmp_path / "warm", WARM)
    assert len(real) >= 5  # silu, rope, the gated residual, the batched modulation, gelu, ...
    assert real <= warm, f"not built by the warm-up: {sorted(real - warm)}"


# What MLX's CUDA backend builds with NVRTC at run time besides compiled graphs (mlx/backend/cuda: the
# users of get_jit_module). None of them may appear where the warm-up can't see them: the children build
# compiled graphs only, and each of these is a module of its own, about 4 s in a fresh process.
# cuda.kernels' glue kernels are CUDA-only precompiled kernels (their code is built by mflux with NVRTC
# in 0.4 s and kept in the kernel cache), so they never appear on this CPU's paths.
BUILT_AT_RUN_TIME = {
    "Gather",
    "GatherAxis",
    "Scatter",
    "ScatterAxis",
    "GatherMM",
    "GatherQMM",
    "QuantizedMatmul",
    "Hadamard",
    "DynamicSlice",
    "DynamicSliceUpdate",
    "CustomKernel",
}


def test_generations_on_cuda_evaluate_nothing_else_that_is_built_at_run_time(
    tiny_dev, cuda_paths, monkeypatch, tmp_path
):
    from mlx.utils import tree_flatten
    from PIL import Image

    from mflux import Config, Flux1

    # this CPU takes CUDA's paths: one-hot lookups in the text encoders, dequantize before a matmul
    # (8-bit weights through the fused graph), the glue kernels asked for (their NVRTC build fails here)
    tuning = dict(avoid_jit=True, dequantize_min_rows=1, fused_dequantize=True, kernels=True)
    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, **tuning))
    monkeypatch.setattr(cuda_paths.kernels, "_why_not", None)  # this test's own try at the build
    seen: dict[str, int] = {}
    real_eval, dot = mx.eval, tmp_path / "graph.dot"

    def eval_(*args):
        arrays = [a for _, a in tree_flatten(list(args)) if isinstance(a, mx.array)]
        if arrays:
            mx.export_to_dot(str(dot), *arrays)  # the graph still to run, one node per primitive
            for name in re.findall(r'label ="?([A-Za-z]+)', dot.read_text()):
                seen[name] = seen.get(name, 0) + 1
        return real_eval(*args)

    monkeypatch.setattr(mx, "eval", eval_)
    init = Image.new("RGB", (64, 48), (200, 30, 30))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    config = Config(2, 48, 64)
    # uncompiled, as a fresh process runs while the warm-up builds: every primitive is seen, also
    # those inside the compiled graphs, so this covers the compiled generations too
    monkeypatch.setattr(
        cuda_paths.warmup, "start", lambda dtype: SimpleNamespace(ready=lambda: False, procs={})
    )
    for quantize in (None, 8):
        flux = Flux1.from_path(tiny_dev, precision="bfloat16", quantize=quantize)
        flux.generate_images([1], "a red bicycle", config)
        flux.generate_images([1, 2], "a red bicycle", config, batch_size=2)
        flux.generate_images([3], "a lighthouse", config, negative_prompt="fog", true_cfg_scale=2.0)
        flux.generate_images([4], "a lighthouse", config, image=init, strength=0.6)
        flux.generate_images([5], "a lighthouse", config, image=init, mask_image=mask)
    assert seen.get("AddMM", 0) + seen.get("Matmul", 0) > 100  # the graphs were seen
    assert not {n: c for n, c in seen.items() if n in BUILT_AT_RUN_TIME}


def test_publish_renames_each_module_into_the_cache_code_last(tmp_path, monkeypatch):
    staging, cache = tmp_path / "staging", tmp_path / "cache"
    (staging / "long" / "name").mkdir(parents=True)  # MLX makes folders of a '/' in a long graph name
    cache.mkdir()
    names = ("a.ptx", "a.txt", "a.cu", "b.ptx", "b.txt", "long/name/c.ptx", "long/name/c.txt", warmup.LOG)
    for name in names:
        (staging / name).write_text(name)
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(
        os,
        "replace",
        lambda src, dst: moved.append(str(src)[len(str(staging)) + 1 :]) or real_replace(src, dst),
    )
    assert warmup.publish(staging, cache) == ["a", "b", "long/name/c"]
    assert {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()} == set(names) - {warmup.LOG}
    assert [p.name for p in staging.rglob("*") if p.is_file()] == [warmup.LOG]
    for module in ("a", "b", "long/name/c"):
        code = moved.index(f"{module}.ptx")
        assert all(
            code > i for i, m in enumerate(moved) if m.startswith(module + ".") and m != f"{module}.ptx"
        )


def test_start_runs_a_child_per_graph_once_per_cache(tmp_path, cuda_paths, monkeypatch):
    cache = tmp_path / "ptx"
    assert warmup.start(mx.float32, cache) is None  # not under this tuning
    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, warm=True))
    job = warmup.start(mx.float32, cache)
    assert job is not None and sorted(job.procs) == sorted(warmup.tasks(mx.float32))
    assert {s.parent for s in job.stagings.values()} == {cache}
    assert job.wait(timeout=300) and job.ready()
    # each child marks its own task and removes its staging folder: nobody has to wait for it
    markers = sorted(p.name for p in cache.glob("mflux-warm-*.done"))
    assert markers == sorted(warmup.MARKER.format(job.key, t) for t in job.names)
    assert not list(cache.glob(warmup.STAGING + "*"))
    assert warmup.start(mx.float32, cache) is None  # marked: nothing to build
    # another dtype is another set of kernels
    other = warmup.start(mx.bfloat16, cache)
    assert other is not None and not other.ready()
    other.stop()
    assert not list(cache.glob(warmup.STAGING + "*"))


def test_a_graph_another_process_is_building_is_waited_for_not_built_again(tmp_path, cuda_paths, monkeypatch):
    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, warm=True))
    k, names = warmup.key(mx.float32), sorted(warmup.tasks(mx.float32))
    for task in names[1:]:
        (tmp_path / warmup.MARKER.format(k, task)).write_text("{}")
    building = tmp_path / f"{warmup.STAGING}{k}-{names[0]}-other"  # another process's child, at work
    building.mkdir()
    job = warmup.start(mx.float32, tmp_path)
    assert job is not None and job.procs == {}  # nothing started twice
    assert not job.ready()
    building.rmdir()  # that child ended without a marker (it failed): the graph builds in-process
    assert job.ready() and not job.done()
    (tmp_path / warmup.MARKER.format(k, names[0])).write_text("{}")
    assert job.done() and warmup.start(mx.float32, tmp_path) is None


def test_a_failed_child_leaves_its_output_and_no_marker(tmp_path, cuda_paths, monkeypatch):
    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, warm=True))
    monkeypatch.setattr(warmup, "tasks", lambda dtype: {"broken": None})  # the child cannot find it
    job = warmup.start(mx.float32, tmp_path)
    assert not job.wait(timeout=120)
    assert job.ready()  # nothing to wait for: the process compiles, and builds the graph itself
    assert not list(tmp_path.glob("mflux-warm-*.done"))
    assert not list(tmp_path.glob(warmup.STAGING + "*"))
    assert "KeyError" in (tmp_path / warmup.LOG).read_text()


UNCOMPILED = """
import sys
import numpy as np
import mlx.core as mx
from mflux import Config, Flux1

class Building:  # the warm-up's children, still at work for the first `n` checks
    procs = {}
    def __init__(self, n):
        self.n = n
    def ready(self):
        self.n -= 1
        return self.n < 0

flux = Flux1.from_path(sys.argv[1], precision="float32")
flux.models._warmup = Building(int(sys.argv[2]))
image = flux.generate_image(7, "a red bicycle", Config(3, 48, 64)).image
np.save(sys.argv[3], np.asarray(image))
"""


def test_a_generation_runs_uncompiled_until_the_warm_up_is_done(tiny_dev, cuda_paths, tmp_path):
    """Flux1 does not wait for the children: while they build, it builds no compiled graph (on CUDA:
    no NVRTC module), and its image is the compiled one's; once they are done it compiles again."""
    images = {}
    script = _on_cuda_paths(cuda_paths.TUNING) + UNCOMPILED
    for label, checks in (("building", 10**6), ("done after two", 2), ("done", 0)):
        out = tmp_path / f"{label}.npy"
        images[label] = (_built(tmp_path / label, script, str(tiny_dev), str(checks), str(out)), out)
    assert images["building"][0] == set()
    assert len(images["done"][0]) >= 3  # compiled from the first event
    assert images["done after two"][0] and images["done after two"][0] <= images["done"][0]
    pixels = {k: np.load(out).astype(int) for k, (_, out) in images.items()}
    for label in ("building", "done after two"):
        assert np.abs(pixels[label] - pixels["done"]).max() <= 1, label


def test_compile_when_ready_leaves_the_users_mlx_disable_compile_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(mx, "disable_compile", lambda: calls.append("off"))
    monkeypatch.setattr(mx, "enable_compile", lambda: calls.append("on"))
    building, done = SimpleNamespace(ready=lambda: False), SimpleNamespace(ready=lambda: True)
    with warmup.compile_when_ready(building) as cold:
        assert cold and calls == ["off"]
    assert calls == ["off", "on"]
    calls.clear()
    monkeypatch.setenv("MLX_DISABLE_COMPILE", "1")
    with warmup.compile_when_ready(building):
        pass
    assert calls == ["off"]  # compilation stays off, as the user asked
    calls.clear()
    for job in (done, None):
        with warmup.compile_when_ready(job) as cold:
            assert not cold
    assert calls == []


def test_the_kernel_cache_persists_outside_the_temporary_folder(tmp_path, monkeypatch):
    from importlib.metadata import version

    from mflux import backend

    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert backend.kernel_cache_dir() == tmp_path / "mflux" / f"mlx-{version('mlx')}" / "ptx"
    backend.import_mlx()
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "mflux" / f"mlx-{version('mlx')}" / "ptx")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mine"))
    backend.import_mlx()
    assert backend.kernel_cache_dir() == tmp_path / "mine"
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "mine")


def test_an_unwritable_cache_starts_nothing(tmp_path, cuda_paths, monkeypatch):
    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, warm=True))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores the mode: make the cache a file's child instead
            (tmp_path / "file").write_text("")
            cache = tmp_path / "file" / "ptx"
        else:
            cache = locked / "ptx"
        assert warmup.start(mx.float32, cache) is None
    finally:
        locked.chmod(0o700)
