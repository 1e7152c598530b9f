"""`mflux inspect`: what a model or a safetensors file holds, read from headers only (no tensor data).

A quantized weight is one with `<path>.scales` beside `<path>.weight`, as MLX stores it: the weight is
packed into uint32 (`in * bits / 32` columns), and scales (and, for affine, biases) hold one value per
group. Its parameter count is the unpacked `out * in`; bits per weight count every stored byte.
"""

import importlib.util
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from mflux.converters import bfl, formats
from mflux.errors import InvalidArgument, MfluxError
from mflux.manifest import (
    COMPONENTS,
    MANIFEST,
    architecture_from_hf,
    quantization_summary,
    read_manifest,
    sha256_file,
    stamp_checked,
)
from mflux.runtime.folder import detect_variant
from mflux.runtime.quantization import AFFINE_BITS, FP_MODES
from mflux.runtime.weights import _DTYPES, BYTES_PER_ELEMENT, SafetensorsFile, refuse_pickle
from mflux.store import Store, files_on_disk, format_size, validate_name

_LORA_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_FLOATS = ("F32", "F16", "BF16")


def inspect(target: str, *, tensors: bool = False, verify: bool = False) -> dict:
    """Describe a store model (by name), a model folder, or a single .safetensors file.

    Returns the manifest's fields under their own names (when there is a manifest), and per component
    the tensor and parameter counts, bytes, dtypes and quantization; `tensors` adds every tensor's name,
    shape and dtype; `verify` re-hashes the files against the manifest."""
    path = _resolve(target)
    if path.is_dir():
        return _inspect_folder(path, tensors, verify)
    if verify:
        raise MfluxError(f"{path}: --verify needs a model folder with a {MANIFEST} (a single file has none)")
    return _inspect_file(path, tensors)


def _resolve(target: str) -> Path:
    store = Store()
    try:
        is_name = validate_name(target) == target
    except InvalidArgument:
        is_name = False
    if is_name and store.exists(target):
        return store.lora_file(target) or store.path(target)  # a stored LoRA: its one file
    path = Path(target).expanduser()
    if _exists(path):
        return path
    if is_name:
        store.get(target)  # raises: unknown model, with close names
    raise MfluxError(f"{target}: no such model, folder or file (see: mflux list)")


def _looks_like_a_model(path: Path) -> bool:
    markers = [path / MANIFEST, path / "model_index.json", *(path / c for c in COMPONENTS)]
    return any(p.exists() for p in markers)


def _exists(path: Path) -> bool:
    """Whether `path` exists; a name too long for the file system, or one with a NUL, is one clear error."""
    try:
        return path.exists()
    except ValueError:  # an embedded NUL
        raise MfluxError(f"{str(path)!r}: not a valid path (it holds a NUL character)") from None
    except OSError as e:
        raise MfluxError(f"{str(path)[:80]}...: not a valid path ({e.strerror})") from None


def _inspect_folder(path: Path, tensors: bool, verify: bool) -> dict:
    if not _looks_like_a_model(path):
        raise MfluxError(
            f"{path} does not look like a model folder: it has no {MANIFEST}, model_index.json or "
            f"component folders ({', '.join(COMPONENTS)}) (give a model folder, a store name or a "
            ".safetensors file)"
        )
    manifest = read_manifest(path) if (path / MANIFEST).is_file() else None
    report: dict = {"path": str(path), "kind": "model" if manifest else "folder"}
    quantization = {}
    if manifest:
        report.update(manifest.to_dict())
        report["quantization"] = quantization_summary(manifest.quantization)
        quantization = manifest.quantization or {}
        report["damaged"] = files_on_disk(path, manifest.files)[1]
    else:
        try:  # a diffusers-layout folder that mflux did not write
            report.update(format="hf", variant=detect_variant(architecture_from_hf(path)))
        except MfluxError:
            pass
    groups: dict[str, list[Path]] = {}
    # A model keeps its weights at the top or one folder down; deeper files are not its own.
    for f in sorted([*path.glob("*.safetensors"), *path.glob("*/*.safetensors")]):
        rel = f.relative_to(path)
        if not any(part.startswith(".") for part in rel.parts) and f.is_file():
            groups.setdefault(rel.parts[0] if len(rel.parts) > 1 else ".", []).append(f)
    if not groups:
        raise MfluxError(f"{path}: no .safetensors files found (is this a model folder?)")
    if verify and manifest is None:
        raise MfluxError(
            f"{path} has no {MANIFEST} to verify against (--verify works on models mflux stored)"
        )
    dtype = manifest.dtype if manifest else None
    report["components"] = {}
    for c, files in groups.items():
        try:
            sfs = [SafetensorsFile(f) for f in files]
            report["components"][c] = _component(sfs, quantization.get(c), dtype, tensors)
        except MfluxError as e:
            if not (verify or report.get("damaged")):
                raise
            report["components"][c] = {"error": str(e)}  # a damaged file: the verify report says more
    report["total"] = _total(report["components"])
    if quantization:
        _quantization_as_stored(report, quantization)
    if verify:
        started = datetime.now(timezone.utc)
        report["verify"] = _verify(path, manifest.files)
        if report["verify"]["ok"]:  # remembered: opening the model no longer hashes a copied store
            stamp_checked(path, manifest, started)
    return report


