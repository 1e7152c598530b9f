"""LoRA: read the FLUX.1 LoRAs people share and add them to the runtime's layers.

Formats, recognised from the keys (a file may mix them):
- diffusers/PEFT: `transformer.transformer_blocks.N.attn.to_q.lora_A.weight`, `text_encoder.text_model.…`,
  alpha from `.alpha` keys or the `lora_adapter_metadata` json (PEFT's `lora_alpha`, `alpha_pattern`).
- kohya/sd-scripts: `lora_unet_double_blocks_N_img_attn_qkv.lora_down.weight`, `.lora_up`, `.alpha`;
  `lora_te1_…` for CLIP, `lora_te2_…` for T5, `lora_transformer_…` (kohya names of diffusers modules),
  and `lora_down.N`/`lora_up.N` parts of a fused layer.
- XLabs: `double_blocks.N.processor.qkv_lora1.down.weight` (image stream; `…2` text), `proj_lora1/2`.
- BFL/ComfyUI: `diffusion_model.double_blocks.N.img_attn.qkv.lora_A.weight`, or bare BFL names.

Every module lands on a runtime layer (BFL names, fused q/k/v), possibly on a row slice of it: a LoRA on
diffusers' `to_k` updates the middle third of `img_attn.qkv`. All the LoRAs on one layer become one extra
low-rank path beside it, y = base(x) + (x @ A) @ B, with A (in, R) the ranks side by side and B (R, out)
block-structured, scaled by alpha/rank and the user's scale, in the runtime dtype. The base may be
nn.Linear or nn.QuantizedLinear; it is never modified.

Runtime `-q` keeps this separate path rather than folding the LoRA into the float weights before
quantizing; test_quantized_separate_path_against_fold measures both on the tiny model at 4 bits (group 64),
rank 16 on every block layer, as the relative error of the LoRA's effect on the transformer's output
(with LoRA minus without, against float32):
- update 52% of the weights' norm: separate 0.148, fold 0.247 (the path itself is exact; what remains
  is the 4-bit base changing the activations the update acts on);
- update 5% of the weights' norm (a typical LoRA): separate 0.149, fold 1.62. Folding re-rounds every
  weight, and that noise outweighs the update: the reference project's "LoRA has no effect" bug.
The whole output's error is the same either way (0.093, the 4-bit base's own). Folding is faster only
where the rank is large against the width: the tiny model's step took 180 ms folded and 220-310 ms with
the path (rank 16 on width 64 adds a third of the multiply-adds). At the real width the path is noise:
a 3072x9216 4-bit layer took 406 ms for 16 tokens on the CPU, its rank-16 path 1.1 ms (0.3%); r·(in + out)
against in·out is 0.7%. A stored quantized model has no float weights left, so there the path is the only
exact choice anyway.

Control LoRAs (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora) turn dev into a control model, as diffusers'
FluxLoraLoaderMixin.load_lora_weights does:
- their `img_in` (diffusers' `x_embedder`) LoRA is 128 inputs wide: dev's `img_in` is widened to 128 inputs,
  the new columns zero, so the control image's latents join as extra channels (`control_width` tells such
  a file from its header). A quantized `img_in` is dequantized and stays float once widened, as diffusers'
  expanded layer does: it is 0.4M weights, and a float layer keeps dev's own columns as they were.
  Another LoRA on the widened `img_in` gets its down weight zero-padded to the new width.
- a bias on each up half (`lora_B.bias`, PEFT's `lora_bias`), scaled with the update (any LoRA may have it);
- full replacement weights for the q/k norms (`norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`; BFL's
  `query_norm.scale`, `key_norm.scale`): loaded as they are, not scaled by the LoRA scale. mflux has no
  unload: a model's LoRAs are fixed when it opens, and reloading the transformer reads dev's norms again.
"""

import functools
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mflux.converters.diffusers import (
    DOUBLE_BLOCK_MODULES,
    GUIDANCE_MODULES,
    SINGLE_BLOCK_MODULES,
    TOP_MODULES,
)
from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime.weights import _DTYPES, SafetensorsFile

LORA_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
_SHOWN = 5  # bad keys named in an error or warning

