"""The manifest of a stored model: `manifest.toml`, the one home of what mflux knows about it.

A model is added once (pull, convert, quantize); its config files are read then and their values kept
here, with every file's size and sha256, so later commands never guess from names or re-read configs.
"""

import hashlib
import math
import os
import re
import shlex
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mflux import __version__
from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime.folder import COMPONENTS, CONFIG_FILES, REDUX_CONFIG_FILES, detect_variant
from mflux.runtime.folder import VARIANTS as RUNTIME_VARIANTS
from mflux.runtime.folder import read_architecture as architecture_from_hf
from mflux.runtime.quantization import QUANTIZABLE_COMPONENTS, QuantSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.toml"
FAMILIES = ("flux1",)
REDUX = "redux"  # FLUX.1 Redux: an image encoder and embedder used with a pipeline, not a pipeline
VARIANTS = (*RUNTIME_VARIANTS, REDUX)
FORMATS = ("hf", "mlx")
DTYPES = ("bfloat16", "float16", "float32")
# What a store entry holds: a model folder, or one LoRA file (a Control LoRA pulled for dev), whose manifest
# has empty architecture and defaults and the variant it goes on.
KINDS = ("model", "lora")
SOURCE_KEYS = {"hub": ("repo", "revision", "commit"), "path": ("path",), "model": ("name",)}
SHIFT_KEYS = ("use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
_CHUNK = 2**20
MTIME_SLACK = 2.0  # seconds: `created` is kept to the second
# The architecture keys the runtime reads, with their kind: "size" a positive integer, "int" any integer,
# "number" a finite int or float, "sizes" a non-empty list of positive integers. A key may be absent
# (the runtime then takes diffusers' default), but never of another kind.
ARCHITECTURE_KINDS = {
    "transformer": {
        **dict.fromkeys(("in_channels", "out_channels", "patch_size", "attention_head_dim"), "size"),
        **dict.fromkeys(("num_layers", "num_single_layers", "num_attention_heads"), "size"),
        **dict.fromkeys(("joint_attention_dim", "pooled_projection_dim"), "size"),
        "axes_dims_rope": "sizes",
        "guidance_embeds": "bool",
    },
    "text_encoder": {
        **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"), "size"),
        **dict.fromkeys(("num_attention_heads", "max_position_embeddings"), "size"),
        "eos_token_id": "int",
        "layer_norm_eps": "number",
        "hidden_act": "str",
    },
    "text_encoder_2": {
        **dict.fromkeys(("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"), "size"),
        **dict.fromkeys(("relative_attention_num_buckets", "relative_attention_max_distance"), "size"),
        "layer_norm_epsilon": "number",
        "feed_forward_proj": "str",
    },
    "vae": {
        **dict.fromkeys(("in_channels", "out_channels", "latent_channels", "layers_per_block"), "size"),
        "norm_num_groups": "size",
        "block_out_channels": "sizes",
        **dict.fromkeys(("scaling_factor", "shift_factor"), "number"),
        **dict.fromkeys(("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"), "bool"),
    },
    "scheduler": {
        "use_dynamic_shifting": "bool",
        **dict.fromkeys(("base_shift", "max_shift"), "number"),
        **dict.fromkeys(("base_image_seq_len", "max_image_seq_len"), "size"),
    },
}
_KIND_TEXT = {
    "size": "a positive integer",
    "int": "an integer",
    "number": "a finite number",
    "sizes": "a list of positive integers",
    "bool": "true or false",
    "str": "a string",
}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    name: str
    variant: str  # a key of mflux.runtime.folder.VARIANTS (schnell, dev, kontext, ...), or "redux"
    format: str  # "hf" (diffusers layout, as pulled) | "mlx" (runtime names and layouts)
    dtype: str
    source: dict  # {"kind": "hub"|"path"|"model", ...}
    files: list[dict]  # [{"path", "size", "sha256"}], paths relative and posix
    architecture: dict  # component -> config.json values, under Hugging Face's key names
    defaults: dict  # steps, guidance, max_sequence_length (+ shift settings for dev)
    family: str = "flux1"
    quantization: dict | None = None  # {component: {bits, group_size, mode[, layers: {path: {...}}]}}
    created: str = field(default_factory=_now)  # ISO 8601, UTC
    checked: str | None = None  # ISO 8601, UTC: when every file newer than `created` last matched its sha256
    mflux_version: str = __version__
    format_version: int = FORMAT_VERSION
    kind: str = "model"  # or "lora" (KINDS)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def size_bytes(self) -> int:
        return sum(f["size"] for f in self.files)


def new_manifest(
    folder: Path,
    *,
    name: str,
    format: str,
    dtype: str,
    source: dict,
    quantization: dict | None = None,
    architecture: dict | None = None,
    variant: str | None = None,
) -> Manifest:
    """A manifest for the files now in `folder`: hashes them, and reads the architecture from its
    config files unless given (an `mlx` folder passes its source's). `variant` names what the files
    can't tell (a catalog name such as krea, kept from the source); it is checked against the
    transformer, and detected from the architecture when not given."""
    arch = architecture if architecture is not None else architecture_from_hf(folder)
    variant = detect_variant(arch, variant)
    return Manifest(
        name=name,
        variant=variant,
        format=format,
        dtype=dtype,
        source=source,
        files=hash_files(folder),
        architecture=arch,
        defaults=defaults_for(variant, arch),
        quantization=quantization or None,
    )


def write_manifest(folder: Path, manifest: Manifest, keep_mtime: bool = False) -> None:
    """Write `folder/manifest.toml` atomically: a temp file, then os.replace. `keep_mtime` keeps the
    old file's mtime, which `mflux list` shows as when the model was made."""
    import tomli_w

    _validate(manifest.to_dict(), Path(folder) / MANIFEST)
    data = _toml_ready(_ordered(manifest))
    path = Path(folder) / MANIFEST
    tmp = Path(folder) / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            tomli_w.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_mtime:
            st = path.stat()
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def trusted_until(m: Manifest) -> float:
    """The time (a Unix timestamp) up to which a file's mtime shows it unchanged: when the model was
    made, or when its files last matched their sha256 (a copied store gives every file a new mtime)."""
    made = datetime.fromisoformat(m.created).timestamp() + MTIME_SLACK
    return max(made, datetime.fromisoformat(m.checked).timestamp()) if m.checked else made


def stamp_checked(folder: Path, m: Manifest, when: datetime) -> None:
    """Record in the manifest that every file matched its sha256 at `when`, so the next open trusts
    mtimes up to then instead of hashing again. Best effort: in a read-only store the next open hashes
    again, and a manifest replaced meanwhile (a `--force` build of the same name) is left alone."""
    try:
        if read_manifest(folder) != m:
            return
        write_manifest(folder, replace(m, checked=when.isoformat(timespec="microseconds")), keep_mtime=True)
    except (OSError, MfluxError):
        pass


def read_manifest(folder: Path) -> Manifest:
    """Read and validate `folder/manifest.toml`; anything wrong is one MfluxError naming the file and field."""
    path = Path(folder) / MANIFEST
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MfluxError(f"{path}: no such file ({Path(folder).name} is not a model mflux stored)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise MfluxError(f"{path}: not valid TOML ({e}){_fix(path)}") from None
    _validate(data, path)
    if isinstance(data["created"], datetime):  # a hand-written TOML datetime
        data["created"] = data["created"].isoformat()
    known = Manifest.__dataclass_fields__
    return Manifest(**{k: v for k, v in data.items() if k in known})


def _fix(path: Path) -> str:
    return (
        f" (the manifest is corrupt or was edited by hand: restore it, or remove the model with "
        f"`mflux rm {path.parent.name}` and pull, convert or quantize it again)"
    )


def _check_version(data: dict, path: Path) -> None:
    v = data.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise MfluxError(f"{path}: bad field 'format_version': expected an integer, got {v!r}{_fix(path)}")
    if v > FORMAT_VERSION:
        raise MfluxError(
            f"{path}: written by a newer mflux (manifest format {v}; this mflux {__version__} reads up to "
            f"{FORMAT_VERSION}) (upgrade mflux: reinstall it from this project's repository, `git pull` then "
            "`pip install '.[cpu]'` or `'.[cuda]'`; not `pip install -U mflux`, an unrelated PyPI project)"
        )
    if v < 1:
        raise MfluxError(f"{path}: manifest format {v} is not supported{_fix(path)}")


def _validate(data: dict, path: Path) -> None:
    def bad(key: str, problem: str):
        raise MfluxError(f"{path}: bad field {key!r}: {problem}{_fix(path)}")

    def want(key: str, kind: type, choices: tuple | None = None):
        if key not in data:
            bad(key, "missing")
        v = data[key]
        if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
            bad(key, f"expected {kind.__name__}, got {v!r}")
        if choices and v not in choices:
            bad(key, f"expected one of {', '.join(choices)}, got {v!r}")
        return v

    _check_version(data, path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", want("name", str)) or ".." in data["name"]:
        bad("name", f"{data['name']!r} is not a valid model name")
    want("family", str, FAMILIES)
    want("variant", str, VARIANTS)
    want("format", str, FORMATS)
    want("dtype", str, DTYPES)
    want("mflux_version", str)
    if not isinstance(data.get("created"), datetime):
        try:
            datetime.fromisoformat(want("created", str))
        except ValueError:
            bad("created", f"not an ISO 8601 time: {data['created']!r}")
    if data.get("checked") is not None:
        try:
            datetime.fromisoformat(want("checked", str))
        except ValueError:
            bad("checked", f"not an ISO 8601 time: {data['checked']!r}")
    _validate_source(want("source", dict), bad)
    _validate_files(want("files", list), bad)
    if data.get("kind", "model") != "model" and want("kind", str, KINDS) == "lora":
        if len(data["files"]) != 1:
            bad("files", f"a LoRA entry holds one file, got {len(data['files'])}")
        return  # a LoRA file has no architecture, defaults or quantization of its own
    if (
        data["variant"] == REDUX
    ):  # Redux's own configs, and no defaults: the pipeline it is used with has them
        _validate_redux_architecture(want("architecture", dict), bad)
        want("defaults", dict)
    else:
        _validate_architecture(want("architecture", dict), bad)
        _validate_defaults(want("defaults", dict), bad)
    if data.get("quantization") is not None:
        _validate_quantization(want("quantization", dict), bad)


def _validate_source(source: dict, bad) -> None:
    kind = source.get("kind")
    if kind not in SOURCE_KEYS:
        bad("source.kind", f"expected one of {', '.join(SOURCE_KEYS)}, got {kind!r}")
    for k in SOURCE_KEYS[kind]:
        if not isinstance(source.get(k), str):
            bad(f"source.{k}", f"a {kind} source needs a string, got {source.get(k)!r}")


def _validate_files(files: list, bad) -> None:
    for i, f in enumerate(files):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            bad(where, f"expected a table, got {f!r}")
        p = f.get("path")
        if not isinstance(p, str) or not p or p.startswith("/") or ".." in Path(p).parts:
            bad(f"{where}.path", f"expected a relative path inside the model, got {p!r}")
        if not isinstance(f.get("size"), int) or isinstance(f.get("size"), bool) or f["size"] < 0:
            bad(f"{where}.size", f"expected a byte count, got {f.get('size')!r}")
        if not isinstance(f.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", f["sha256"]):
            bad(f"{where}.sha256", f"expected 64 lowercase hex digits, got {f.get('sha256')!r}")


def _validate_architecture(arch: dict, bad) -> None:
    for c in CONFIG_FILES:
        if not isinstance(arch.get(c), dict):
            bad(f"architecture.{c}", "missing" if c not in arch else f"expected a table, got {arch[c]!r}")
        for key, kind in ARCHITECTURE_KINDS[c].items():
            if key in arch[c] and not _is_kind(arch[c][key], kind):
                bad(f"architecture.{c}.{key}", f"expected {_KIND_TEXT[kind]}, got {arch[c][key]!r}")


def not_a_pipeline(name: str) -> MfluxError:
    """The refusal for a Redux store entry given where a FLUX.1 pipeline is needed (-m, --path, convert)."""
    return MfluxError(
        f"{name} is FLUX.1 Redux, image prompts for a model, not a model that draws "
        f"(use it as: mflux run -m dev --redux IMAGE --redux-model {name})"
    )


def _validate_redux_architecture(arch: dict, bad) -> None:
    for c in REDUX_CONFIG_FILES:
        if not isinstance(arch.get(c), dict):
            bad(f"architecture.{c}", "missing" if c not in arch else f"expected a table, got {arch[c]!r}")


def _is_kind(v, kind: str) -> bool:
    integer = isinstance(v, int) and not isinstance(v, bool)
    if kind == "size":
        return integer and v > 0
    if kind == "int":
        return integer
    if kind == "number":
        return (integer or isinstance(v, float)) and math.isfinite(v)
    if kind == "sizes":
        return isinstance(v, list) and bool(v) and all(_is_kind(x, "size") for x in v)
    return isinstance(v, {"bool": bool, "str": str}[kind])


def _validate_defaults(defaults: dict, bad) -> None:
    for k in ("steps", "max_sequence_length"):
        v = defaults.get(k)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            bad(f"defaults.{k}", f"expected a positive integer, got {v!r}")
    for k, kind in {"guidance": "number", **ARCHITECTURE_KINDS["scheduler"]}.items():
        if (k == "guidance" or k in defaults) and not _is_kind(defaults.get(k), kind):
            bad(f"defaults.{k}", f"expected {_KIND_TEXT[kind]}, got {defaults.get(k)!r}")


def _validate_quantization(q: dict, bad) -> None:
    for component, spec in q.items():
        where = f"quantization.{component}"
        if component not in COMPONENTS:
            bad(where, f"unknown component (expected one of {', '.join(COMPONENTS)})")
        if not isinstance(spec, dict):
            bad(where, f"expected a table, got {spec!r}")
        base = {k: v for k, v in spec.items() if k != "layers"}
        layers = spec.get("layers", {})
        if not isinstance(layers, dict):
            bad(f"{where}.layers", f"expected a table, got {layers!r}")
        for layer, override in [(None, {}), *layers.items()]:
            try:
                QuantSpec.from_dict({**base, **override})
            except (InvalidArgument, KeyError, TypeError, ValueError) as e:
                bad(f"{where}.layers.{layer}" if layer else where, str(e) or "incomplete")


def _ordered(manifest: Manifest) -> dict:
    # Scalars first, then tables, so the file reads top-down like a card.
    d = manifest.to_dict()
    keys = ["format_version", "name", "kind", "family", "variant", "format", "dtype", "created", "checked"]
    keys += ["mflux_version", "source", "quantization", "defaults", "architecture", "files"]
    if manifest.kind == "model":  # the default: models' manifests stay as they were
        keys.remove("kind")
    return {k: d[k] for k in keys}


def _toml_ready(value):
    """Drop None (TOML has no null) and make every key a string."""
    if isinstance(value, dict):
        return {str(k): _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_toml_ready(v) for v in value if v is not None]
    return value


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: Path) -> list[dict]:
    """Every file under `folder` except its manifest: relative posix path, size and sha256."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or rel == MANIFEST or rel.startswith(f".{MANIFEST}."):
            continue
        out.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
    return out


def defaults_for(variant: str, architecture: dict) -> dict:
    """The variant's defaults as its catalog entry gives them; a shifting variant (dev) takes its sigma
    shift settings from the folder's scheduler config where it has them."""
    from mflux.catalog import catalog

    entry = catalog().get(variant)
    if entry is None:
        raise InvalidArgument(f"unknown variant {variant!r} (expected one of {', '.join(VARIANTS)})")
    defaults = dict(entry.defaults)
    if defaults.get("use_dynamic_shifting"):
        scheduler = (architecture or {}).get("scheduler", {})
        defaults.update({k: scheduler[k] for k in SHIFT_KEYS if k in scheduler})
    return defaults


def quantization_summary(quantization: dict | None) -> dict | None:
    """One {bits, group_size, mode} for display and JSON (the transformer's, else the first component's),
    with every component's own settings under `components`."""
    if not quantization:
        return None
    main = quantization.get("transformer") or next(iter(quantization.values()))
    spec = QuantSpec.from_dict(main).to_dict()
    return {**spec, "components": quantization}


def quantization_label(quantization: dict | None) -> str:
    """A short label: `-`, `q8`, `q4-g32`, `mxfp4`, or per component when they differ."""
    if not quantization:
        return "-"
    labels = {c: _label(QuantSpec.from_dict(q)) for c, q in quantization.items()}
    if len(set(labels.values())) == 1:
        return next(iter(labels.values()))
    return ",".join(f"{c}:{label}" for c, label in labels.items())


def _label(spec: QuantSpec) -> str:
    if spec.mode != "affine":
        return spec.mode
    return f"q{spec.bits}" + (f"-g{spec.group_size}" if spec.group_size != 64 else "")


def remake_hint(folder: Path) -> str:
    """How to make a damaged store model again: the command its manifest's source gives, or (with no
    readable manifest) the commands that make models."""
    try:
        return f"make it again: {remake_command(read_manifest(folder))}"
    except MfluxError:
        return "pull, convert or quantize it again"


def remake_command(m: Manifest) -> str:
    """The command that makes `m` again from its recorded source, replacing the stored one: a pull for
    a Hub model, a quantize for a quantized one, a convert for the rest."""
    from mflux.catalog import catalog

    source, tail = m.source, f"--name {m.name} --force"
    if source["kind"] == "hub":
        known = next((e.name for e in catalog().values() if e.repo == source["repo"]), None)
        if known == m.name:
            return f"mflux pull {known} --force"
        return f"mflux pull {known or source['repo']} {tail}"
    what = shlex.quote(source["name"] if source["kind"] == "model" else source["path"])
    if "imported" in source:  # `mflux import`: the folder as it was
        return f"mflux import {what} {tail}"
    dtype = f" --dtype {m.dtype}" if m.dtype != "bfloat16" else ""
    if "base" in source:  # a single-file transformer, its other components from a base
        return (
            f"mflux convert {what} --base {shlex.quote(source['base'])}{dtype}{_single_file_flags(m)} {tail}"
        )
    if m.quantization:
        return f"mflux quantize {what} {_quantize_flags(m.quantization)}{dtype} {tail}"
    return f"mflux convert {what}{dtype} {tail}"


def _single_file_flags(m: Manifest) -> str:
    """How a single file's transformer was stored: a GGUF's blocks kept, or quantized while converting."""
    if m.source.get("keep_gguf_quantization"):
        return " --keep-gguf-quantization"
    q = (m.quantization or {}).get("transformer")
    if not q:
        return ""
    group = q.get("group_size", 64)
    return f" --bits {q['bits']}" + (f" --group-size {group}" if group != 64 else "")


def _quantize_flags(quantization: dict) -> str:
    main = quantization.get("transformer") or next(iter(quantization.values()))
    spec = QuantSpec.from_dict(main)
    flags = f"--mode {spec.mode}" if spec.mode != "affine" else f"--bits {spec.bits}"
    if spec.mode == "affine" and spec.group_size != 64:
        flags += f" --group-size {spec.group_size}"
    if set(quantization) != set(QUANTIZABLE_COMPONENTS):
        flags += f" --components {','.join(c for c in QUANTIZABLE_COMPONENTS if c in quantization)}"
    return flags