def _quantization_as_stored(report: dict, recorded: dict) -> None:
    """The header's quantization, as the files hold it (as the table reads them): a component the
    manifest records as quantized but whose files hold no quantized tensor is left out, and named."""
    components = report["components"]
    held = {c: q for c, q in recorded.items() if components.get(c, {}).get("quantized_tensors", 1)}
    report["quantization"] = quantization_summary(held)
    unheld = sorted(set(recorded) - set(held))
    if unheld:
        report["manifest_quantization"] = (
            f"the manifest lists {', '.join(f'{c} {_spec_text(recorded[c])}' for c in unheld)}, "
            f"but {'its' if len(unheld) == 1 else 'their'} files hold no quantized tensor"
        )


def _inspect_file(path: Path, tensors: bool) -> dict:
    refuse_pickle(path)
    if not path.is_file():  # a FIFO or a device would block the read, or never end
        raise MfluxError(f"{path}: not a regular file (give a .safetensors file or a model folder)")
    if path.suffix != ".safetensors":
        raise MfluxError(f"{path}: not a .safetensors file or a model folder")
    sf = SafetensorsFile(path, fp8=True)  # a single file may be float8: convert reads it
    keys = sf.keys()
    if any(mark in k for k in keys for mark in _LORA_MARKS):
        inspect_lora = _lora_inspector()
        if inspect_lora is not None:
            return inspect_lora(path, tensors=tensors)
    report = {"path": str(path), "kind": "safetensors", "layout": _layout(keys), "metadata": sf.metadata}
    report["format"] = _format(sf)
    if report["layout"] == "bfl-transformer":
        # From the tensors: schnell, dev or fill (a Kontext or Krea file has dev's exact tensors).
        report["variant"] = bfl.detect_variant({k: shape for k, (_, shape, _) in sf.tensors.items()})
    report["components"] = {path.name: _component([sf], None, None, tensors)}
    report["total"] = _total(report["components"])
    return report


def _format(sf: SafetensorsFile) -> str | None:
    """What `mflux convert` reads the file as, or None where it would refuse it."""
    try:
        return formats.detect_format({k: (d, shape) for k, (d, shape, _) in sf.tensors.items()}).describe()
    except MfluxError:
        return None


def _dtype_name(dtype: str) -> str:
    return _DTYPES[dtype][1] if dtype in _DTYPES else formats.FLOAT8[dtype]


def _lora_inspector():
    # LoRA files get their own report from mflux.lora, where that module exists.
    if importlib.util.find_spec("mflux.runtime.lora") is None:
        return None
    from mflux.runtime import lora

    return getattr(lora, "inspect_lora", None)


def _layout(keys: list[str]) -> str | None:
    if any(mark in k for k in keys for mark in _LORA_MARKS):
        return "lora"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "bfl-transformer"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers-transformer"
    return None