# key = <module>.<role>[.<part>].weight, or <module>.alpha
_WEIGHT = re.compile(
    r"^(?P<module>.+)\.(?P<role>lora_A|lora_B|lora_down|lora_up|down|up)(?:\.(?P<part>\d+))?\.weight$"
)
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_BIAS = re.compile(r"^(?P<module>.+)\.(?:lora_B|lora_up)\.bias$")  # PEFT's lora_bias: Control LoRAs have it
_DOWN = ("lora_A", "lora_down", "down")
_XLABS = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)$")
_XLABS_LAYERS = {
    "double_blocks": {
        "qkv_lora1": "img_attn.qkv",
        "qkv_lora2": "txt_attn.qkv",
        "proj_lora1": "img_attn.proj",
        "proj_lora2": "txt_attn.proj",
    },
    # XLabs' single-block qkv LoRA covers q, k and v of linear1, not its MLP rows.
    "single_blocks": {"qkv_lora": ("linear1", "qkv"), "proj_lora": "linear2"},
}

# Rows of a fused layer a part covers, in units of the hidden width (the layer's input width).
# None is the whole layer; "swapped" is the whole layer with its halves swapped (see _SCHEMES).
_PART_ROWS = {"q": (0, 1), "k": (1, 2), "v": (2, 3), "qkv": (0, 3), "mlp": (3, None)}


def _parts(table: dict) -> dict[str, tuple[str, str | None]]:
    # diffusers leaf -> (BFL leaf, part): a tuple of diffusers leaves is one fused layer's q, k, v[, mlp]
    out = {}
    for src, dst in table.items():
        if dst.endswith("_norm"):
            continue  # RMSNorm scales; no LoRA targets them
        if isinstance(src, tuple):
            out.update({s: (dst, p) for s, p in zip(src, ("q", "k", "v", "mlp"))})
        else:
            out[src] = (dst, None)
    return out


def _same(names) -> dict[str, tuple[str, None]]:
    return {n: (n, None) for n in names}


