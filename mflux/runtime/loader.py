"""Read a model folder, Hugging Face diffusers layout (`hf`) or MLX-native (`mlx`), into the runtime's modules.

One path for every format: `mx.load` each shard (lazy: nothing is read yet), the format's `sanitize`
from `mflux.converters` (renaming and fusing, still lazy), a key-set check against an empty module of
the checkpoint's sizes, a lazy cast and, under a QuantSpec, quantization, then
`load_weights(strict=True)` and evaluation a group of parameters at a time, so peak memory stays near
the loaded size. A module is quantized exactly where its weights carry `<path>.scales`. The files'
headers are checked first, since `mx.load` on a damaged file can crash or explain poorly.
"""

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mflux.converters import bfl, diffusers
from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime import device
from mflux.runtime.device import backend
from mflux.runtime.folder import COMPONENTS, ModelFolder
from mflux.runtime.quantization import (
    QuantSpec,
    quantize_model_from_weights,
    quantize_tensor,
    should_quantize,
)
from mflux.runtime.weights import DTYPE_NAMES, SafetensorsFile, TensorSource

# Loaded bytes evaluated together. A quantized group's float sources are 4-8 times its size, so groups stay
# small: at 16 MiB, peak RSS under -q matched tensor-by-tensor loading (0.52 vs 0.49 GB for a 0.4 GB
# 4-bit model), where 64 MiB gave 0.67 GB; on this CPU the group size changed no timing measurably.
EVAL_GROUP_BYTES = 16 * 2**20

# Threads that read and evaluate a component's parameters at once, per backend. On the H200 one thread
# moved about 2 GB/s from the page cache onto the device and eight threads 4.4 GB/s
# (bench/probe_load.py, round 3 in docs/PERFORMANCE.md). Metal is unmeasured (no Mac), and this
# 2-core CPU gains nothing, so both keep one.
LOAD_THREADS = {"cuda": 8, "metal": 1, "cpu": 1}

# Where `mx.load` reads, per backend (issue 12, target 2), when reading is all a component's load does
# (`reads_on_cpu`): "default" (the default stream), "cpu" or "cpu-copy". On CUDA, MLX's GPU-stream `Load`
# reads each tensor into fresh host memory and then copies it to the device: 3.8-4.8 GB/s on the H200
# however many threads. On the CPU stream it reads straight into the array's buffer, 9.8 GB/s, but that
# buffer is CUDA managed memory left in host pages (MLX gives arrays the GPU stream makes the device's own
# memory, and those the CPU stream makes managed memory). Each group is then handed to the driver to
# move in bulk (`device.prefetch`; where it can't, a GPU pass moves it page fault by page fault,
# `_move_to_device`), and "cpu-copy" copies it into the device's own memory on the default stream and
# drops the managed buffers (`_device_copy`). Where the load computes (a cast, a quantization,
# diffusers' q/k/v joined), those GPU ops would read the host pages by faults, so such components read
# on the default stream either way. Round 12 on the H200 (docs/PERFORMANCE.md), the 33.7 GB bf16
# MLX-native model with 8 threads: 7.8 s on the default stream, 7.5 s "cpu" (4.5 s with 16), 3.8 s
# "cpu-copy" (8.8 GB/s); a Hugging Face folder's load + first image 8.25-9.37 s against 6.68-7.70 s
# (diffusers 6.86-7.46 s in the same lease). The GPU's passes over weights read either way took the
# same time.
LOAD_STREAM = {"cuda": "cpu-copy", "metal": "default", "cpu": "default"}
# Components of fewer bytes read on the default stream even so, per backend: there the CPU stream's
# costs per array (a driver call, a copy kernel) outweighed its faster read. H200, round 12: CLIP
# (0.25 GB) 0.09 -> 0.16 s, the 4-bit transformer (6.7 GB) 1.35-1.41 -> 1.48-1.61 s, the 8-bit T5 (5.1 GB)
# 1.01 -> 1.15 s; against the 8-bit transformer (12.6 GB) 2.91 -> 2.29 s and the bf16 T5 (9.5 GB)
# 2.7 -> 1.3 s.
CPU_READ_MIN_BYTES = {"cuda": 8 * 10**9, "metal": 0, "cpu": 0}
# The Hugging Face layout's components whose weights are the files' tensors renamed (`converters.diffusers`)
RENAMED_ONLY = {"text_encoder", "text_encoder_2"}

