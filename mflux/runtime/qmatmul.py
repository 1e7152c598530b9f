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

How the weight is dequantized (`DEQUANTIZE`, per backend):
- "mlx" is `mx.dequantize`. MLX's CUDA kernel for it writes one or two 2-byte values per thread, far
  below the card's bandwidth: on linear1's weight 0.45 ms at 8 bits.
- "fused" is `dequantize_fused` for 8-bit affine weights (others take `mx.dequantize`), an
  `mx.compile`d graph that MLX builds into one elementwise kernel writing 16 bytes a thread (0.19 ms).
  It is kept in MLX's kernel cache, and the warm-up's children (runtime.warmup) build it.
- "kernel" is `kernels.dequantize`, a CUDA kernel for affine 4- and 8-bit weights that reads whole
  words and writes 16 bytes a thread, built once per machine with the glue kernels (runtime.kernels).
  Where it doesn't apply or the kernels don't run (the trainer's compiled step runs inside
  `kernels.off()`), a layer takes "fused".
All three give the same bits (`bench_flux.py --sections qmatmul` prints each one's time and largest
difference from `mx.dequantize`; tests/test_perf_qmatmul.py and tests/test_kernels.py).

CUDA takes "fused". It made the schnell step at 1024² 1.07-1.12x bf16's at q8, against 1.17-1.19x with
`mx.dequantize` (docs/PERFORMANCE.md, round 9), while 4 bits keep `mx.dequantize`: a compiled graph
shifting out the nibbles was no faster, and once 1.46x. "kernel" is faster on its own (linear1's weight:
0.145 ms at 8 bits and 0.142 ms at 4, against 0.174 ms fused and 0.23 ms for mx.dequantize at 4 bits) and
made the q4 step 1.088x bf16's against 1.117x (round 11). But in that step the queue bound held more
of its output: q4 peaked at 10.06 GB against the issue's bound of 9.18 GB (the other paths 9.08-9.27),
q8 at 15.42 GB against 15.13. Until that is understood it is not the default. Round 8 had a custom
kernel as an `mx.fast.cuda_kernel`, which MLX 0.32 builds again in every process (a q8 image's first
prompt encoding took 2.6-2.9 s against 0.46 s); `kernels` builds its cubin once into the kernel cache.
The text encoders keep `mx.dequantize` (`use_backend_matmul`).
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from mflux.runtime import kernels
from mflux.runtime.device import backend  # noqa: F401  (qmatmul.backend, as the benchmarks call it)

MIN_ROWS = {"cuda": 1, "metal": None, "cpu": None}
DEQUANTIZE = {"cuda": "fused", "metal": "mlx", "cpu": "mlx"}


def default_min_rows() -> int | None:
    return MIN_ROWS[backend()]


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose call dequantizes the weight first when the input has >= `min_rows` rows."""

    min_rows: int | None = None
    dequantize: str = "mlx"  # or "fused", "kernel" (see DEQUANTIZE)

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
        weight = mx.depends(self["weight"], x)
        # The weight is frozen: a custom kernel has no vjp for a training step's backward pass to reach
        # it through (mx.depends ties the weight to x), and the fused graph needs none either.
        s, b = self["scales"], self.get("biases")
        how = self.dequantize
        if how == "kernel" and not (
            self.mode == "affine"
            and x.dtype == s.dtype
            and kernels.dequantize_takes(weight, s, b, self.group_size, self.bits)
        ):
            how = "fused"  # where the kernels don't run (another backend, the trainer's compiled step)
        if how == "fused" and fused_applies(self, x.dtype):
            w = mx.stop_gradient(dequantize_fused(weight, s, b, self.group_size))
        elif how == "kernel":
            w = mx.stop_gradient(kernels.dequantize(weight, s, b, self.group_size, self.bits))
        else:
            w = mx.dequantize(
                weight, s, b, group_size=self.group_size, bits=self.bits, mode=self.mode, dtype=x.dtype
            )
        # the bias in the matmul's epilogue, as nn.Linear does: a separate add is one more pass over
        # the output (at linear1's 4352 x 21504 bf16, 187 MB read and written), 228 times a step
        return mx.addmm(self["bias"], x, w.T) if "bias" in self else x @ w.T


def choose_matmul(model: nn.Module, min_rows: int | None, dequantize: str | None = None) -> nn.Module:
    """Set every quantized linear layer of `model` to dequantize from `min_rows` rows (None: never), with
    `dequantize` ("mlx", "fused" or "kernel"; None: the backend's `DEQUANTIZE`)."""

    def swap(_, m):
        if isinstance(m, nn.QuantizedLinear) and not isinstance(m, QuantizedLinear):
            m = QuantizedLinear.wrap(m, min_rows)
        if isinstance(m, QuantizedLinear):
            m.min_rows = min_rows
            m.dequantize = dequantize or DEQUANTIZE[backend()]
        return m

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def use_backend_matmul(model: nn.Module) -> nn.Module:
    """The backend's own choice (`MIN_ROWS`, `DEQUANTIZE`); where that is None the model is left as it
    is. A model marked `jit_free` (the text encoders: they run first, before the warm-up's children can
    have built anything) dequantizes with `mx.dequantize`, a prebuilt kernel: on the H200 the fused
    graph's build made a fresh process's first q8 prompt encoding 6.9 s against 0.5 s warm."""
    min_rows = default_min_rows()
    if min_rows is None:
        return model
    return choose_matmul(model, min_rows, "mlx" if getattr(model, "jit_free", False) else None)


def fused_applies(layer: nn.QuantizedLinear, dtype) -> bool:
    """Whether `dequantize_fused` handles this layer: affine 8 bits, with biases, into the scales' dtype."""
    return layer.mode == "affine" and layer.bits == 8 and "biases" in layer and layer["scales"].dtype == dtype


@mx.compile
def _scale_bytes(q: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
    return q.astype(scales.dtype) * scales + biases


def dequantize_fused(w: mx.array, scales: mx.array, biases: mx.array, group_size: int) -> mx.array:
    """`mx.dequantize` of affine 8-bit weights as one compiled elementwise graph, which MLX builds into
    a fused kernel like every `mx.compile`d graph (kept in its kernel cache, unlike a custom kernel's
    build). The packed words are read as bytes, (rows, groups, group_size): MLX packs values from the
    low byte up, so the bytes in memory order are the weights. The last axis is a whole group, on which
    only the weight varies, so MLX's fused kernel writes 16 bytes a thread."""
    rows = w.shape[0]
    groups = scales.shape[-1]
    q = mx.view(w, mx.uint8).reshape(rows, groups, group_size)
    return _scale_bytes(q, scales[..., None], biases[..., None]).reshape(rows, groups * group_size)
