"""`mflux convert` and `mflux quantize`: make an MLX-native store model, streaming tensor by tensor.

The MLX-native format (manifest `format = "mlx"`), one folder in the store:

    manifest.toml        format_version, name, variant, format "mlx", dtype, source, quantization,
                         defaults, architecture, files (path, size, sha256 of every other file)
    transformer/         model-00001-of-0000N.safetensors ... + model.safetensors.index.json
    text_encoder/        (CLIP)   the same
    text_encoder_2/      (T5)     the same
    vae/                          the same
    tokenizer/ tokenizer_2/       copied from the source as they are
    scheduler/ model_index.json   copied for reference (the manifest's architecture is what is read)

- Tensor names and layouts are the runtime's own, exactly what `loader.iter_weights` yields (BFL names
  and fused qkv for the transformer, Hugging Face names for T5 and CLIP, diffusers names with OHWI
  convolutions for the VAE), so loading renames nothing.
- A quantized layer is stored as MLX keeps it: `<path>.weight` (uint32, packed), `<path>.scales` and,
  in affine mode, `<path>.biases`. The loader quantizes exactly the layers that have `.scales`.
- `quantization` holds {bits, group_size, mode} per quantized component (with `layers` overrides where
  a layer differs). Layers stay in float where `mflux.runtime.quantization.should_quantize` says so: the VAE
  (small and convolutional), norms, biases, T5's relative attention bias, CLIP's position embedding,
  and any layer whose input width is not a multiple of the group size (MLX's quantized matmul needs it).
- `dtype` is the dtype of every float tensor (weights, scales, biases). T5 is never stored in float16,
  which overflows in it: it keeps the source's bfloat16 (or float32), written as the `dtype` key of
  `architecture.text_encoder_2`, as transformers writes it.
- `architecture` holds each component's config.json values under Hugging Face's key names (a BFL single
  file gets the diffusers config derived from its shapes), so there is one form for both formats.
- `format_version` is checked by mflux.manifest when a model is read: a newer one is refused with a
  message to upgrade.
"""

import copy
import dataclasses
import errno
import math
import shlex
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mflux import convert_gguf
from mflux.converters import bfl, formats, gguf
from mflux.errors import InvalidArgument, MfluxError
from mflux.folders import open_folder
from mflux.manifest import (
    COMPONENTS,
    DTYPES,
    new_manifest,
    quantization_label,
    read_manifest,
    write_manifest,
)
from mflux.runtime.folder import VARIANTS, ModelFolder, config_values, detect_variant
from mflux.runtime.loader import build_module, cast_and_quantize, check_keys, iter_weights, stream
from mflux.runtime.quantization import AFFINE_BITS, QUANTIZABLE_COMPONENTS, QuantSpec
from mflux.runtime.weights import PICKLE_SUFFIXES, SafetensorsFile, refuse_pickle, save_shards
from mflux.store import Store, StoredModel, format_size, validate_name

# Peak memory while writing is about one shard plus a few tensors: 1 GiB keeps converting the
# 34 GB pipeline within a 16 GB machine.
MAX_SHARD_BYTES = 2**30
COPIED = ("tokenizer", "tokenizer_2", "scheduler", "model_index.json")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class _SingleFile:
    """A single-file checkpoint: its Format, its tensor table {key: (dtype, shape)} and, per component
    it holds, {name without the prefix: (file key, scale key or None)}. A GGUF's table is already in
    runtime names (mflux.converters.gguf renames as it reads), with its GGUF types."""

    path: Path
    fmt: formats.Format
    tensors: dict
    keys: dict

    def layout(self, component: str) -> dict:
        """{runtime name: (shape, source type)} of a component, renamed group by group over lazy zeros
        (nothing is read): what the key checks and the manifest's tensor types need."""
        if self.fmt.container == "gguf":
            return {k: (shape, t) for k, (t, shape) in self.tensors.items()}
        keys, out = self.keys[component], {}
        for group in formats.groups(self.fmt, component, keys):
            zeros = {n: mx.zeros(self.tensors[keys[n][0]][1]) for n in group}
            types = "+".join(dict.fromkeys(self._type(*keys[n]) for n in group))
            for name, arr in formats.sanitize(self.fmt, component, zeros, keys).items():
                out[name] = (tuple(arr.shape), types)
        return out

    def shapes(self, component: str) -> dict:
        return {k: shape for k, (shape, _) in self.layout(component).items()}

    def types(self, component: str) -> dict:
        return {k: t for k, (_, t) in self.layout(component).items()}

    def _type(self, key: str, scale: str | None) -> str:
        return self.tensors[key][0] + (" scaled" if scale else "")