# Whether a caller reads the transformer while the prompts encode (`Flux1.generate`, bench_flux's
# pipeline), per backend. T5, CLIP and the transformer are then held at once (33.6 GB at bf16, where
# freeing T5 and CLIP first holds 26 GB), so it is done only where the device's memory is at least twice
# their files (`may_overlap`): an H200 or an H100, not a 24 GB card. Metal keeps one phase at a time:
# the Mac shares its memory with everything else, and no Mac was here to measure it.
OVERLAP_LOAD = {"cuda": True, "metal": False, "cpu": False}
OVERLAPPED = ("text_encoder", "text_encoder_2", "transformer")


def may_overlap(folder: ModelFolder, quantize: QuantSpec | None = None) -> bool:
    """True where the backend overlaps the transformer's read with the prompt encoding (OVERLAP_LOAD),
    the weights are not quantized (stored or under `quantize`: who quantizes asks for memory, and the
    overlap would hold T5 and the transformer at once) and the device's memory is at least twice the
    files of T5, CLIP and the transformer."""
    if not OVERLAP_LOAD[backend()] or quantize is not None or folder.quantization:
        return False
    info = mx.device_info()
    total = info.get("total_memory") or info.get("memory_size") or 0
    files = sum(f.stat().st_size for c in OVERLAPPED for f in (folder.path / c).glob("*.safetensors"))
    return 0 < 2 * files <= total


def build_module(component: str, architecture: dict) -> nn.Module:
    """An empty module of the checkpoint's sizes."""
    cfg = architecture[component]
    if component == "transformer":
        from mflux.runtime.model import Flux, FluxParams

        return Flux(FluxParams.from_diffusers_config(cfg))
    if component == "text_encoder":
        from mflux.runtime.clip import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_dict(cfg))
    if component == "text_encoder_2":
        from mflux.runtime.t5 import T5Config, T5Encoder

        return T5Encoder(T5Config.from_dict(cfg))
    if component == "vae":
        from mflux.runtime.autoencoder import Autoencoder, AutoencoderConfig

        return Autoencoder(AutoencoderConfig.from_dict(cfg))
    raise ValueError(f"unknown component {component!r}")


def check_quantize(folder: ModelFolder, quantize: QuantSpec | None, components=COMPONENTS) -> None:
    """Refuse runtime quantization that conflicts with what a stored model already is."""
    for component in components:
        stored = (folder.quantization or {}).get(component)
        if stored and quantize is not None and QuantSpec.from_dict(stored) != quantize:
            raise InvalidArgument(
                f"{folder.name} is already quantized ({_describe(stored)}); drop -q/--quantize, "
                f"or quantize the unquantized model instead"
            )


def load_component(
    folder: ModelFolder, component: str, dtype: mx.Dtype, quantize: QuantSpec | None = None
) -> nn.Module:
    """Build one component and load its weights, quantizing them under `quantize`."""
    check_quantize(folder, quantize, (component,))
    module, weights = _prepare(folder, component, dtype, quantize)
    on_cpu = reads_on_cpu(
        folder.path / component, component, folder.format, dtype, _spec(folder, component, quantize)
    )
    threads = LOAD_THREADS[backend()]
    copy = on_cpu and LOAD_STREAM[backend()] == "cpu-copy"
    if threads > 1 or copy:  # the copies replace the evaluated arrays, so they are made before loading
        lazy = partial(_lazy_weights, folder, component, dtype, quantize)
        weights = read_in_threads(lazy, weights, threads, on_cpu)
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # check_keys has compared names and shapes; this is a last guard
        raise MfluxError(f"{folder.path}/{component}: weights do not fit the model ({e})") from None
    del weights  # the module holds the only references now, so evaluated sources are released
    if threads == 1 and not copy:
        evaluate(dict(tree_flatten(module.parameters())), on_cpu=on_cpu)
    return module


