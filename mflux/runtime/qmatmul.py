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

How the weight is dequantized (`DEQUANTIZE`, per backend): "mlx" is `mx.dequantize`; "fused" is
`dequantize_fused` for 8-bit affine weights (others take `mx.dequantize`), an `mx.compile`d graph that
MLX builds into one elementwise kernel writing 16 bytes a thread; "kernel" is `dequantize_kernel`, this
module's CUDA kernel for affine 4- and 8-bit weights. MLX's CUDA dequantize writes one or two 2-byte
values per thread, far below the card's bandwidth (on linear1's weight 0.45 ms at 8 bits, the fused
graph 0.19 ms, the kernel 0.16 ms). `bench_flux.py --sections qmatmul` times each and prints their
largest difference from `mx.dequantize` (none: the same bits).

CUDA takes "fused". On the H200 the schnell step at 1024² was 1.07-1.11x bf16's at q8 with it against
1.17-1.19x with `mx.dequantize`, in three leases (docs/PERFORMANCE.md, round 9). Its kernel is a compiled
graph's, so MLX keeps it in its kernel cache and the warm-up (runtime.warmup) builds it in a child, where
the custom kernel was built again by every process (MLX 0.32 keeps a custom kernel's NVRTC build in the
process only: a q8 image's first prompt encoding took 2.6-2.9 s against 0.46 s, round 8). The text
encoders keep `mx.dequantize` (`use_backend_matmul`). At 4 bits a graph that shifts the nibbles out was
no faster than `mx.dequantize` (1.12x against 1.11x), then 1.46x in another lease, so 4 bits keep it.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

MIN_ROWS = {"cuda": 1, "metal": None, "cpu": None}
DEQUANTIZE = {"cuda": "fused", "metal": "mlx", "cpu": "mlx"}
KERNEL_BITS = (4, 8)
KERNEL_DTYPES = (mx.bfloat16, mx.float16)

_KERNEL_SOURCE = """
    constexpr int V = 32 / BITS;  // values per 32-bit word
    constexpr int N = 4 * V;  // values per thread: one 16-byte read
    uint32_t t = cooperative_groups::this_grid().thread_rank();
    if (t >= threads[0]) {
        return;
    }
    const uint4 pack = reinterpret_cast<const uint4*>(w)[t];
    const uint32_t words[4] = {pack.x, pack.y, pack.z, pack.w};
    size_t first = size_t(t) * N;
    T scale = scales[first / GROUP];
    T bias = biases[first / GROUP];
    __align__(16) T vals[N];
    #pragma unroll
    for (int i = 0; i < 4; i++) {
        #pragma unroll
        for (int j = 0; j < V; j++) {
            uint32_t d = (words[i] >> (BITS * j)) & ((1u << BITS) - 1);
            vals[i * V + j] = scale * static_cast<T>(d) + bias;
        }
    }
    uint4* dst = reinterpret_cast<uint4*>(out + first);
    const uint4* src = reinterpret_cast<const uint4*>(vals);
    #pragma unroll
    for (int k = 0; k < N * sizeof(T) / 16; k++) {
        dst[k] = src[k];
    }
"""
_kernel = None


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
        if self.dequantize == "fused" and fused_applies(self, x.dtype):
            w = mx.stop_gradient(dequantize_fused(weight, self["scales"], self["biases"], self.group_size))
        elif self.dequantize == "kernel" and kernel_applies(self, x.dtype):
            s, b = self["scales"], self["biases"]
            w = mx.stop_gradient(dequantize_kernel(weight, s, b, self.group_size, self.bits))
        else:
            w = mx.dequantize(
                weight,
                self["scales"],
                self.get("biases"),
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
                dtype=x.dtype,
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


def kernel_applies(layer: nn.QuantizedLinear, dtype) -> bool:
    """Whether `dequantize_kernel` handles this layer: affine 4 or 8 bits, with biases, into bf16/fp16."""
    return (
        layer.mode == "affine"
        and layer.bits in KERNEL_BITS
        and "biases" in layer
        and dtype in KERNEL_DTYPES
        and layer["scales"].dtype == dtype
    )


def fused_applies(layer: nn.QuantizedLinear, dtype) -> bool:
    """Whether `dequantize_fused` handles this layer: affine 8 bits, with biases, into the scales' dtype."""
    return layer.mode == "affine" and layer.bits == 8 and "biases" in layer and layer["scales"].dtype == dtype


def dequantize_kernel(
    w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int
) -> mx.array:
    """`mx.dequantize(w, scales, biases, group_size, bits)` for affine 4/8-bit weights on CUDA, in
    scales' dtype: each thread turns one 16-byte read into 32 (8-bit) or 64 (4-bit) bytes of weights."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="mflux_dequantize_v1",  # MLX caches the built kernel by name: a new source needs a new name
            input_names=["w", "scales", "biases", "threads"],
            output_names=["out"],
            source=_KERNEL_SOURCE,
        )
    rows, words = w.shape
    threads = rows * words // 4  # the row's words are a multiple of 4: K is a multiple of the group (>= 32)
    block = 256
    return _kernel(
        inputs=[w, scales, biases, mx.array([threads], dtype=mx.uint32)],
        template=[("T", scales.dtype), ("BITS", bits), ("GROUP", group_size)],
        grid=(-(-threads // block) * block, 1, 1),
        threadgroup=(block, 1, 1),
        output_shapes=[(rows, words * 32 // bits)],
        output_dtypes=[scales.dtype],
    )[0]


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