@dataclass
class _Source:
    folder: ModelFolder  # tokenizers, architecture, stored quantization, and the variant to record
    record: dict  # the manifest's `source` table
    name: str  # default names derive from it
    path: Path  # what must never be written into
    single: _SingleFile | None = None  # a single file, replacing the folder's components it holds
    keep_gguf: bool = False  # a GGUF file's legacy blocks are stored as they are (MLX's affine layout)


def convert(
    source: str,
    *,
    name: str | None = None,
    dtype: str = "bfloat16",
    base: str | None = None,
    variant: str | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    force: bool = False,
    keep_gguf_quantization: bool = False,
    store: Store | None = None,
    progress: bool = True,
) -> StoredModel:
    """Convert a store model (format hf or mlx), a diffusers-layout folder, or a single-file checkpoint
    (see mflux.converters.formats: bf16, fp16, fp32 or float8, scaled or not, BFL, ComfyUI or diffusers
    names, transformer only or all-in-one; or a FLUX.1 GGUF transformer; `base` gives what the file
    lacks, tokenizers and configs always) into an MLX-native store model `name` (default
    `<source name>-mlx`). Every tensor is rounded once to `dtype` from its exact float32 value. `bits`
    quantizes to affine q<bits> (`group_size`, default 64) as `mflux quantize` does, every quantizable
    component the source does not store quantized already; `keep_gguf_quantization` stores a GGUF's
    legacy blocks as they are. `variant` names what the files can't tell: a Kontext or Krea single file
    has dev's exact tensors, a Krea folder dev's exact files. Returns the StoredModel."""
    _check_dtype(dtype)
    spec = _convert_spec(bits, group_size, keep_gguf_quantization)
    store = store or Store()
    store.check_root()
    src = _open(source, store, base, variant)
    if keep_gguf_quantization:
        src = _keeping_gguf(src)
    _refuse_quantized(src)
    name = name or (f"{src.name}-mlx" if spec is None else default_name(src.name, spec))
    _refuse_self(store, name, src)
    dtypes = {c: _component_dtype(c, dtype, _source_dtype(src, c)) for c in COMPONENTS}
    carried = _stored_quantization(src)  # kept as stored, never quantized again
    specs = {c: spec if c in QUANTIZABLE_COMPONENTS and c not in carried else None for c in COMPONENTS}
    return _write(store, name, force, src, dtype, dtypes, specs, progress)


def _convert_spec(bits: int | None, group_size: int | None, keep_gguf_quantization: bool) -> QuantSpec | None:
    if bits is None and group_size is None:
        return None
    if keep_gguf_quantization:
        raise InvalidArgument(
            "--bits re-quantizes while --keep-gguf-quantization keeps the GGUF's blocks: choose one"
        )
    spec = QuantSpec.for_mode("affine", bits, group_size)
    if spec.bits not in AFFINE_BITS:
        raise InvalidArgument(f"--bits must be one of {', '.join(map(str, AFFINE_BITS))}, got {bits}")
    return spec


def _keeping_gguf(src: _Source) -> _Source:
    if not _is_gguf(src):
        raise InvalidArgument("--keep-gguf-quantization applies to a GGUF file only; drop it")
    record = {**src.record, "keep_gguf_quantization": True}
    return dataclasses.replace(src, keep_gguf=True, record=record)