def _component(files: list[SafetensorsFile], quant: dict | None, dtype: str | None, tensors: bool) -> dict:
    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    stored = 0
    for sf in files:
        for name, (dt, shape, (begin, end)) in sf.tensors.items():
            entries[name] = (dt, shape)
            stored += end - begin
    params, qparams, qbytes = 0, 0, 0
    quantized: Counter = Counter()
    for name, (_, shape) in entries.items():
        layer, _, leaf = name.rpartition(".")
        is_quantized = f"{layer}.scales" in entries and f"{layer}.weight" in entries
        if is_quantized and leaf in ("scales", "biases"):
            continue  # counted with their weight
        if is_quantized and leaf == "weight":
            spec = _spec(layer, shape, entries, quant)
            n = math.prod(shape[:-1]) * shape[-1] * 32 // spec[0]
            quantized[spec] += 1
            params += n
            qparams += n
            qbytes += sum(
                _nbytes(*entries[f"{layer}.{x}"])
                for x in ("weight", "scales", "biases")
                if f"{layer}.{x}" in entries
            )
        else:
            params += math.prod(shape)
    out = {
        "files": len(files),
        "tensor_count": len(entries),
        "parameters": params,
        "bytes": stored,
        "dtypes": dict(sorted(Counter(_dtype_name(dt) for dt, _ in entries.values()).items())),
        "bits_per_weight": round(stored * 8 / params, 3) if params else 0.0,
        "quantized_tensors": sum(quantized.values()),
        "quantization": [
            {"bits": b, "group_size": g, "mode": m, "tensors": n}
            for (b, g, m), n in sorted(quantized.items())
        ],
    }
    if quantized:
        # at the model's dtype, or else at that of the scales (affine keeps them in the source dtype)
        scales = next(dt for k, (dt, _) in entries.items() if k.endswith(".scales"))
        itemsize = _ITEMSIZE.get(dtype or "") or (BYTES_PER_ELEMENT[scales] if scales in _FLOATS else 2)
        out["unquantized_bytes"] = stored - qbytes + qparams * itemsize
    if tensors:
        out["tensors"] = [
            {"name": k, "shape": list(s), "dtype": _dtype_name(d)} for k, (d, s) in sorted(entries.items())
        ]
    return out


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * BYTES_PER_ELEMENT[dtype]


def _spec(layer: str, weight_shape, entries: dict, quant: dict | None) -> tuple[int, int, str]:
    """(bits, group_size, mode) of a quantized layer: from the manifest, else inferred from the shapes."""
    if quant:
        q = {**quant, **quant.get("layers", {}).get(layer, {})}
        return int(q["bits"]), int(q.get("group_size", 64)), q.get("mode", "affine")
    packed, groups = weight_shape[-1], entries[f"{layer}.scales"][1][-1]
    if f"{layer}.biases" in entries:  # affine; bits * group_size is all the shapes tell, so prefer 64
        candidates = [(b, g, "affine") for g in (64, 32, 128) for b in AFFINE_BITS]
    else:
        candidates = [(b, g, m) for m, (b, g) in FP_MODES.items()]
    for bits, group_size, mode in candidates:
        if packed * 32 == groups * group_size * bits:
            return bits, group_size, mode
    raise MfluxError(
        f"{layer}: a quantized weight of shape {tuple(weight_shape)} matches no known quantization"
    )


def _total(components: dict) -> dict:
    params = sum(c.get("parameters", 0) for c in components.values())
    stored = sum(c.get("bytes", 0) for c in components.values())
    return {"parameters": params, "bytes": stored}


def _verify(path: Path, files: list[dict]) -> dict:
    mismatches = []
    for f in files:
        p = path / f["path"]
        if not p.is_file():
            mismatches.append({"path": f["path"], "problem": "missing"})
        elif p.stat().st_size != f["size"]:
            mismatches.append(
                {"path": f["path"], "problem": f"size {p.stat().st_size}, expected {f['size']}"}
            )
        elif sha256_file(p) != f["sha256"]:
            mismatches.append({"path": f["path"], "problem": "sha256 differs"})
    listed = {f["path"] for f in files} | {MANIFEST}
    unlisted = sorted(
        rel for p in path.rglob("*") if p.is_file() and (rel := p.relative_to(path).as_posix()) not in listed
    )
    return {"ok": not mismatches, "files": len(files), "mismatches": mismatches, "unlisted": unlisted}


def format_inspect(report: dict) -> str:
    """The report for humans: the manifest, a table of components, and the tensors if listed."""
    lines = [f"{k:<13} {v}" for k, v in _summary(report)]  # a longer key keeps a space before its value
    components = report.get("components") or {}
    if components:
        lines += ["", _table(components, report.get("total"))]
    for name, c in components.items():
        if "tensors" in c:
            lines += ["", f"{name}:"]
            lines += [f"  {t['name']}  {tuple(t['shape'])}  {t['dtype']}" for t in c["tensors"]]
    if report.get("damaged"):
        lines += ["", f"damaged: {'; '.join(report['damaged'])}"]
    if "verify" in report:
        lines += ["", _verify_line(report["verify"])]
    return "\n".join(lines)


