"""Quantized linear layers that choose their matmul by backend and by how many rows they multiply.

MLX's `quantized_matmul` on CUDA is 3-4x slower than a bf16 matmul at FLUX's shapes (4352 tokens), while
`mx.dequantize` of the layer's weight followed by a float matmul costs 1.2-1.6x (issue 12, measured on
an H200). From `min_rows` rows on, a layer dequantizes its weight just before the matmul. Memory stays
quantized: the float weight is a temporary of that one call, never stored.

The choice is per backend (`MIN_ROWS`):
- CUDA: dequantize at every size (from 1 row). For one token the quantized matmul is 4% faster (0.098
  vs 0.102 ms), but FLUX multiplies single rows only in the modulations, once per generation, and MLX
  builds its quantized matmul kernels at run time on first use (tens of seconds each on a fresh
  machine: +104 s on the first 8-bit step). Never calling them keeps those builds out of a first run.
  `bench_flux.py --sections qmatmul` measures both paths from 1 row up, with each one's first call.
- Metal: unchanged (`quantized_matmul` always). No Mac was available to measure it.
- CPU: unchanged. On the 2 shared cores here, dequantize-then-matmul measured within 0-25% of the
  quantized matmul at 64-320 rows (noisy), not a clear enough gain to change the CPU's numbers.

On the backends whose entry is None, layers are left as MLX's own `nn.QuantizedLinear`.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

MIN_ROWS = {"cuda": 1, "metal": None, "cpu": None}


def backend() -> str:
    """ "cpu", "cuda" or "metal": the backend of MLX's default device."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    cuda = getattr(mx, "cuda", None)  # a build without CUDA may lack the module
    return "cuda" if cuda is not None and cuda.is_available() else "metal"


def default_min_rows() -> int | None:
    return MIN_ROWS[backend()]


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose call dequantizes the weight first when the input has >= `min_rows` rows."""

    min_rows: int | None = None

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
        # The float weight is made to depend on x, so that it is computed just before this call's
        # matmul. Otherwise it depends on constants alone, and mx.compile merges it with the same
        # layer's dequantize in a checkpointed block's recomputation (training): every layer's float
        # weight then lives from the forward pass to the backward one (issue 15: a q4 base's training
        # step at 512x512 peaked at 25.8 GB on the H200, the bf16 base's at 26.4 GB).
        w = mx.dequantize(
            mx.depends(self["weight"], x),
            self["scales"],
            self.get("biases"),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            dtype=x.dtype,
        )
        y = x @ w.T
        return y + self["bias"] if "bias" in self else y


def choose_matmul(model: nn.Module, min_rows: int | None) -> nn.Module:
    """Set every quantized linear layer of `model` to dequantize from `min_rows` rows (None: never)."""

    def swap(_, m):
        if isinstance(m, QuantizedLinear):
            m.min_rows = min_rows
            return m
        if isinstance(m, nn.QuantizedLinear):
            return QuantizedLinear.wrap(m, min_rows)
        return m

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def use_backend_matmul(model: nn.Module) -> nn.Module:
    """The backend's own choice (`MIN_ROWS`); where that is None the model is left as it is."""
    min_rows = default_min_rows()
    return model if min_rows is None else choose_matmul(model, min_rows)