def quantize(
    model: str | None = None,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    mode: str = "affine",
    name: str | None = None,
    dtype: str | None = None,
    components: list[str] | None = None,
    force: bool = False,
    store: Store | None = None,
    progress: bool = True,
) -> StoredModel:
    """Quantize a store model or folder (hf or unquantized mlx) into a new MLX-native store model `name`
    (default `<model>-<label>`: `-q4`, `-q4-g32` for a group size other than 64, `-mxfp4` for an fp
    mode), in one pass. `model` defaults to the unquantized model most recently pulled or converted
    (or the source of the quantized one used last). Returns the StoredModel."""
    spec = QuantSpec.for_mode(mode, bits, group_size)
    if dtype is not None:
        _check_dtype(dtype)
    chosen = _components(components)
    store = store or Store()
    store.check_root()
    if model is None:
        model = _default_source(store)
    src = _open(model, store, None)
    if src.folder.quantization:
        raise MfluxError(
            f"{src.name} is already quantized ({quantization_label(src.folder.quantization)}); quantize "
            f"its unquantized source instead ({_recorded_source(src.path)})"
        )
    name = name or default_name(src.name, spec)
    _refuse_self(store, name, src)
    dtypes = {c: _source_dtype(src, c) for c in COMPONENTS}
    if dtype is not None:
        dtypes = {c: _component_dtype(c, dtype, d) for c, d in dtypes.items()}
    specs = {c: spec if c in chosen else None for c in COMPONENTS}
    return _write(store, name, force, src, dtype or dtypes["transformer"], dtypes, specs, progress)


def _refuse_quantized(src: _Source) -> None:
    # A quantized model is already MLX-native; converting it would only re-cast its scales under a
    # name ("-q4-mlx") that hides what it is. A single file's quantized base is fine: that is carried.
    if src.single is None and src.folder.quantization:
        label = quantization_label(src.folder.quantization)
        raise MfluxError(
            f"{src.name} is already quantized ({label}) and MLX-native: run it as it is (mflux run -m "
            f"{src.name}), or quantize its unquantized source another way (mflux quantize "
            f"{_unquantized_source(src.path)} --bits N; --dtype sets the scales' dtype)"
        )


def _unquantized_source(folder: Path) -> str:
    """What a quantized model was made from, as `mflux quantize` takes it: a store name or a path."""
    try:
        source = read_manifest(folder).source
    except MfluxError:
        return "SOURCE"
    return shlex.quote(source.get("name") or source.get("path") or "SOURCE")


def default_name(source_name: str, spec: QuantSpec) -> str:
    """`<source>-<label>`, the label as `mflux list` shows it: q8, q4-g32, mxfp4. Each setting gets its
    own name, so a group-32 copy never collides with the group-64 one."""
    return f"{source_name}-{quantization_label({'transformer': spec.to_dict()})}"


def _default_source(store: Store) -> str:
    """The model used last when it is unquantized, else the store model it was quantized from."""
    last = store.last_used()
    if last is None:
        raise MfluxError("no model given and none used yet (name one: mflux quantize MODEL --bits 4)")
    manifest = store.get(last).manifest
    if not manifest.quantization:
        print(f"quantizing {last} (the model used last)")
        return last
    source = manifest.source
    if source.get("kind") == "model" and store.exists(source["name"]):
        if not store.get(source["name"]).manifest.quantization:
            print(f"quantizing {source['name']} (the source of {last}, the model used last)")
            return source["name"]
    raise MfluxError(
        f"no model given, and the model used last, {last}, is already quantized "
        f"({quantization_label(manifest.quantization)}; {_source_text(source)}) (name an unquantized "
        "one: mflux quantize MODEL --bits 4; see: mflux list)"
    )


def _recorded_source(folder: Path) -> str:
    try:
        return _source_text(read_manifest(folder).source)
    except MfluxError:
        return "its manifest records no source"


def _source_text(source: dict) -> str:
    kind = source.get("kind")
    if kind == "model":
        return f"its manifest records the source model {source.get('name')!r}"
    if kind == "hub":
        return f"its manifest records the source {source.get('repo')}@{str(source.get('commit'))[:12]}"
    return f"its manifest records the source {source.get('path')}"


