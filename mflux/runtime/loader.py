"""Read a model folder, Hugging Face diffusers layout (`hf`) or MLX-native (`mlx`), into the runtime's modules.

One path for every format: `mx.load` each shard (lazy: nothing is read yet), the format's `sanitize`
from `mflux.converters` (renaming and fusing, still lazy), a key-set check against an empty module of
the checkpoint's sizes, a lazy cast and, under a QuantSpec, quantization, then
`load_weights(strict=True)` and evaluation a group of parameters at a time, so peak memory stays near
the loaded size. A module is quantized exactly where its weights carry `<path>.scales`. The files'
headers are checked first, since `mx.load` on a damaged file can crash or explain poorly.
"""

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mflux.converters import bfl, diffusers
from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime import device, trace
from mflux.runtime.folder import COMPONENTS, ModelFolder, read_redux_architecture
from mflux.runtime.quantization import (
    QuantSpec,
    quantize_model_from_weights,
    quantize_tensor,
    should_quantize,
)
from mflux.runtime.weights import SafetensorsFile, TensorSource

if TYPE_CHECKING:
    from mflux.runtime.redux import Redux

# Loaded bytes evaluated together. A quantized group's float sources are 4-8 times its size, so groups stay
# small: at 16 MiB, peak RSS under -q matched tensor-by-tensor loading (0.52 vs 0.49 GB for a 0.4 GB
# 4-bit model), where 64 MiB gave 0.67 GB; on this CPU the group size changed no timing measurably.
EVAL_GROUP_BYTES = 16 * 2**20


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
    if component == "image_encoder":
        from mflux.runtime.siglip import SiglipVisionConfig, SiglipVisionModel

        return SiglipVisionModel(SiglipVisionConfig.from_dict(cfg))
    if component == "image_embedder":
        from mflux.runtime.redux import ReduxConfig, ReduxImageEncoder

        return ReduxImageEncoder(ReduxConfig.from_dict(cfg))
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
    trace.mark("first weight read")
    check_quantize(folder, quantize, (component,))
    module, weights = _prepare(folder, component, dtype, quantize)
    cuda = device.cuda()
    if cuda:  # several threads, large components on the CPU stream
        spec = _spec(folder, component, quantize)
        lazy = partial(_lazy_weights, folder, component, dtype, spec)
        weights = cuda.load.read(
            weights, lazy, folder.path / component, component, folder.format, dtype, spec
        )
    else:
        weights = evaluate(weights)
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # check_keys has compared names and shapes; this is a last guard
        raise MfluxError(f"{folder.path}/{component}: weights do not fit the model ({e})") from None
    return module


def load_redux(folder: Path, dtype: mx.Dtype) -> "Redux":
    """A folder laid out as FLUX.1-Redux-dev (diffusers' FluxPriorReduxPipeline): the image encoder
    (SigLIP's vision tower), its preprocessing and the Redux embedder, as one `redux.Redux`."""
    from mflux.runtime.redux import Redux
    from mflux.runtime.siglip import SiglipImageProcessing

    architecture = read_redux_architecture(folder)
    modules = {}
    for component in ("image_encoder", "image_embedder"):
        # about 0.5B parameters in all: read on one thread, and kept unquantized
        module, weights = prepare(Path(folder) / component, component, "hf", architecture, dtype)
        module.load_weights(list(evaluate(weights).items()), strict=True)
        modules[component] = module
    size = modules["image_encoder"].config.image_size
    processing = SiglipImageProcessing.from_dict(architecture["feature_extractor"], size)
    if (processing.height, processing.width) != (size, size):
        raise MfluxError(
            f"{folder}: feature_extractor resizes to {processing.width}x{processing.height}, but the image "
            f"encoder takes {size}x{size} (is the folder complete and from one model?)"
        )
    return Redux(**modules, processing=processing)


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
    weights = read_weights(where, component, fmt)
    module = build_module(component, architecture)
    if stored is not None:
        quantize_model_from_weights(module, weights, stored)
    check_keys(weights, module, str(where))
    weights = cast_and_quantize(component, weights, dtype, spec if stored is None else None)
    if stored is None and spec is not None:
        quantize_model_from_weights(module, weights, lambda path: spec)
    return module, weights


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
    return [f.path for f in folder_source(folder).files]


def folder_source(folder: Path) -> TensorSource:
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


def evaluate(weights: dict) -> dict:
    """Evaluate lazy parameters a group at a time (`groups`); returns name -> evaluated array."""
    out = {}
    for group in groups(weights):
        mx.eval(list(group.values()))
        out.update(group)
    return out


def groups(weights: dict, group_bytes: int = EVAL_GROUP_BYTES):
    """`weights` (name -> lazy array), emptied as it goes, in groups of about `group_bytes`: a group's
    sources are read and released before the next, so peak memory stays near the result plus one
    group."""
    group, size = {}, 0
    while weights:
        name = next(iter(weights))
        group[name] = arr = weights.pop(name)
        size += arr.nbytes
        if size >= group_bytes or not weights:
            yield group
            group, size = {}, 0


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


def _lazy_weights(folder: ModelFolder, component: str, dtype, spec: QuantSpec | None, stream=None) -> dict:
    """`_prepare`'s weights alone, read on `stream`, without the module or the checks (a loading
    thread's own copy); `spec` as `_spec` gives it."""
    weights = read_weights(folder.path / component, component, folder.format, stream)
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
