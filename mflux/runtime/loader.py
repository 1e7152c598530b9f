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
from mflux.runtime.weights import SafetensorsFile, TensorSource

# Loaded bytes evaluated together. A quantized group's float sources are 4-8 times its size, so groups stay
# small: at 16 MiB, peak RSS under -q matched tensor-by-tensor loading (0.52 vs 0.49 GB for a 0.4 GB
# 4-bit model), where 64 MiB gave 0.67 GB; on this CPU the group size changed no timing measurably.
EVAL_GROUP_BYTES = 16 * 2**20

# Threads that read and evaluate a component's parameters at once, per backend. On the H200 one thread
# moved about 2 GB/s from the page cache onto the device and eight threads 4.4 GB/s
# (bench/probe_load.py, round 3 in docs/PERFORMANCE.md). Metal is unmeasured (no Mac), and this
# 2-core CPU gains nothing, so both keep one.
LOAD_THREADS = {"cuda": 8, "metal": 1, "cpu": 1}

# Whether `mx.load` reads on MLX's CPU stream, per backend (issue 12, target 2), where reading is all a
# component's load does (`_read`). On CUDA, MLX's GPU-stream `Load` reads each tensor into fresh host
# memory and then copies it to the device: 3.9-4.8 GB/s on the H200 however many threads. On the CPU
# stream it reads straight into the array's buffer (CUDA managed memory), 9.3-10.7 GB/s, and leaves it
# in host pages; each group is then handed to the driver to move in bulk (`device.prefetch`; where it
# can't, a GPU pass moves them page fault by page fault, `_move_to_device`). Where the load computes (a
# cast, a quantization, diffusers' q/k/v joined), those GPU ops would read the host pages by faults, so
# such components read on the GPU stream either way. Round 11 on the H200 (docs/PERFORMANCE.md): the
# 33.7 GB bf16 MLX-native model in 6.55 s with 8 threads and 5.30 s with 16 (5.1 and 6.4 GB/s), against
# 8.27 s and 7.96 s on the GPU stream. But in a Hugging Face folder's pipeline, the text encoders read
# this way then encoded 4x slower (the second prompt: 0.61-0.70 s against 0.16 s), which ate the faster
# read (load + first image 8.97 s against 8.48 s), for a reason not yet found. So it is off on every
# backend; `bench_flux.py --load-stream cpu` (and `--load-ways gpu,cpu`) runs it.
LOAD_ON_CPU = {"cuda": False, "metal": False, "cpu": False}
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
    threads = LOAD_THREADS[backend()]
    if threads > 1:
        weights = read_in_threads(lambda: _lazy_weights(folder, component, dtype, quantize), weights, threads)
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # check_keys has compared names and shapes; this is a last guard
        raise MfluxError(f"{folder.path}/{component}: weights do not fit the model ({e})") from None
    del weights  # the module holds the only references now, so evaluated sources are released
    evaluate(module.parameters())
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
    """`read_weights` on MLX's CPU stream where `LOAD_ON_CPU` and the load only reads (MLX-native
    shards or the HF layout's `RENAMED_ONLY` components, not quantized now, no cast: `_reads_only`),
    else on the default stream."""
    if (
        LOAD_ON_CPU[backend()]
        and spec is None
        and (fmt == "mlx" or (fmt == "hf" and component in RENAMED_ONLY))
    ):
        weights = read_weights(where, component, fmt, mx.cpu)
        if _reads_only(weights, dtype):
            return weights
    return read_weights(where, component, fmt)  # mx.load is lazy: only the headers were read


def _reads_only(weights: dict, dtype) -> bool:
    """No cast: every float tensor is stored in `dtype` already (`astype` to its own dtype is no op)."""
    return all(a.dtype == dtype or not mx.issubdtype(a.dtype, mx.floating) for a in weights.values())


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
    if not Path(folder).is_dir():
        raise MfluxError(f"{folder}: no such folder (is the model folder complete?)")
    return [f.path for f in TensorSource.from_folder(folder).files]


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


def read_in_threads(lazy_weights, weights: dict, threads: int) -> dict:
    """`weights` (name -> lazy array) evaluated by `threads` threads, each over a contiguous run of
    the layers. MLX evaluates an array only on the thread that built its graph, so each thread calls
    `lazy_weights()` for its own lazy copy (reading the headers and renaming again, no module built:
    milliseconds) and evaluates its run of it; a layer's weight, scales and biases stay in one run."""
    layers: dict[str, list[str]] = {}
    for name in weights:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    sizes = [sum(weights[n].nbytes for n in names) for names in layers.values()]
    runs = _split(list(layers.values()), sizes, threads)

    def read(run: list[list[str]]) -> dict:
        mine = lazy_weights()
        out = {n: mine[n] for names in run for n in names}
        evaluate(out)
        return out

    result = {}
    with ThreadPoolExecutor(len(runs), thread_name_prefix="mflux-load") as pool:
        for part in pool.map(read, runs):  # re-raises a thread's error here
            result.update(part)
    return {n: result[n] for n in weights}  # the order the module's loading expects


def evaluate(params, group_bytes: int = EVAL_GROUP_BYTES) -> None:
    """Evaluate lazy parameters a group at a time: a group's sources are read and released before the
    next, so peak memory stays near the result plus one group. Where `LOAD_ON_CPU`, each group is then
    moved onto the device, and this returns once all of them are there."""
    group, size = [], 0
    for _, arr in tree_flatten(params):
        group.append(arr)
        size += arr.nbytes
        if size >= group_bytes:
            _evaluate_group(group)
            group, size = [], 0
    _evaluate_group(group)
    if LOAD_ON_CPU[backend()]:
        device.prefetch_wait()


def _evaluate_group(group: list) -> None:
    mx.eval(group)
    # arrays the GPU computed are on the device already: prefetching them moves nothing
    if LOAD_ON_CPU[backend()] and not device.prefetch(group):
        _move_to_device(group)


def _move_to_device(arrays: list) -> None:
    """Read every array once on the GPU, so that what `mx.load` read on the CPU stream (`LOAD_ON_CPU`)
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
    spec = spec if _stored(folder, component) is None else None
    weights = _read(folder.path / component, component, folder.format, dtype, spec)
    return cast_and_quantize(component, weights, dtype, spec)


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