def _write(
    store: Store,
    name: str,
    force: bool,
    src: _Source,
    dtype: str,
    dtypes: dict,
    specs: dict,
    progress: bool,
):
    """Write every component, quantizing it under specs[c]; a component the source stores quantized
    stays as it is, and its quantization is carried into the new manifest."""
    carried = _stored_quantization(src)
    quantization = {**carried, **{c: s.to_dict() for c, s in specs.items() if s is not None}}
    estimates = {c: _estimate(src, c, dtypes[c], specs[c]) for c in COMPONENTS}
    _check_space(store, name, sum(estimates.values()))
    reports = []
    with store.build(name, force=force, size_hint=sum(estimates.values())) as tmp, _write_errors(store):
        for c in COMPONENTS:
            with _progress_bar(c, estimates[c], progress) as bar:
                if c == "transformer" and _is_gguf(src):  # streamed a block of rows at a time
                    args = src.single.path, tmp / c, dtypes[c], specs[c], src.keep_gguf
                    counted = convert_gguf.save(*args, bar, max_shard_bytes=MAX_SHARD_BYTES)
                else:
                    counted = _Counter(_weights(src, c, dtypes[c], specs[c]), _spec(quantization.get(c)))
                    save_shards(counted.reporting(bar), tmp / c, max_shard_bytes=MAX_SHARD_BYTES)
                bar.total = bar.n  # the estimate gives way to the exact count
                bar.refresh()
            if counted.quantized:
                reports.append(f"{c}: {counted.bits_per_weight:.2f} bits/weight")
        for rel in COPIED:
            _copy(src.folder.path / rel, tmp / rel)
        arch = _architecture(src, dtypes)
        manifest = new_manifest(
            tmp,
            name=name,
            format="mlx",
            dtype=dtype,
            source=src.record,
            quantization=quantization,
            architecture=arch,
            variant=src.folder.variant,  # the source's: krea stays krea, though its files are dev's
        )
        write_manifest(tmp, manifest)
    stored = store.get(name)
    for line in reports:
        print(line)
    print(f"stored {name} ({format_size(stored.size_bytes)}) in {stored.path}")
    return stored


def _open(source: str, store, base: str | None, variant: str | None = None) -> _Source:
    """A store model or folder; or a BFL single file, with `base` giving the other components.
    `variant` is checked against the transformer (and a store model's manifest)."""
    path = _path(source)
    if path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        refuse_pickle(path)
        if not path.is_file():
            raise MfluxError(f"{path}: no such file")
        return _open_single_file(path, store, base, variant)
    if base is not None:
        raise InvalidArgument("--base applies to a single-file transformer checkpoint only; drop it")
    if _is_name(source) and store.exists(source):
        stored = store.get(source)
        if stored.damaged:  # before any compute: a missing or cut file would fail halfway
            raise MfluxError(stored.damage_hint())
        folder = open_folder(stored.path, name=stored.name, variant=variant)
        return _Source(folder, {"kind": "model", "name": stored.name}, stored.name, stored.path.resolve())
    if path.is_dir():
        folder = open_folder(path, variant=variant)
        return _Source(folder, {"kind": "path", "path": str(path.resolve())}, folder.name, path.resolve())
    if _is_name(source):
        store.get(source)  # the unknown-model error, with close names
    raise MfluxError(f"{source}: no such model, folder or file (see: mflux list)")


def _path(source: str) -> Path:
    """`source` as a path, checked so that a NUL or an over-long name is one clear error, not an OSError."""
    path = Path(source).expanduser()
    try:
        path.exists()
    except ValueError:
        raise MfluxError(f"{source!r}: not a valid path (it holds a NUL character)") from None
    except OSError as e:
        raise MfluxError(f"{source[:80]}...: not a valid path ({e.strerror})") from None
    return path