def iter_weights(folder: ModelFolder, component: str, dtype, spec: QuantSpec | None):
    """(runtime name, mx.array) for each tensor of a component: renamed, checked, cast to `dtype`
    (floats) and quantized under `spec`, exactly as `load_component` loads them, evaluated one at a
    time (see `stream`). `mflux convert`/`quantize` write them one shard at a time."""
    _, weights = _prepare(folder, component, dtype, spec)
    yield from stream(weights)


def prepare(
    where: Path,
    component: str,
    fmt: str,
    architecture: dict,
    dtype,
    spec: QuantSpec | None = None,
    stored=None,
) -> tuple[nn.Module, dict]:
    """An empty module of the checkpoint's sizes, and its weights from `where` (a component folder, or
    one file), lazily: read, renamed from format `fmt` ("hf", "bfl" or "mlx"), checked against the
    module, cast and quantized under `spec`. `stored(path)` gives the QuantSpec of each layer of a
    component stored quantized; the module is quantized to match either way."""
    weights = _read(where, component, fmt, dtype, spec if stored is None else None)
    module = build_module(component, architecture)
    if stored is not None:
        quantize_model_from_weights(module, weights, stored)
    check_keys(weights, module, str(where))
    weights = cast_and_quantize(component, weights, dtype, spec if stored is None else None)
    if stored is None and spec is not None:
        quantize_model_from_weights(module, weights, lambda path: spec)
    return module, weights


def _read(where: Path, component: str, fmt: str, dtype, spec: QuantSpec | None) -> dict:
    """`read_weights`, on MLX's CPU stream where `reads_on_cpu`, else on the default stream (lazily:
    only the headers are read)."""
    on_cpu = reads_on_cpu(where, component, fmt, dtype, spec)
    return read_weights(where, component, fmt, mx.cpu if on_cpu else None)


def reads_on_cpu(where: Path, component: str, fmt: str, dtype, spec: QuantSpec | None) -> bool:
    """Whether `LOAD_STREAM` reads this component on MLX's CPU stream: only where the load only reads,
    MLX-native shards or the HF layout's `RENAMED_ONLY` components, not quantized now (`spec`), with
    every float tensor stored in `dtype` already (no cast), from the files' headers, and files of at
    least `CPU_READ_MIN_BYTES`."""
    if LOAD_STREAM[backend()] == "default" or spec is not None:
        return False
    if not (fmt == "mlx" or (fmt == "hf" and component in RENAMED_ONLY)):
        return False
    source = TensorSource([where]) if Path(where).is_file() else _folder_source(where)
    if sum(f.path.stat().st_size for f in source.files) < CPU_READ_MIN_BYTES[backend()]:
        return False
    stored = {getattr(mx, DTYPE_NAMES[source.dtype(name)]) for name in source.keys()}
    return all(d == dtype or not mx.issubdtype(d, mx.floating) for d in stored)


def read_weights(where: Path, component: str, fmt: str, stream=None) -> dict:
    """Lazily loaded weights of a component folder (every shard) or one file, under the runtime's names,
    read on `stream` (None: the default). Each file's header is checked before `mx.load` sees it."""
    files = [SafetensorsFile(where).path] if Path(where).is_file() else weight_files(where)
    weights = {}
    for f in files:
        weights.update(mx.load(str(f), stream=stream))
    if fmt == "hf":
        return diffusers.sanitize(component, weights)
    if fmt == "bfl":
        return bfl.sanitize(weights)
    if fmt == "mlx":
        return weights  # MLX-native shards already hold the runtime's names
    raise ValueError(f"unknown weight format {fmt!r} (hf, bfl, mlx)")