# A naming scheme: (component, {source block list: (runtime block list, leaves)}, top-level leaves).
_DIFFUSERS_TOP = _parts({**TOP_MODULES, **GUIDANCE_MODULES}) | {
    "norm_out.linear": (TOP_MODULES["norm_out.linear"], "swapped")
}
_CLIP_LEAVES = _same(f"self_attn.{p}_proj" for p in "qkv") | _same(
    ["self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
)
_T5_LEAVES = _same(f"layer.0.SelfAttention.{p}" for p in "qkvo") | _same(
    f"layer.1.DenseReluDense.{p}" for p in ("wi", "wi_0", "wi_1", "wo")
)
_SCHEMES = {
    "bfl": (
        "transformer",
        {
            "double_blocks": (
                "double_blocks",
                _same({dst for dst, _ in _parts(DOUBLE_BLOCK_MODULES).values()}),
            ),
            "single_blocks": (
                "single_blocks",
                _same({dst for dst, _ in _parts(SINGLE_BLOCK_MODULES).values()}),
            ),
        },
        _same(d for d, _ in _DIFFUSERS_TOP.values()),
    ),
    "diffusers": (
        "transformer",
        {
            "transformer_blocks": ("double_blocks", _parts(DOUBLE_BLOCK_MODULES)),
            "single_transformer_blocks": ("single_blocks", _parts(SINGLE_BLOCK_MODULES)),
        },
        _DIFFUSERS_TOP,
    ),
    "clip": (
        "text_encoder",
        {
            "text_model.encoder.layers": ("text_model.encoder.layers", _CLIP_LEAVES),
            "encoder.layers": ("text_model.encoder.layers", _CLIP_LEAVES),  # transformers 5 drops text_model.
        },
        {},
    ),
    "t5": ("text_encoder_2", {"encoder.block": ("encoder.block", _T5_LEAVES)}, {}),
}

# (key prefix, file format, scheme, separator between name parts); the first prefix that resolves wins.
_PREFIXES = (
    ("transformer.", "diffusers", "diffusers", "."),
    ("text_encoder.", "diffusers", "clip", "."),
    ("text_encoder_2.", "diffusers", "t5", "."),
    ("base_model.model.", "diffusers", "diffusers", "."),
    ("lora_unet_", "kohya", "bfl", "_"),
    ("lora_transformer_", "kohya", "diffusers", "_"),
    ("lora_te1_", "kohya", "clip", "_"),
    ("lora_te_", "kohya", "clip", "_"),
    ("lora_te2_", "kohya", "t5", "_"),
    ("diffusion_model.", "bfl", "bfl", "."),
    ("text_encoders.clip_l.transformer.", "bfl", "clip", "."),
    ("", "bfl", "bfl", "."),
    ("", "diffusers", "diffusers", "."),
)


@dataclass(frozen=True)
class Site:
    """Where one LoRA module lands: a runtime layer, or a row slice of a fused one."""

    component: str
    path: str  # e.g. double_blocks.0.img_attn.qkv
    part: str | None = None  # q, k, v, qkv, mlp, swapped, or None for the whole layer


@dataclass
class LoraModule:
    """One low-rank update as a file stores it: tensor names only, read on demand."""

    key: str  # the file's module name
    format: str
    site: Site
    down: list[str]  # (r, in) each; several are a kohya split layer's parts
    up: list[str]  # (rows, r) each
    alpha: str | None = None
    tensors: list[str] = field(default_factory=list)  # every key of the module, for reports
    bias: str | None = None  # (rows,): the up half's bias (PEFT's lora_bias), scaled as the update


@dataclass
class LoraFile:
    path: Path
    file: SafetensorsFile
    modules: list[LoraModule]
    unmatched: list[str]  # tensor keys that fit no FLUX.1 layer
    norms: dict[str, str] = field(default_factory=dict)  # a Control LoRA's norms: runtime path -> key

    @property
    def format(self) -> str:
        formats = sorted({m.format for m in self.modules})
        return "+".join(formats) if formats else "unknown"


def base_getattr(layer: nn.Module, key: str):
    """`__getattr__` of a layer wrapping `base`: its own members, else the base's (the model reads a
    layer's weight or scales for its dtype)."""
    if key in layer:
        return layer[key]
    if "base" in layer:
        return getattr(layer["base"], key)
    raise AttributeError(key)


class LoRALinear(nn.Module):
    """A Linear or QuantizedLinear plus one low-rank path: base(x) + (x @ lora_down) @ lora_up [+ lora_bias]."""

    def __init__(self, base: nn.Module, down: mx.array, up: mx.array, bias: mx.array | None = None):
        super().__init__()
        self.base = base
        self.lora_down = down  # (in, R)
        self.lora_up = up  # (R, out)
        if bias is not None:
            self.lora_bias = bias  # (out,): the up halves' biases (PEFT's lora_bias), scaled

    __getattr__ = base_getattr

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x) + (x @ self.lora_down) @ self.lora_up  # (..., out)
        return y + self.lora_bias if "lora_bias" in self else y


def resolve(key: str) -> tuple[Site, str] | None:
    """(Site, format) of a LoRA module name, or None when it names no FLUX.1 layer."""
    m = _XLABS.match(key)
    if m:
        layer = _XLABS_LAYERS[m[1]].get(m[3])
        if layer is None:
            return None
        path, part = layer if isinstance(layer, tuple) else (layer, None)
        return Site("transformer", f"{m[1]}.{m[2]}.{path}", part), "xlabs"
    for prefix, fmt, scheme, sep in _PREFIXES:
        if key.startswith(prefix):
            hit = _lookup(scheme, sep, key[len(prefix) :])
            if hit:
                return hit, fmt
    return None


def _lookup(scheme: str, sep: str, name: str) -> Site | None:
    component, blocks, top = _tables(scheme, sep)
    for pattern, block, leaves in blocks:
        m = pattern.fullmatch(name)
        if m and m[2] in leaves:
            leaf, part = leaves[m[2]]
            return Site(component, f"{block}.{m[1]}.{leaf}", part)
    if name in top:
        return Site(component, *top[name])
    return None


@functools.cache
def _tables(scheme: str, sep: str):
    # kohya writes module names with every "." as "_"; the leaf tables are rewritten the same way
    component, blocks, top = _SCHEMES[scheme]
    s = lambda name: name.replace(".", sep)  # noqa: E731
    patterns = [
        (
            re.compile(rf"{re.escape(s(src))}{re.escape(sep)}(\d+){re.escape(sep)}(.+)"),
            dst,
            {s(k): v for k, v in leaves.items()},
        )
        for src, (dst, leaves) in blocks.items()
    ]
    return component, patterns, {s(k): v for k, v in top.items()}