def _read_single_file(path: Path) -> _SingleFile:
    """A single file's Format from its content (header, key names, tensor types), never its name.
    Containers other than safetensors join here: a file starting with GGUF's magic is a GGUF."""
    if gguf.is_gguf(path):
        return _read_gguf(path)
    table = SafetensorsFile(path, fp8=True).tensors
    tensors = {k: (dtype, shape) for k, (dtype, shape, _) in table.items()}
    try:
        fmt = formats.detect_format(tensors)
        keys = {c: formats.component_keys(fmt, c, tensors) for c in fmt.prefixes}
    except MfluxError as e:
        raise MfluxError(f"{path}: {e}") from None
    return _SingleFile(path.resolve(), fmt, tensors, keys)


def _read_gguf(path: Path) -> _SingleFile:
    """A FLUX.1 GGUF: the transformer alone, in BFL names; its header is checked as it is parsed."""
    types, shapes = convert_gguf.types(path), convert_gguf.shapes(path)
    tensors = {k: (types[k], shapes[k]) for k in shapes}
    fmt = formats.Format("gguf", "bfl", {"transformer": ""}, tuple(sorted(set(types.values()))), False)
    return _SingleFile(path.resolve(), fmt, tensors, {"transformer": {k: (k, None) for k in tensors}})


def _open_single_file(path: Path, store, base: str | None, variant: str | None) -> _Source:
    single = _read_single_file(path)
    try:
        shapes = single.shapes("transformer")
        config = bfl.diffusers_config(shapes)
        check_keys(shapes, build_module("transformer", {"transformer": config}), str(path))
        # From the shapes (Fill by its 384 input channels); a Kontext or Krea file reads as dev.
        variant = detect_variant({"transformer": config}, variant)
    except MfluxError as e:
        raise MfluxError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None
    # The base gives the tokenizers and configs, and the text encoders and VAE a file lacks, which the
    # guided variants share.
    guided = VARIANTS[variant].guidance_embeds
    plain = "dev" if guided else "schnell"
    if base is None and store.exists(plain):
        base = plain  # the catalog model in the store
        print(
            f"taking tokenizers, configs and what {path.name} lacks from {plain} (the stored catalog model)"
        )
    if base is None:
        lacks = (
            "holds only the transformer"
            if len(single.fmt.prefixes) == 1
            else "carries no tokenizers or configs"
        )
        raise MfluxError(
            f"{path.name} {lacks}: give the text encoders, VAE, tokenizers and configs with "
            f"--base {plain} (a store model) or --base PATH (a FLUX.1 {plain} folder)"
        )
    b = _open(base, store, None)
    for c in single.fmt.prefixes:  # the file's other components, against the base's configs
        if c != "transformer":
            check_keys(single.shapes(c), build_module(c, b.folder.architecture), f"{path} ({c})")
    if VARIANTS[b.folder.variant].guidance_embeds != guided:
        raise MfluxError(
            f"{path.name} is a {variant} transformer (it {'has' if guided else 'has no'} guidance_in) but "
            f"base {base!r} is {b.folder.variant} (pass --base {plain})"
        )
    # A folder base is recorded resolved, so the manifest means the same from any working directory.
    base_record = base if _is_name(base) and store.exists(base) else str(Path(base).expanduser().resolve())
    record = {
        "kind": "path",
        "path": str(path.resolve()),
        "base": base_record,
        "format": single.fmt.describe(),
        # what each stored tensor was in the file, e.g. "F8_E4M3 scaled" or a GGUF's "Q4_K"
        "tensor_types": {c: single.types(c) for c in single.fmt.prefixes},
    }
    if single.fmt.container == "gguf":
        record["keep_gguf_quantization"] = False
    folder = dataclasses.replace(b.folder, variant=variant)
    return _Source(folder, record, path.stem, b.path, single=single)


def _weights(src: _Source, component: str, dtype: str, spec: QuantSpec | None):
    if src.single is None or component not in src.single.fmt.prefixes:
        yield from iter_weights(src.folder, component, getattr(mx, dtype), spec)
        return
    yield from _file_weights(src.single, component, getattr(mx, dtype), spec)


def _is_gguf(src: _Source) -> bool:
    return src.single is not None and src.single.fmt.container == "gguf"