def weight_files(folder: Path) -> list[Path]:
    """A component folder's .safetensors files, each header checked (pickles refused by name)."""
    return [f.path for f in _folder_source(folder).files]


def _folder_source(folder: Path) -> TensorSource:
    """A component folder's tensors, each file's header checked."""
    if not Path(folder).is_dir():
        raise MfluxError(f"{folder}: no such folder (is the model folder complete?)")
    return TensorSource.from_folder(folder)


def check_keys(weights: dict, module: nn.Module, what: str) -> None:
    """Refuse weights that do not fit the module: the missing, unexpected and misshapen names in one
    line. `weights` maps names to arrays or to shapes."""
    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshapen = [
        f"{k} {_shape(weights[k])} for {tuple(expected[k].shape)}"
        for k in sorted(set(weights) & set(expected))
        if _shape(weights[k]) != tuple(expected[k].shape)
    ]
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} tensors match nothing in FLUX.1 ({_shown(unexpected)})")
    if missing:
        parts.append(f"{len(missing)} missing ({_shown(missing)})")
    if misshapen:
        parts.append(f"{len(misshapen)} of the wrong shape ({_shown(misshapen)})")
    if parts:
        raise MfluxError(
            f"{what}: {'; '.join(parts)} (is this a complete FLUX.1 checkpoint of this component?)"
        )


def cast_and_quantize(component: str, weights: dict, dtype, spec: QuantSpec | None) -> dict:
    """Cast floats to `dtype` and quantize under `spec`, lazily."""
    out = {}
    for name, arr in weights.items():
        if mx.issubdtype(arr.dtype, mx.floating):  # stored scales and biases follow the precision too
            arr = arr.astype(dtype)
        if should_quantize(component, name, arr.shape, spec):
            out.update(quantize_tensor(name, arr, spec))
        else:
            out[name] = arr
    return out


def read_in_threads(lazy_weights, weights: dict, threads: int, on_cpu: bool = False) -> dict:
    """`weights` (name -> lazy array) evaluated by `threads` threads, each over a contiguous run of
    the layers. MLX evaluates an array only on the thread that built its graph, so each thread calls
    `lazy_weights()` for its own lazy copy (reading the headers and renaming again, no module built:
    milliseconds) and evaluates its run of it; a layer's weight, scales and biases stay in one run.
    `on_cpu`: the weights are read on MLX's CPU stream (`reads_on_cpu`), and `evaluate` moves them."""
    layers: dict[str, list[str]] = {}
    for name in weights:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    sizes = [sum(weights[n].nbytes for n in names) for names in layers.values()]
    runs = _split(list(layers.values()), sizes, threads)

    def read(run: list[list[str]]) -> dict:
        mine = lazy_weights()
        out = {n: mine.pop(n) for names in run for n in names}
        del mine  # `out` holds its run's only references, so evaluate may replace them (cpu-copy)
        return evaluate(out, on_cpu=on_cpu)

    result = {}
    with ThreadPoolExecutor(len(runs), thread_name_prefix="mflux-load") as pool:
        for part in pool.map(read, runs):  # re-raises a thread's error here
            result.update(part)
    return {n: result[n] for n in weights}  # the order the module's loading expects


def evaluate(weights: dict, group_bytes: int | None = None, on_cpu: bool = False) -> dict:
    """Evaluate lazy parameters a group at a time: a group's sources are read and released before the
    next, so peak memory stays near the result plus one group. Returns name -> evaluated array.
    `on_cpu` (they are read on MLX's CPU stream, `reads_on_cpu`): each group is then moved onto the
    device, and this returns once all of them are there; under "cpu-copy" the arrays returned are copies
    in the device's own memory. `weights` (name -> array) is emptied as it goes, so that under
    "cpu-copy" each original is released once copied."""
    group_bytes = group_bytes or EVAL_GROUP_BYTES
    out, group, size = {}, {}, 0
    while weights:
        name = next(iter(weights))
        group[name] = arr = weights.pop(name)
        size += arr.nbytes
        if size >= group_bytes or not weights:
            out.update(_evaluate_group(group, on_cpu))
            group, size = {}, 0
    if on_cpu:
        device.prefetch_wait()
    return out


