"""The FLUX.1 transformer: its sizes and the network, in Black Forest Labs' parameter names."""

from dataclasses import asdict, dataclass, fields

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mflux.converters import bfl
from mflux.errors import MfluxError
from mflux.runtime.layers import (
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    rope,
    timestep_embedding,
)

REAL_AXES_DIM = bfl.REAL_AXES_DIM  # the released rope split of a 128-wide head


@dataclass
class FluxParams:
    in_channels: int
    hidden_size: int
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: tuple[int, ...]
    context_in_dim: int
    vec_in_dim: int
    guidance_embed: bool
    theta: int = 10000
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    out_channels: int = 64  # the velocity's packed channels; Fill and Control take more in than out

    def __post_init__(self):
        self.axes_dim = tuple(int(d) for d in self.axes_dim)
        head_dim = self.hidden_size // self.num_heads
        if head_dim * self.num_heads != self.hidden_size:
            raise MfluxError(f"hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if sum(self.axes_dim) != head_dim or any(d % 2 for d in self.axes_dim):
            raise MfluxError(
                f"rope axes {self.axes_dim} must be even and sum to the head width {head_dim} "
                "(check axes_dims_rope in the transformer's config.json)"
            )

    @classmethod
    def from_diffusers_config(cls, d: dict) -> "FluxParams":
        """Sizes from a diffusers transformer/config.json; missing keys take diffusers' defaults."""
        in_channels = int(d.get("in_channels", 64))
        out_channels = int(d.get("out_channels") or in_channels)  # diffusers: None means in_channels
        if d.get("patch_size", 1) != 1 or out_channels != 64:
            raise MfluxError(
                f"transformer config has patch_size {d.get('patch_size')} and out_channels "
                f"{out_channels}: only FLUX.1 layouts (patch size 1, 64 output channels) are supported"
            )
        heads = int(d.get("num_attention_heads", 24))
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            hidden_size=heads * int(d.get("attention_head_dim", 128)),
            num_heads=heads,
            depth=int(d.get("num_layers", 19)),
            depth_single_blocks=int(d.get("num_single_layers", 38)),
            axes_dim=tuple(d.get("axes_dims_rope", REAL_AXES_DIM)),
            context_in_dim=int(d.get("joint_attention_dim", 4096)),
            vec_in_dim=int(d.get("pooled_projection_dim", 768)),
            guidance_embed=bool(d.get("guidance_embeds", False)),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FluxParams":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> "FluxParams":
        """Sizes from the shapes of Black Forest Labs-named tensors (a single-file checkpoint)."""
        return cls(**bfl.params(shapes))


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        p = params
        self.img_in = nn.Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        if p.guidance_embed:
            self.guidance_in = MLPEmbedder(256, p.hidden_size)
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = [
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)
        ]
        self.single_blocks = [
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        ]
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        # A quantized layer's weight is packed integers and fp modes' scales are uint8; the bias is float.
        return self.txt_in.bias.dtype

    def conditioning(self, timesteps: mx.array, y: mx.array, guidance: mx.array | None = None) -> mx.array:
        """vec (B, hidden): the time, pooled-text and guidance conditioning every block modulates with."""
        self._require_modulation_weights()
        vec = self.time_in(self._embed(timesteps))
        if self.params.guidance_embed:
            if guidance is None:
                raise MfluxError("this FLUX.1 model is guidance-distilled (dev): pass a guidance scale")
            vec = vec + self.guidance_in(self._embed(guidance))
        return vec + self.vector_in(y.astype(self.dtype))

    def _embed(self, t: mx.array) -> mx.array:
        # The reference rounds sigma to the model dtype and scales it there before the float32
        # sinusoids; doing the same keeps bfloat16 runs equal to it.
        dtype = self.dtype
        return timestep_embedding(t.astype(dtype) * 1000).astype(dtype)

    def block_modulations(self, vec: mx.array, evaluate: bool = False) -> mx.array:
        """(B, K, hidden): every block's shift, 1 + scale and gate rows for vec (B, hidden), in block
        order, then the final layer's shift and 1 + scale (K = 12 per double block + 3 per single + 2).
        `evaluate` evaluates each block's rows as they are made, so that a quantized model dequantizes
        one block's layers at a time (MLX checks its memory limit only between batches of 20 kernels:
        in one graph, 20 dequantized layers, 2.3 GB, were held at once)."""
        mods = []
        for b in [*self.double_blocks, *self.single_blocks, self.final_layer]:
            mods.append(b.modulations(vec))
            if evaluate:
                mx.eval(mods[-1])
        return mx.concatenate(mods, axis=1)

    def modulations(
        self,
        timesteps: list[float] | mx.array,
        y: mx.array,
        guidance: mx.array | None = None,
        evaluate: bool = False,
    ) -> mx.array:
        """(N, B, K, hidden): `block_modulations` for each of N denoising steps at once.

        They depend only on the timestep, the pooled text y (B, vec_in) and guidance (B,), so one
        batched pass per generation replaces about 3.2B parameters of matrix-vector work per step
        (and the weights behind them can then be freed, see `free_modulation_weights`). `evaluate`:
        see `block_modulations`.
        """
        t = mx.array(timesteps, dtype=mx.float32)
        n, b = t.shape[0], y.shape[0]
        # step-major rows (N*B): broadcasts, where repeat and tile would be gathers, whose kernels MLX
        # builds at run time on CUDA (mflux.runtime.cuda.warmup)
        t = mx.broadcast_to(t[:, None], (n, b)).reshape(-1)
        y = mx.broadcast_to(y[None], (n, *y.shape)).reshape(n * b, -1)
        g = None if guidance is None else mx.broadcast_to(guidance[None], (n, b)).reshape(-1)
        mods = self.block_modulations(self.conditioning(t, y, g), evaluate)  # (N*B, K, hidden)
        return mods.reshape(n, b, *mods.shape[1:])

    def _modulation_layers(self) -> list[tuple[nn.Module, str]]:
        """(module, name) of the conditioning and modulation layers: what `modulations` reads."""
        layers = [(self, name) for name in ("time_in", "vector_in", "guidance_in")]
        layers += [(b, name) for b in self.double_blocks for name in ("img_mod", "txt_mod")]
        layers += [(b, "modulation") for b in self.single_blocks]
        return layers + [(self.final_layer, "adaLN_modulation")]

    def free_modulation_weights(self) -> None:
        """Drop the conditioning and modulation layers (about 3.2B parameters at full size). Afterwards
        only `predict` with precomputed modulations works; call it once they are computed."""
        for module, name in self._modulation_layers():
            module.pop(name, None)

    def modulations_train(self) -> bool:
        """Whether any conditioning or modulation layer has a trainable parameter (a LoRA on one)."""
        trainable = {}  # per module, its trainable parameters, by child name
        for module, name in self._modulation_layers():
            tree = trainable.setdefault(id(module), module.trainable_parameters())
            if tree_flatten(tree.get(name, {})):
                return True
        return False

    def _require_modulation_weights(self) -> None:
        if "time_in" not in self:
            raise MfluxError(
                "this transformer's modulation weights were freed; use precomputed modulations with "
                "predict(), or load the model again"
            )

    def positions(self, img_ids: mx.array, txt_ids: mx.array) -> tuple[mx.array, mx.array]:
        """The rotary tables for text then image tokens; ids (B, S, 3) and (B, L, 3)."""
        return rope(mx.concatenate([txt_ids, img_ids], axis=1), self.params.axes_dim, self.params.theta)

    def predict(
        self,
        img: mx.array,
        txt: mx.array,
        pe: tuple[mx.array, mx.array],
        mod: mx.array,
        sp=None,
        checkpoint: bool = False,
    ) -> mx.array:
        """The velocity (B, L, out_channels) for packed latents img (B, L, in_channels) and text
        txt (B, S, context), with pe from `positions` and mod (B, K, hidden) from `block_modulations`.
        With `sp` (a mflux.runtime.parallel.SequenceParallel) this rank computes its shard of the
        tokens and the result is the whole velocity, as without it. `checkpoint` recomputes each
        block's activations in the backward pass (training)."""
        dtype = self.dtype
        kv = None
        if sp is not None:
            img, txt, pe = sp.shard(img, txt, pe)
            kv = sp.gather_kv
        img = self.img_in(img.astype(dtype))  # (B, L, hidden)
        txt = self.txt_in(txt.astype(dtype))  # (B, S, hidden)
        mod = mod.astype(dtype)
        mod_grad = checkpoint and self.modulations_train()
        i = 0
        for block in self.double_blocks:
            img, txt = _forward(block, checkpoint, kv, mod_grad)(img, txt, mod[:, i : i + 12], pe)
            i += 12
        x = mx.concatenate([txt, img], axis=1)  # (B, S+L, hidden)
        for block in self.single_blocks:
            x = _forward(block, checkpoint, kv, mod_grad)(x, mod[:, i : i + 3], pe)
            i += 3
        out = self.final_layer.forward(x[:, txt.shape[1] :], mod[:, i:])  # (B, L, out_channels)
        return out if sp is None else sp.gather_image(out)

    def __call__(
        self,
        img: mx.array,
        img_ids: mx.array,
        txt: mx.array,
        txt_ids: mx.array,
        timesteps: mx.array,
        y: mx.array,
        guidance: mx.array | None = None,
    ) -> mx.array:
        mod = self.block_modulations(self.conditioning(timesteps, y, guidance))  # (B, K, hidden)
        return self.predict(img, txt, self.positions(img_ids, txt_ids), mod)


def _forward(block: nn.Module, checkpoint: bool, kv=None, mod_grad: bool = True):
    """block.forward (with the sequence-parallel `kv` gather, if any), or the same under mx.checkpoint:
    only the block's inputs are kept for the backward pass, which runs the block again (as mlx-lm's
    tuner checkpoints its layers). The block's call is (*activations, mod, pe).

    mx.checkpoint's backward computes a cotangent for every input it is given, needed or not. The rotary
    tables pe never need one (they come from integer positions), nor does mod unless `mod_grad` (some
    trainable parameter makes the modulations), so they are captured rather than passed (and rope's
    written-out backward, `layers._rotate_pairs`, then makes none for the tables)."""

    def forward(*args):
        return block.forward(*args, kv)

    if not checkpoint:
        return forward

    def checkpointed(*args):
        *xs, mod, pe = args
        inputs = (*xs, mod) if mod_grad else tuple(xs)

        def inner(params, *inputs):
            block.update(params)
            return forward(*inputs, pe) if mod_grad else forward(*inputs, mod, pe)

        return mx.checkpoint(inner)(block.trainable_parameters(), *inputs)

    return checkpointed