def _file_weights(single: _SingleFile, component: str, dtype, spec: QuantSpec | None):
    """A single file's component, one group of tensors at a time (read, made exact float32, renamed,
    rounded once to `dtype`, quantized under `spec`): memory stays near one tensor."""
    f, keys = SafetensorsFile(single.path, fp8=True), single.keys[component]
    try:
        for group in formats.groups(single.fmt, component, keys):
            exact = {n: _exact(f, *keys[n]) for n in group}
            renamed = formats.sanitize(single.fmt, component, exact, keys)
            yield from stream(cast_and_quantize(component, renamed, dtype, spec))
    finally:
        f.close()


def _exact(f: SafetensorsFile, key: str, scale: str | None) -> mx.array:
    return formats.to_float32(f.load(key), f.tensors[key][0], f.load(scale) if scale else None)


class _Counter:
    """Passes tensors through, counting stored bits and the float weights they stand for."""

    def __init__(self, tensors, spec: QuantSpec | None):
        self.tensors, self.spec = tensors, spec
        self.bits = self.weights = self.quantized = 0

    def reporting(self, bar):
        """The tensors, each one's bytes added to `bar` once the writer asks for the next."""
        for name, arr in self:
            yield name, arr
            bar.update(arr.nbytes)

    def __iter__(self):
        for name, arr in self.tensors:
            mx.clear_cache()  # a written shard's buffers go back to the system, not to MLX's cache
            self.bits += arr.nbytes * 8
            if self.spec is not None and name.endswith(".weight") and arr.dtype == mx.uint32:
                self.weights += arr.size * 32 // self.spec.bits
                self.quantized += 1
            elif not name.endswith((".scales", ".biases")) or self.spec is None:
                self.weights += arr.size
            yield name, arr

    @property
    def bits_per_weight(self) -> float:
        return self.bits / max(self.weights, 1)


def _stored_quantization(src: _Source) -> dict:
    q = dict(src.folder.quantization or {})
    for c in src.single.fmt.prefixes if src.single else ():  # the base's, replaced by the single file's
        q.pop(c, None)
    if src.keep_gguf:  # the GGUF's legacy blocks, stored as they are
        q["transformer"] = convert_gguf.quantization(src.single.path)
    return {c: spec for c, spec in q.items() if spec}


def _spec(q: dict | None) -> QuantSpec | None:
    return QuantSpec.from_dict(q) if q else None


def _architecture(src: _Source, dtypes: dict) -> dict:
    arch = copy.deepcopy(src.folder.architecture)
    if src.single is not None:
        arch["transformer"] = bfl.diffusers_config(src.single.shapes("transformer"))
        # The file's pipeline, not the base's: what tells a converted Kontext file from dev.
        arch["pipeline"] = {"class_name": VARIANTS[src.folder.variant].pipeline}
    for c in ("text_encoder", "text_encoder_2"):
        arch[c]["dtype"] = dtypes[c]  # transformers' own key for the weights' dtype
        arch[c].pop("torch_dtype", None)
    return {c: config_values(d) for c, d in arch.items()}