def _evaluate_group(group: dict, on_cpu: bool) -> dict:
    arrays = list(group.values())
    mx.eval(arrays)
    if not on_cpu:
        return group
    if not device.prefetch(arrays):
        _move_to_device(arrays)
    if LOAD_STREAM[backend()] != "cpu-copy":
        return group
    device.prefetch_wait()  # the copies read device pages, not host pages by faults
    copies = {n: _device_copy(a) for n, a in group.items()}
    mx.eval(list(copies.values()))
    return copies


def _device_copy(a: mx.array) -> mx.array:
    """A bit-exact copy of `a` made on the default stream (on CUDA, in the device's own memory): an
    integer view OR 0, which no backend rewrites or gives the source's buffer (the source is alive)."""
    if not a.size:
        return a
    raw = a.view({1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.itemsize])
    return mx.bitwise_or(raw, mx.array(0, raw.dtype)).view(a.dtype)


def _move_to_device(arrays: list) -> None:
    """Read every array once on the GPU, so that what `mx.load` read on the CPU stream (`LOAD_STREAM`)
    is on the device before the first step needs it: a reduction per array, a few bytes of output
    (where `device.prefetch` can't move them in bulk)."""
    mx.eval([mx.max(a) for a in arrays if a.size])


def _split(items: list, sizes: list[int], n: int) -> list[list]:
    """`items` cut into at most n contiguous runs of about equal total size."""
    total = sum(sizes)
    runs, run, done = [], [], 0
    for item, size in zip(items, sizes):
        run.append(item)
        done += size
        if done >= total * (len(runs) + 1) / n and len(runs) < n - 1:
            runs.append(run)
            run = []
    return [r for r in [*runs, run] if r]


def stream(weights: dict):
    """Evaluate, yield and forget each (name, lazy array) of `weights`: memory stays near what the
    caller keeps plus one tensor's sources. A shard of quantized tensors evaluated at once would hold
    all their float sources and temporaries too (4-8 times the shard)."""
    while weights:
        name = next(iter(weights))
        arr = weights.pop(name)
        mx.eval(arr)  # a quantized weight's scales and biases come out of the same evaluation
        yield name, arr


def _prepare(folder: ModelFolder, component: str, dtype, spec: QuantSpec | None):
    return prepare(
        folder.path / component,
        component,
        folder.format,
        folder.architecture,
        dtype,
        spec,
        _stored(folder, component),
    )


def _lazy_weights(folder: ModelFolder, component: str, dtype, spec: QuantSpec | None) -> dict:
    """`_prepare`'s weights alone, without the module or the checks (read_in_threads' copies)."""
    spec = _spec(folder, component, spec)
    weights = _read(folder.path / component, component, folder.format, dtype, spec)
    return cast_and_quantize(component, weights, dtype, spec)


def _spec(folder: ModelFolder, component: str, spec: QuantSpec | None) -> QuantSpec | None:
    """The QuantSpec a load quantizes under now: none where the component is stored quantized."""
    return spec if _stored(folder, component) is None else None


def _stored(folder: ModelFolder, component: str):
    """The component's stored QuantSpec per layer path, or None when it is stored unquantized."""
    return partial(folder.quant_spec, component) if (folder.quantization or {}).get(component) else None


def _shape(value) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else tuple(value.shape)


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _describe(q: dict) -> str:
    return f"{q['bits']}-bit {q.get('mode', 'affine')}, group size {q.get('group_size', 64)}"


def load_tokenizers(folder: ModelFolder):
    from mflux.runtime.tokenizers import load_tokenizers as _load

    return _load(folder.path)