def open_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file's header and map its modules onto the runtime's layers (no tensor data).

    Raises MfluxError for a pickle file, a module missing its down or up half, or ranks that differ."""
    sf = SafetensorsFile(path)  # refuses .ckpt/.pt/.bin without unpickling
    if not sf.keys():
        raise MfluxError(f"{sf.path}: the file holds no tensors (is it a LoRA?)")
    groups: dict[str, dict] = {}
    unmatched = []
    norms = {}
    for k in sf.keys():
        if norm := norm_path(k):
            norms[norm] = k
            continue
        if m := _WEIGHT.match(k):
            g = groups.setdefault(m["module"], _group())
            g["down" if m["role"] in _DOWN else "up"][int(m["part"] or 0)] = k
        elif m := _ALPHA.match(k):
            g = groups.setdefault(m["module"], _group())
            g["alpha"] = k
        elif m := _BIAS.match(k):
            g = groups.setdefault(m["module"], _group())
            g["bias"] = k
        else:
            unmatched.append(k)  # DoRA scales, LoKr/LoHa factors, norm diffs: not LoRA layers
            continue
        g["keys"].append(k)
    modules = []
    for name, g in groups.items():
        hit = resolve(name)
        if hit is None:
            unmatched += g["keys"]
            continue
        modules.append(_module(sf, name, g, *hit))
    return LoraFile(sf.path, sf, modules, unmatched, norms)


# A Control LoRA's replacement norms, in diffusers' names (diffusers' _control_lora_supported_norm_keys)
# or BFL's, each to its runtime RMSNorm scale.
_NORM_DIFFUSERS = re.compile(
    r"^(?:transformer\.)?(transformer_blocks|single_transformer_blocks)\.(\d+)\."
    r"(attn\.norm_(?:q|k|added_q|added_k))\.weight$"
)
_NORM_BFL = re.compile(
    r"^(?:diffusion_model\.)?((?:double_blocks\.\d+\.(?:img|txt)_attn|single_blocks\.\d+)"
    r"\.norm\.(?:query|key)_norm\.scale)$"
)


def norm_path(key: str) -> str | None:
    """The runtime path of the RMSNorm scale a Control LoRA's norm key replaces, or None."""
    if m := _NORM_BFL.match(key):
        return m[1]
    if m := _NORM_DIFFUSERS.match(key):
        blocks = DOUBLE_BLOCK_MODULES if m[1] == "transformer_blocks" else SINGLE_BLOCK_MODULES
        block = "double_blocks" if m[1] == "transformer_blocks" else "single_blocks"
        leaf = blocks.get(m[3])
        return f"{block}.{m[2]}.{leaf}.scale" if leaf else None
    return None


def control_width(path: str | Path) -> int | None:
    """The input width a LoRA's `img_in` (`x_embedder`) module takes, from the file's header: 128 for a
    Control LoRA; None where the file has no such module."""
    lora = open_lora(path)
    lora.file.close()
    return img_in_width(lora)


def img_in_width(lora: LoraFile) -> int | None:
    """`control_width` of an opened LoRA file (its header only)."""
    downs = [m.down[0] for m in lora.modules if m.site == Site("transformer", "img_in")]
    return max((lora.file.tensors[k][1][1] for k in downs), default=None)


def _group() -> dict:
    return {"down": {}, "up": {}, "alpha": None, "bias": None, "keys": []}


