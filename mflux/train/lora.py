"""Trainable LoRAs on the runtime's fused layers: one independent (A, B) pair per diffusers/PEFT module,
as PEFT trains them, saved under PEFT's names.

diffusers' `attn.to_k` of a double block is the middle third of the runtime's `img_attn.qkv`, and a
single block's `attn.to_q`/`to_k`/`to_v` are row slices of `linear1`. The pairs on one fused layer run
as the runtime's LoRA path does (`mflux.runtime.lora`): y = base(x) + (x @ A) @ B, with A the pairs'
A side by side and B block-structured (pair i feeds only its own rows), scaled by alpha / rank.
"""

import json
import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mflux.errors import InvalidArgument
from mflux.runtime.lora import base_getattr, find_layer, layer_dims, replace_layer, resolve, site_rows

# diffusers' train_dreambooth_lora_flux.py trains these by default (its --lora_layers).
DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")
TARGET_GROUPS = {
    "attn": DEFAULT_TARGETS,
    "mlp": ("ff.net.0.proj", "ff.net.2", "proj_mlp"),
    "text": (
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ),
    "linear2": ("proj_out",),
}
_BLOCKS = (("transformer_blocks", "depth"), ("single_transformer_blocks", "depth_single_blocks"))


def target_leaves(targets: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """diffusers module leaves for `--targets`: groups (attn, mlp, text, linear2) and/or leaves."""
    if targets is None:
        return list(DEFAULT_TARGETS)
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    leaves: list[str] = []
    known = {leaf for group in TARGET_GROUPS.values() for leaf in group}
    for item in (t.strip() for t in items):
        if item in TARGET_GROUPS:
            leaves += [leaf for leaf in TARGET_GROUPS[item] if leaf not in leaves]
        elif item in known:
            leaves += [item] if item not in leaves else []
        else:
            raise InvalidArgument(
                f"unknown LoRA target {item!r} (choose groups {', '.join(TARGET_GROUPS)} "
                f"or diffusers module names such as {', '.join(sorted(known)[:4])})"
            )
    if not leaves:
        raise InvalidArgument("--targets is empty (the default is attn: to_q, to_k, to_v, to_out.0)")
    return leaves


def target_modules(params, leaves: list[str]) -> list[str]:
    """Every diffusers module name of the transformer's blocks that ends in one of `leaves`, as PEFT
    matches its target_modules (`single_transformer_blocks.3.attn.to_q`, ...)."""
    names = []
    for block, depth in _BLOCKS:
        for i in range(getattr(params, depth)):
            names += [f"{block}.{i}.{leaf}" for leaf in leaves if resolve(f"transformer.{block}.{i}.{leaf}")]
    return names


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]  # the diffusers modules, in row order
    rows: tuple[tuple[int, int], ...]  # (start, stop) output rows of each
    out_dims: int
    scale: float  # alpha / rank


class LoRAParts(nn.Module):
    """A frozen Linear or QuantizedLinear plus independent LoRAs on row slices of its output.

    lora_A[i] (rank, in) and lora_B[i] (rows_i, rank) are PEFT's lora_A/lora_B weights of module i."""

    def __init__(
        self, base: nn.Module, names: list[str], rows: list[tuple[int, int]], rank: int, alpha: float
    ):
        super().__init__()
        out_dims, in_dims, _ = layer_dims(base)
        self.base = base
        self.layout = Layout(tuple(names), tuple(rows), out_dims, alpha / rank)  # not a parameter
        bound = 1 / math.sqrt(in_dims)  # PEFT's init: kaiming_uniform(a=sqrt(5)) for A, zeros for B
        self.lora_A = [mx.random.uniform(-bound, bound, (rank, in_dims)) for _ in names]
        self.lora_B = [mx.zeros((stop - start, rank)) for start, stop in rows]

    __getattr__ = base_getattr  # the model reads a layer's weight or bias for its dtype: the base layer's

    def up(self, dtype: mx.Dtype) -> mx.array:
        """(P*rank, out): the B's block-structured, zero on rows no module covers, times alpha / rank."""
        lay = self.layout
        cols = [
            mx.pad(b.T * lay.scale, [(0, 0), (start, lay.out_dims - stop)])  # (rank, out)
            for (start, stop), b in zip(lay.rows, self.lora_B)
        ]
        return mx.concatenate(cols, axis=0).astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        down = mx.concatenate(self.lora_A, axis=0).T.astype(y.dtype)  # (in, P*rank)
        # the path runs in the activations' dtype, the trained weights stay float32 (as PEFT under autocast)
        return y + (x.astype(y.dtype) @ down) @ self.up(y.dtype)


def attach(flux: nn.Module, modules: list[str], rank: int, alpha: float) -> dict[str, LoRAParts]:
    """Put trainable LoRAs for the diffusers `modules` onto `flux`, freeze everything else, and return
    {runtime layer path: LoRAParts}. A's are drawn from MLX's global random state."""
    if rank <= 0:
        raise InvalidArgument(f"--rank must be a positive integer, got {rank}")
    by_layer: dict[str, list] = {}
    for name in modules:
        site, _ = resolve(f"transformer.{name}")
        by_layer.setdefault(site.path, []).append((name, site.part))
    flux.freeze()
    layers = {}
    for path, parts in by_layer.items():
        base = find_layer(flux, path)
        out_dims, in_dims, _ = layer_dims(base)
        rows = [site_rows(part, in_dims, out_dims) for _, part in parts]
        order = sorted(range(len(parts)), key=lambda i: rows[i])
        layer = LoRAParts(base, [parts[i][0] for i in order], [rows[i] for i in order], rank, alpha)
        layer.unfreeze(keys=["lora_A", "lora_B"], recurse=False)
        replace_layer(flux, path, layer)
        layers[path] = layer
    mx.eval(flux.trainable_parameters())
    return layers


def peft_tensors(layers: dict[str, LoRAParts]) -> dict[str, mx.array]:
    """The LoRA under diffusers/PEFT names: transformer.<module>.lora_A.weight (rank, in), .lora_B.weight."""
    out = {}
    for layer in layers.values():
        for name, a, b in zip(layer.layout.names, layer.lora_A, layer.lora_B):
            out[f"transformer.{name}.lora_A.weight"] = a
            out[f"transformer.{name}.lora_B.weight"] = b
    return out


def peft_metadata(modules: list[str], rank: int, alpha: float, extra: dict) -> dict[str, str]:
    """safetensors metadata: PEFT's LoraConfig under `lora_adapter_metadata`, as diffusers'
    save_lora_weights writes it (load_lora_weights reads alpha from there), plus mflux's own keys."""
    config = {
        "transformer.r": rank,
        "transformer.lora_alpha": alpha,
        "transformer.target_modules": modules,
        "transformer.rank_pattern": {},
        "transformer.alpha_pattern": {},
        "transformer.use_dora": False,
        "transformer.use_rslora": False,
        "transformer.lora_bias": False,
    }
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config), **extra}