def _summary(report: dict) -> list[tuple[str, str]]:
    rows = []
    for key in ("name", "path", "kind", "layout", "family", "variant", "format", "dtype"):
        if report.get(key) is not None:
            rows.append((key, str(report[key])))
    if "quantization" in report:
        rows.append(("quantization", _quant_text(report["quantization"])))
    if report.get("source"):
        rows.append(("source", _source_text(report["source"])))
    if report.get("created"):
        rows.append(("created", f"{report['created']} by mflux {report.get('mflux_version', '?')}"))
    if report.get("checked"):
        rows.append(("checked", f"{report['checked']}: newer files matched their sha256"))
    if report.get("defaults"):
        rows.append(("defaults", ", ".join(f"{k} {v}" for k, v in report["defaults"].items())))
    if report.get("files"):
        size = sum(f["size"] for f in report["files"])
        rows.append(("files", f"{len(report['files'])} ({format_size(size)})"))
    if report.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in report["metadata"].items())[:200]))
    # Anything else a specialised report (a LoRA's) adds, shown plainly.
    shown = {k for k, _ in rows} | {"components", "total", "verify", "architecture", "mflux_version"}
    shown |= {"format_version", "quantization", "source", "created", "defaults", "files", "metadata"}
    shown |= {"damaged", "checked"}
    rows += [(k, str(v)) for k, v in report.items() if k not in shown and not isinstance(v, (dict, list))]
    return rows


def _quant_text(q: dict | None) -> str:
    if not q:
        return "none"
    parts = [f"{c} {_spec_text(s)}" for c, s in q.get("components", {}).items()]
    return ", ".join(parts) or _spec_text(q)


def _spec_text(s: dict) -> str:
    text = f"{s['bits']}-bit {s.get('mode', 'affine')} g{s.get('group_size', 64)}"
    layers = s.get("layers") or {}
    return text + (f" ({len(layers)} layers differ)" if layers else "")


def _source_text(source: dict) -> str:
    if source.get("kind") == "hub":
        text = f"hub {source.get('repo')} @ {source.get('commit') or source.get('revision')}"
        if source.get("format"):  # a save of the other MLX port, converted at pull (mflux.othermflux)
            text += f" (format {source['format']}, converted at pull)"
        return text
    if source.get("kind") == "model":
        return f"model {source.get('name')}"
    notes = [source[k] for k in ("format",) if k in source]
    notes += [f"{k} {source[k]}" for k in ("base", "imported") if k in source]
    return f"path {source.get('path')}" + (f" ({'; '.join(notes)})" if notes else "")


def _table(components: dict, total: dict | None) -> str:
    rows = [("COMPONENT", "PARAMETERS", "SIZE", "BITS/W", "DTYPES", "QUANTIZED")]
    for name, c in components.items():
        if "error" in c:
            rows.append((name, "?", "?", "", "", c["error"]))
            continue
        dtypes = ", ".join(f"{d} ×{n}" for d, n in c["dtypes"].items())
        quant = ", ".join(f"{q['tensors']} × {_spec_text(q)}" for q in c["quantization"]) or "-"
        if "unquantized_bytes" in c:
            # its size as floats, worded so that the row cannot read as "unquantized"
            quant += f" ({format_size(c['unquantized_bytes'])} as floats)"
        row = (
            name,
            _count(c["parameters"]),
            format_size(c["bytes"]),
            f"{c['bits_per_weight']:.2f}",
            dtypes,
            quant,
        )
        rows.append(row)
    if total and len(components) > 1:
        rows.append(("total", _count(total["parameters"]), format_size(total["bytes"]), "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _verify_line(v: dict) -> str:
    if v["ok"]:
        extra = (
            f"; {len(v['unlisted'])} files not in the manifest: {', '.join(v['unlisted'])}"
            if v["unlisted"]
            else ""
        )
        return f"verify: OK, {v['files']} files match the manifest{extra}"
    problems = "; ".join(f"{m['path']}: {m['problem']}" for m in v["mismatches"])
    return (
        f"verify: FAILED, {len(v['mismatches'])} of {v['files']} files do not match the manifest: {problems}"
    )