def _module(sf: SafetensorsFile, name: str, g: dict, site: Site, fmt: str) -> LoraModule:
    if sorted(g["down"]) != sorted(g["up"]):
        missing = "up (lora_B)" if len(g["up"]) < len(g["down"]) else "down (lora_A)"
        raise MfluxError(f"{sf.path}: LoRA module {name} has no {missing} weight (the file is incomplete)")
    down = [g["down"][i] for i in sorted(g["down"])]
    up = [g["up"][i] for i in sorted(g["up"])]
    for d, u in zip(down, up):
        ds, us = sf.tensors[d][1], sf.tensors[u][1]
        if len(ds) != 2 or len(us) != 2 or ds[0] != us[1]:
            raise MfluxError(
                f"{sf.path}: {d} {tuple(ds)} and {u} {tuple(us)} are not a LoRA pair "
                "(expected down (rank, in) and up (out, rank))"
            )
    if g["alpha"] is not None:
        dtype, shape, _ = sf.tensors[g["alpha"]]
        if math.prod(shape) != 1 or dtype not in ("F64", "F32", "F16", "BF16", "I64", "I32"):
            raise MfluxError(
                f"{sf.path}: {g['alpha']} is a {dtype} tensor of shape {tuple(shape)}, not a number "
                "(a LoRA's alpha is one scalar; the file is malformed)"
            )
    if g["bias"] is not None and tuple(sf.tensors[g["bias"]][1]) != (sum(sf.tensors[u][1][0] for u in up),):
        raise MfluxError(
            f"{sf.path}: {g['bias']} {tuple(sf.tensors[g['bias']][1])} is not the bias of {up[0]} "
            "(expected one value per output row; the file is malformed)"
        )
    return LoraModule(name, fmt, site, down, up, g["alpha"], g["keys"], g["bias"])


def _peft_alphas(lora: LoraFile) -> dict[str, dict]:
    # diffusers' metadata: {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": …}
    raw = lora.file.metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise MfluxError(f"{lora.path}: lora_adapter_metadata is not valid json") from None
    if not isinstance(meta, dict):
        raise MfluxError(f"{lora.path}: lora_adapter_metadata is not a JSON object (the file is malformed)")
    out: dict[str, dict] = {}
    for k, v in meta.items():
        prefix, _, name = k.partition(".")
        out.setdefault(prefix, {})[name] = v
    for prefix, cfg in out.items():
        _check_peft(lora.path, prefix, cfg)
    return out


def _check_peft(path: Path, prefix: str, cfg: dict) -> None:
    # The values _scale reads: numbers where PEFT writes numbers, a table of them for alpha_pattern.
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    pattern = cfg.get("alpha_pattern")
    bad = [k for k in ("lora_alpha", "r") if k in cfg and not number(cfg[k])]
    if pattern is not None and not (isinstance(pattern, dict) and all(map(number, pattern.values()))):
        bad.append("alpha_pattern")
    for key in pattern if isinstance(pattern, dict) else ():
        try:
            re.compile(key)
        except re.error:
            raise MfluxError(
                f"{path}: lora_adapter_metadata alpha_pattern {key!r} is not a pattern"
            ) from None
    if bad:
        raise MfluxError(
            f"{path}: lora_adapter_metadata {prefix}.{bad[0]} is {cfg[bad[0]]!r}, not a number"
            f"{' table' if bad[0] == 'alpha_pattern' else ''} (the file is malformed)"
        )


def _scale(lora: LoraFile, m: LoraModule, rank: int, peft: dict) -> tuple[float, float | None]:
    """(alpha / rank, alpha) of a module; no alpha anywhere means scale 1, as every trainer writes."""
    if m.alpha is not None:
        alpha = lora.file.load(m.alpha).astype(mx.float32).item()
        return alpha / rank, alpha
    prefix, _, name = m.key.partition(".")
    cfg = peft.get(prefix) if m.format == "diffusers" else None
    if not cfg:
        return 1.0, None
    alpha = float(cfg.get("lora_alpha", 8))  # PEFT's LoraConfig default
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", name):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank), alpha


def _weights(lora: LoraFile, m: LoraModule, peft: dict) -> tuple[mx.array, mx.array, mx.array | None]:
    """(down (R, in), up (rows, R), bias (rows,) or None) in float32, alpha/rank folded into up and bias;
    split parts block-diagonal."""
    downs = [lora.file.load(k).astype(mx.float32) for k in m.down]
    ups = [lora.file.load(k).astype(mx.float32) for k in m.up]
    scale, _ = _scale(lora, m, downs[0].shape[0], peft)
    if len(ups) > 1:  # kohya's split q/k/v[/mlp]: part i of the rank feeds rows i only
        ranks = [d.shape[0] for d in downs]
        ups = [mx.pad(u, [(0, 0), (sum(ranks[:i]), sum(ranks[i + 1 :]))]) for i, u in enumerate(ups)]
    bias = lora.file.load(m.bias).astype(mx.float32) * scale if m.bias is not None else None
    return mx.concatenate(downs, axis=0), mx.concatenate(ups, axis=0) * scale, bias


