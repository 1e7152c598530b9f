"""Quantized linear layers that dequantize their weight just before a float matmul.

MLX's `quantized_matmul` on CUDA is 3-4x slower than a bf16 matmul at FLUX's shapes, while dequantizing
then multiplying costs 1.2-1.6x. From `Tuning.dequantize_min_rows` rows on, a layer does that; memory
stays quantized (the float weight is a temporary of the call). 8-bit affine weights dequantize through
one compiled elementwise graph (`dequantize_fused`, 16 bytes written a thread against MLX's 2), which
the warm-up's children build; others through `mx.dequantize`. Both give the same bits.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from mflux.runtime.cuda import tuning


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose call dequantizes the weight first when the input has >= `min_rows` rows."""

    min_rows: int | None = None
    fused: bool = False  # 8-bit affine weights through `dequantize_fused`

    @classmethod
    def wrap(cls, layer: nn.QuantizedLinear, min_rows: int | None) -> "QuantizedLinear":
        """The same arrays (no copy) in this class; `min_rows=None` always takes `quantized_matmul`."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
        for k, v in layer.items():
            new[k] = v
        new.min_rows = min_rows
        new.freeze()
        return new

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        if self.min_rows is None or rows < self.min_rows:
            return super().__call__(x)
        # Tied to x, the float weight is computed just before this matmul; otherwise mx.compile merges it
        # with a checkpointed block's recomputation and every float weight lives through a training step.
        weight = mx.depends(self["weight"], x)
        s, b = self["scales"], self.get("biases")
        if self.fused and fused_applies(self, x.dtype):
            w = mx.stop_gradient(dequantize_fused(weight, s, b, self.group_size))  # frozen: no vjp needed
        else:
            w = mx.dequantize(
                weight, s, b, group_size=self.group_size, bits=self.bits, mode=self.mode, dtype=x.dtype
            )
        # the bias in the matmul's epilogue, as nn.Linear does (a separate add is one more pass)
        return mx.addmm(self["bias"], x, w.T) if "bias" in self else x @ w.T


def choose_matmul(model: nn.Module, min_rows: int | None, fused: bool = False) -> nn.Module:
    """Set every quantized linear layer of `model` to dequantize from `min_rows` rows (None: never), 8-bit
    weights through the compiled graph where `fused`."""

    def swap(_, m):
        if isinstance(m, nn.QuantizedLinear) and not isinstance(m, QuantizedLinear):
            m = QuantizedLinear.wrap(m, min_rows)
        if isinstance(m, QuantizedLinear):
            m.min_rows, m.fused = min_rows, fused
        return m

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def use_backend_matmul(model: nn.Module) -> nn.Module:
    """The tuning's choice; where it dequantizes from no row count the model is left as it is. A model
    marked `jit_free` (the text encoders run before the warm-up's children built anything) keeps
    `mx.dequantize`, a prebuilt kernel: the fused graph's build made a fresh first encoding 6.9 s."""
    t = tuning()
    if t.dequantize_min_rows is None:
        return model
    fused = t.fused_dequantize and not getattr(model, "jit_free", False)
    return choose_matmul(model, t.dequantize_min_rows, fused)


def fused_applies(layer: nn.QuantizedLinear, dtype) -> bool:
    """Whether `dequantize_fused` handles this layer: affine 8 bits, with biases, into the scales' dtype."""
    return layer.mode == "affine" and layer.bits == 8 and "biases" in layer and layer["scales"].dtype == dtype


@mx.compile
def _scale_bytes(q: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    return q.astype(scales.dtype) * scales + biases


def dequantize_fused(w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """`mx.dequantize` of affine 8-bit weights as one compiled elementwise graph. The packed words read
    as bytes (rows, groups, group_size) are the weights in order (MLX packs from the low byte up); the
    last axis is a whole group, on which only the weight varies, so the fused kernel writes 16 bytes a
    thread."""
    rows = w.shape[0]
    groups = scales.shape[-1]
    q = mx.view(w, mx.uint8).reshape(rows, groups, group_size)
    return _scale_bytes(q, scales[..., None], biases[..., None]).reshape(rows, groups * group_size)