def _source_dtype(src: _Source, component: str) -> str:
    """The dtype of the component's float tensors, read from the safetensors headers."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if _is_gguf(src) and component == "transformer":
        return "float32"  # what its blocks dequantize to
    if src.single is not None and component in src.single.fmt.prefixes:
        # float8 and float16 sources count as bfloat16: T5 keeps bfloat16 when float16 is asked for
        types = [src.single.tensors[k][0] for k, _ in src.single.keys[component].values()]
        return "float32" if "F32" in types and len(set(types)) == 1 else "bfloat16"
    for f in sorted((src.folder.path / component).glob("*.safetensors")):
        for dtype, _, _ in SafetensorsFile(f).tensors.values():
            if dtype in names:
                return names[dtype]
    return "float32"


def _component_dtype(component: str, dtype: str, source_dtype: str) -> str:
    if component != "text_encoder_2" or dtype != "float16":
        return dtype
    kept = source_dtype if source_dtype in ("bfloat16", "float32") else "float32"
    print(f"warning: T5 (text_encoder_2) is kept in {kept}: float16 overflows in T5", file=sys.stderr)
    return kept


def _components(components: list[str] | None) -> tuple[str, ...]:
    if components is None:
        return QUANTIZABLE_COMPONENTS
    if isinstance(components, str):
        components = components.split(",")
    chosen = tuple(c.strip() for c in components if c.strip())
    bad = [c for c in chosen if c not in QUANTIZABLE_COMPONENTS]
    if bad or not chosen:
        what = f"cannot quantize {bad[0]!r}" if bad else "no components given"
        raise InvalidArgument(
            f"{what} (choose from {', '.join(QUANTIZABLE_COMPONENTS)}; the VAE stays in float)"
        )
    return chosen


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _refuse_self(store, name: str, src: _Source) -> None:
    validate_name(name)
    if store.path(name).resolve() == src.path:
        raise MfluxError(f"cannot write {name!r} into its own source (choose another --name)")


def _is_name(s: str) -> bool:
    try:
        validate_name(s)
    except InvalidArgument:
        return False
    return True


def _estimate(src: _Source, component: str, dtype: str, spec: QuantSpec | None) -> int:
    """The bytes this component will take in the new model, from the source's file sizes: a cast
    scales them by the itemsizes; quantizing stores `bits` per weight plus a scale (and an affine
    bias) per group. Good to a few percent, which is what a free-space check and a bar need."""
    if _is_gguf(src) and component == "transformer":
        return convert_gguf.estimate(src.single.path, dtype, spec, src.keep_gguf)
    if src.single is not None and component in src.single.fmt.prefixes:
        keys = src.single.keys[component].values()
        weights = sum(math.prod(src.single.tensors[k][1]) for k, _ in keys)
    else:
        size = sum(p.stat().st_size for p in sorted((src.folder.path / component).glob("*.safetensors")))
        if component in _stored_quantization(src):
            return size  # kept as stored
        weights = size / _ITEMSIZE.get(_source_dtype(src, component), 4)
    if spec is None:
        return int(weights * _ITEMSIZE[dtype])
    per_group = _ITEMSIZE[dtype] * (2 if spec.mode == "affine" else 1)
    return int(weights * (spec.bits / 8 + per_group / spec.group_size))


def _check_space(store: Store, name: str, needed: int) -> None:
    # Before any compute, as `pull` does; the margin covers the copied tokenizers and the estimate.
    free = store.free_bytes()
    if needed * 1.05 > free:
        raise MfluxError(
            f"not enough disk space to write {name}: it needs about {format_size(needed)} in {store.root}, "
            f"and {format_size(free)} is free (free some space, or set MFLUX_HOME to a larger disk)"
        )


@contextmanager
def _write_errors(store: Store):
    """A failed write becomes one clear line. mx.save_safetensors reports a full disk as
    `RuntimeError("[write] ...")`, and shutil.copytree as `shutil.Error` with errno None; neither is an
    ENOSPC the store sees. Free space is measured here, before the build folder is deleted."""
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith("[write]"):
            raise
        _raise_write_error(store, str(e))
    except shutil.Error as e:
        if e.errno is not None:
            raise
        _raise_write_error(store, "; ".join(str(why) for *_, why in (e.args[0] if e.args else [])))


def _raise_write_error(store: Store, reason: str):
    if "No space left" in reason or store.free_bytes() < 2**20:
        raise OSError(errno.ENOSPC, "No space left on device") from None  # the store's disk-full line
    raise MfluxError(f"cannot write in {store.root}: {reason[:300]} (is the disk failing?)") from None


def _progress_bar(component: str, total: int, enabled: bool):
    # As `mflux pull` shows each file: one bar per component, in bytes written.
    from huggingface_hub.utils import tqdm as hf_tqdm

    return hf_tqdm(
        total=total,
        desc=component,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled or None,
        name="mflux.convert",
    )


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    elif src.is_file():
        shutil.copy2(src, dst)