def apply_loras(modules: dict[str, nn.Module], paths: list[str], scales: list[float]) -> None:
    """Add the LoRAs in `paths`, each weighted by its scale, to the loaded components in `modules`.

    Modules for components not in `modules` are left for a later call (Flux1 loads the text encoders
    lazily). Raises MfluxError for a file of another architecture, a shape or rank mismatch, or a
    pickle file; warns when only part of a file fits this model."""
    if len(paths) != len(scales):
        raise InvalidArgument(
            f"got {len(paths)} LoRA paths but {len(scales)} scales; give one scale per LoRA"
        )
    loras = [open_lora(p) for p in paths]
    try:
        for lora in loras:
            _check_fit(lora, modules)
        for component, root in modules.items():
            _apply(component, root, loras, scales)
    finally:
        for lora in loras:
            lora.file.close()


def _apply(component: str, root: nn.Module, loras: list[LoraFile], scales: list[float]) -> None:
    updates: dict[str, list] = {}  # layer -> every (file, module, PEFT alphas, user scale) on it
    for lora, s in zip(loras, scales):
        peft = _peft_alphas(lora)
        for m in lora.modules:
            if m.site.component == component and find_layer(root, m.site.path) is not None:
                updates.setdefault(m.site.path, []).append((lora, m, peft, float(s)))
    widened = _widen(root, updates) if component == "transformer" else set()
    if component == "transformer":
        _replace_norms(root, loras)
    for path, parts in updates.items():
        layer = _with_lora(find_layer(root, path), parts, component, path in widened)
        mx.eval([v for k, v in layer.items() if k.startswith("lora_")])
        replace_layer(root, path, layer)


def _widen(root: nn.Module, updates: dict[str, list]) -> set[str]:
    """Widen `img_in` to the input width of a Control LoRA's module on it (new columns zero), as diffusers'
    _maybe_expand_transformer_param_shape_or_error_; the paths widened."""
    widened = set()
    for path, parts in updates.items():
        if path != "img_in":  # the only layer a Control LoRA widens: its input is the packed channels
            continue
        layer = find_layer(root, path)
        want = max(lora.file.tensors[m.down[0]][1][1] for lora, m, _, _ in parts)
        out_dims, in_dims, dtype = layer_dims(layer)
        if want <= in_dims:
            continue
        weight = layer.weight
        if isinstance(layer, nn.QuantizedLinear):  # kept float once widened (the docstring says why)
            weight = mx.dequantize(
                weight, layer.scales, layer.get("biases"), layer.group_size, layer.bits, mode=layer.mode
            )
        wide = nn.Linear(want, out_dims, bias="bias" in layer)
        wide.weight = mx.pad(weight.astype(dtype), [(0, 0), (0, want - in_dims)])  # (out, want)
        if "bias" in layer:
            wide.bias = layer.bias
        mx.eval(wide.parameters())
        replace_layer(root, path, wide)
        root.params.in_channels = want  # the packed channels the transformer now takes
        widened.add(path)
    return widened


def _replace_norms(root: nn.Module, loras: list[LoraFile]) -> None:
    """A Control LoRA's q/k norms replace the model's, unscaled (a later file's win, as in diffusers)."""
    for lora in loras:
        for path, key in lora.norms.items():
            *parents, leaf = path.split(".")
            node = _node(root, parents)
            old = node.get(leaf) if isinstance(node, nn.Module) else None
            value = lora.file.load(key)
            if old is None or value.shape != old.shape:
                raise MfluxError(
                    f"{lora.path}: {key} {tuple(value.shape)} replaces transformer norm {path}, which "
                    f"{'is ' + str(tuple(old.shape)) if old is not None else 'this model lacks'} "
                    "(a Control LoRA for another model size?)"
                )
            setattr(node, leaf, value.astype(old.dtype))
            mx.eval(getattr(node, leaf))


def _node(root: nn.Module, names: list[str]):
    """The module, list or array at a path of `root` (its names split), or None."""
    node = root
    for name in names:
        if isinstance(node, list):
            node = node[int(name)] if name.isdigit() and int(name) < len(node) else None
        elif isinstance(node, dict):
            node = node.get(name)
        else:
            return None
        if node is None:
            return None
    return node


def _check_fit(lora: LoraFile, modules: dict) -> None:
    # Modules of components not loaded yet count as fitting; they are checked when those load.
    fitting, missing = [], []
    for m in lora.modules:
        loaded = modules.get(m.site.component)
        (missing if loaded is not None and find_layer(loaded, m.site.path) is None else fitting).append(m)
    bad = lora.unmatched + [k for m in missing for k in m.tensors]
    if not bad:
        return
    total = len(lora.file.keys())
    shown = ", ".join(bad[:_SHOWN]) + (f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else "")
    if not any(m.site.component == "transformer" for m in fitting):
        raise MfluxError(
            f"{lora.path}: {len(bad)} of {total} tensors match no layer of this FLUX.1 model: {shown} "
            "(is it a LoRA for another model, such as SDXL, or for a FLUX.1 of another size?)"
        )
    warnings.warn(
        f"{lora.path}: {len(bad)} of {total} LoRA tensors match no layer of this FLUX.1 model and are "
        f"ignored ({len(fitting)} LoRA layers apply): {shown}",
        stacklevel=3,
    )


def find_layer(root: nn.Module, path: str) -> nn.Module | None:
    """The Linear, QuantizedLinear or LoRALinear at a dotted runtime path of `root`, or None."""
    node = _node(root, path.split("."))
    return node if isinstance(node, (nn.Linear, nn.QuantizedLinear, LoRALinear)) else None


def replace_layer(root: nn.Module, path: str, layer: nn.Module) -> None:
    """Put `layer` at a dotted runtime path of `root` (where find_layer found one)."""
    *parents, name = path.split(".")
    node = root
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(name)] = layer
    else:
        setattr(node, name, layer)


def layer_dims(layer: nn.Module) -> tuple[int, int, mx.Dtype]:
    """(out, in, compute dtype) of a Linear or QuantizedLinear."""
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0], layer.scales.shape[1] * layer.group_size, layer.scales.dtype
    return *layer.weight.shape, layer.weight.dtype


def _with_lora(layer: nn.Module, parts: list, component: str, widened: bool = False) -> LoRALinear:
    """The layer with one low-rank path holding every LoRA on it (and any it already had); on a layer a
    Control LoRA widened, a narrower down weight is zero-padded to the new width."""
    base = layer.base if isinstance(layer, LoRALinear) else layer
    out_dims, in_dims, dtype = layer_dims(base)
    downs, ups, biases = [], [], []
    if isinstance(layer, LoRALinear):
        downs.append(layer.lora_down.T.astype(mx.float32))
        ups.append(layer.lora_up.T.astype(mx.float32))
        if "lora_bias" in layer:
            biases.append(layer.lora_bias.astype(mx.float32))
    for lora, m, peft, user_scale in parts:
        down, up, bias = _weights(lora, m, peft)
        start, stop = site_rows(m.site.part, in_dims, out_dims)
        where = f"{lora.path}: {m.key} targets {component} layer {m.site.path}"
        if widened and down.shape[1] < in_dims:  # diffusers' _maybe_expand_lora_state_dict
            down = mx.pad(down, [(0, 0), (0, in_dims - down.shape[1])])
        if down.shape[1] != in_dims:
            raise MfluxError(
                f"{where}, whose input width is {in_dims}, but its down weight is {tuple(down.shape)}"
            )
        if up.shape[0] != stop - start:
            rows = (
                f"{stop - start} rows ({start}:{stop} of {out_dims})"
                if stop - start != out_dims
                else f"{out_dims} rows"
            )
            raise MfluxError(
                f"{where}, {rows}, but its up weight is {tuple(up.shape)} (a LoRA for another model size?)"
            )
        if m.site.part == "swapped":  # diffusers' final norm is (scale, shift); BFL's is (shift, scale)
            half = out_dims // 2
            up = mx.concatenate([up[half:], up[:half]], axis=0)
            bias = None if bias is None else mx.concatenate([bias[half:], bias[:half]])
        downs.append(down)
        ups.append(mx.pad(up * user_scale, [(start, out_dims - stop), (0, 0)]))  # (out, r)
        if bias is not None:
            biases.append(mx.pad(bias * user_scale, [(start, out_dims - stop)]))  # (out,)
    down = mx.concatenate(downs, axis=0)  # (R, in)
    up = mx.concatenate(ups, axis=1)  # (out, R)
    bias = sum(biases[1:], biases[0]).astype(dtype) if biases else None
    return LoRALinear(base, down.T.astype(dtype), up.T.astype(dtype), bias)


def site_rows(part: str | None, hidden: int, out_dims: int) -> tuple[int, int]:
    """(start, stop): the output rows a Site's part covers (q, k, v, qkv, mlp; None or swapped: all)."""
    if part is None or part == "swapped":
        return 0, out_dims
    lo, hi = _PART_ROWS[part]
    return lo * hidden, out_dims if hi is None else hi * hidden


def inspect_lora(path: str | Path, tensors: bool = False) -> dict:
    """Describe a LoRA file from its header: format, ranks, alphas, targets (layers per component) and
    parameter count, with a table row per component as `mflux inspect` shows models; `tensors` lists
    every tensor's name, shape and dtype."""
    lora = open_lora(path)
    sf = lora.file
    peft = _peft_alphas(lora)
    ranks, alphas, targets, modules, groups = set(), set(), {}, Counter(), {}
    for m in lora.modules:
        rank = sf.tensors[m.down[0]][1][0]
        ranks.add(rank)
        alphas.add(_scale(lora, m, rank, peft)[1])
        targets.setdefault(m.site.component, set()).add(m.site.path)
        modules[m.site.component] += 1
        groups.setdefault(m.site.component, []).extend(m.tensors)
    if lora.norms:  # a Control LoRA's replacement norms belong to the transformer too
        groups.setdefault("transformer", []).extend(lora.norms.values())
    if lora.unmatched:
        groups["unmatched"] = lora.unmatched
    counts = {c: len(targets[c]) for c in LORA_COMPONENTS if c in targets}
    components = {c: _summary(sf, groups[c], tensors) for c in (*LORA_COMPONENTS, "unmatched") if c in groups}
    alphas.discard(None)
    report = {
        "path": str(lora.path),
        "kind": "lora",
        "format": lora.format,
        "rank": _range(ranks),
        "alpha": _range(alphas) if alphas else "none (scale 1)",
        "targets": counts,  # runtime layers: to_q, to_k and to_v of a block share one fused qkv
        "modules": ", ".join(f"{c} {_modules_text(modules[c], n)}" for c, n in counts.items()) or "none",
        "parameters": sum(c["parameters"] for c in components.values()),
        "unmatched": len(lora.unmatched),
        "norms": len(lora.norms),  # full replacement norms (a Control LoRA's)
        "metadata": sf.metadata,
        "components": components,
    }
    report["total"] = {
        "parameters": report["parameters"],
        "bytes": sum(c["bytes"] for c in components.values()),
    }
    return report


def _modules_text(modules: int, layers: int) -> str:
    # what the file holds (its modules), and the runtime layers they land on where fused ones differ
    text = f"{modules} module{'s' if modules != 1 else ''}"
    return text if layers == modules else f"{text} on {layers} layer{'s' if layers != 1 else ''}"


def _summary(sf: SafetensorsFile, names: list[str], tensors: bool) -> dict:
    # the fields of a component in mflux.inspector's report, so `mflux inspect` draws its table
    params = sum(math.prod(sf.tensors[k][1]) for k in names)
    size = sum(end - begin for _, _, (begin, end) in (sf.tensors[k] for k in names))
    dtypes: dict[str, int] = {}
    for k in names:
        name = _DTYPES[sf.tensors[k][0]][1]
        dtypes[name] = dtypes.get(name, 0) + 1
    out = {
        "files": 1,
        "tensor_count": len(names),
        "parameters": params,
        "bytes": size,
        "dtypes": dict(sorted(dtypes.items())),
        "bits_per_weight": round(size * 8 / params, 3) if params else 0.0,
        "quantized_tensors": 0,
        "quantization": [],
    }
    if tensors:
        out["tensors"] = [
            {"name": k, "shape": list(sf.tensors[k][1]), "dtype": _DTYPES[sf.tensors[k][0]][1]}
            for k in sorted(names)
        ]
    return out


def _range(values: set) -> str:
    values = sorted(values)
    if not values:
        return "none"
    fmt = lambda v: f"{v:g}"  # noqa: E731
    return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])}-{fmt(values[-1])}"
