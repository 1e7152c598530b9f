"""The transformer's glue around attention as CUDA kernels, with MLX's ops as the fallback and the gradient.

- `qk_rope`: the q/k RMSNorms and the rope, reading q, k and v straight from one or two streams' fused
  qkv outputs and writing the joint (B, L, H, D) arrays (MLX copies each strided q or k out first, and
  its rope takes one value a thread);
- `gelu_concat`: the single block's `linear2` input, [attn, gelu(mlp)], in one pass.
Their arithmetic follows the reference's rounding (norm as MLX's `rms_norm`, rope and GELU in float32
rounded once). They are compiled once per machine with NVRTC into a cubin kept in the kernel cache
(MLX keeps an `mx.fast.cuda_kernel`'s build in the process only) and run as precompiled kernels.
Where NVRTC or the card can't (compute capability below 8.0), MLX's ops run and `status()` says why.
"""

import ctypes
import glob
import hashlib
import os
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx

from mflux.runtime.cuda import tuning

HEAD_DIM = 128  # FLUX.1's; the kernel's rows are 16 lanes of 8 values
EPS = 1e-6  # the norms' (written into the kernel's source)
DTYPES = {mx.bfloat16: "bf16", mx.float16: "f16"}  # 8 values a lane are one 16-byte load

# Self-contained (NVRTC's built-in math and intrinsics only): 16-bit values are moved as raw bits and
# converted with PTX's own instructions, which round to nearest even as CUDA's headers do.
_SOURCE = r"""
typedef unsigned short u16;

template <bool BF> __device__ __forceinline__ float to_f(u16 v) {
    if (BF) return __uint_as_float(((unsigned int)v) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}

template <bool BF> __device__ __forceinline__ u16 from_f(float f) {
    u16 h;
    if (BF) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// q, k, v (B, N, H, D=128) of the joint sequence: token n < S from src0 (B, S, F0), the rest from
// src1 (B, N - S, F1); q and k through their RMSNorm (weights wq*, wk*) and the rope (pe: (B, N, 64, 2)
// float32 (cos, sin) pairs). One row (a token's head) per 16 lanes, 8 values a lane.
template <bool BF> __device__ void qk_rope(
    const u16* src0, const u16* src1, const u16* wq0, const u16* wk0, const u16* wq1, const u16* wk1,
    const float* pe, u16* q, u16* k, u16* v, int B, int N, int S, int H, int F0, int F1) {
    const int D = 128, LANES = 16;
    const size_t t = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= size_t(3) * B * N * H * LANES) return;  // whole warps: H is even
    const int lane = t % LANES;
    size_t r = t / LANES;
    const int h = r % H;
    r /= H;
    const int n = r % N;
    r /= N;
    const int b = r % B;
    const int which = r / B;  // 0 q, 1 k, 2 v
    const bool first = n < S;
    const u16* row = first ? src0 + (size_t(b) * S + n) * F0 : src1 + (size_t(b) * (N - S) + n - S) * F1;
    row += which * H * D + h * D + lane * 8;
    u16* dst = (which == 0 ? q : (which == 1 ? k : v)) + ((size_t(b) * N + n) * H + h) * D + lane * 8;
    const uint4 raw = *reinterpret_cast<const uint4*>(row);
    if (which == 2) {
        *reinterpret_cast<uint4*>(dst) = raw;
        return;
    }
    const u16* xv = reinterpret_cast<const u16*>(&raw);
    float x[8], ss = 0.0f;
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        x[j] = to_f<BF>(xv[j]);
        ss += x[j] * x[j];
    }
    #pragma unroll
    for (int offset = LANES / 2; offset > 0; offset /= 2) ss += __shfl_xor_sync(0xffffffff, ss, offset);
    const float norm = rsqrtf(ss / D + EPS);
    const u16* w = (which == 0 ? (first ? wq0 : wq1) : (first ? wk0 : wk1)) + lane * 8;
    const float* a = pe + (size_t(b) * N + n) * D + lane * 8;
    __align__(16) u16 out[8];
    #pragma unroll
    for (int j = 0; j < 8; j += 2) {
        // as MLX's rms_norm rounds: normalized to 16 bits, then times the weight, rounded again (the
        // product of two 16-bit values is exact in float32)
        const float y0 = to_f<BF>(from_f<BF>(to_f<BF>(w[j]) * to_f<BF>(from_f<BF>(x[j] * norm))));
        const float y1 = to_f<BF>(from_f<BF>(to_f<BF>(w[j + 1]) * to_f<BF>(from_f<BF>(x[j + 1] * norm))));
        const float c = a[j], s = a[j + 1];
        out[j] = from_f<BF>(y0 * c + y1 * -s);
        out[j + 1] = from_f<BF>(y0 * s + y1 * c);
    }
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(out);
}

// out (R, A + M) = [attn (R, A), gelu(h[:, OFF:OFF + M])] with h (R, F): the tanh GELU in float32,
// rounded once, 8 values a thread
template <bool BF> __device__ void gelu_concat(
    const u16* attn, const u16* h, u16* out, int R, int A, int M, int F, int OFF) {
    const int per_row = (A + M) / 8;
    const size_t t = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= size_t(R) * per_row) return;
    const size_t row = t / per_row;
    const int c = (t % per_row) * 8;
    uint4* dst = reinterpret_cast<uint4*>(out + row * (A + M) + c);
    if (c < A) {
        *dst = *reinterpret_cast<const uint4*>(attn + row * A + c);
        return;
    }
    const uint4 raw = *reinterpret_cast<const uint4*>(h + row * F + OFF + c - A);
    const u16* xv = reinterpret_cast<const u16*>(&raw);
    __align__(16) u16 y[8];
    #pragma unroll
    for (int j = 0; j < 8; j++) {
        const float x = to_f<BF>(xv[j]);
        y[j] = from_f<BF>(0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))));
    }
    *dst = *reinterpret_cast<const uint4*>(y);
}

#define QK_ARGS const u16* src0, const u16* src1, const u16* wq0, const u16* wk0, const u16* wq1, \
    const u16* wk1, const float* pe, u16* q, u16* k, u16* v, int B, int N, int S, int H, int F0, int F1
#define QK_CALL src0, src1, wq0, wk0, wq1, wk1, pe, q, k, v, B, N, S, H, F0, F1
#define GELU_ARGS const u16* attn, const u16* h, u16* out, int R, int A, int M, int F, int OFF
#define GELU_CALL attn, h, out, R, A, M, F, OFF
extern "C" __global__ void mflux_qk_rope_bf16(QK_ARGS) { qk_rope<true>(QK_CALL); }
extern "C" __global__ void mflux_qk_rope_f16(QK_ARGS) { qk_rope<false>(QK_CALL); }
extern "C" __global__ void mflux_gelu_concat_bf16(GELU_ARGS) { gelu_concat<true>(GELU_CALL); }
extern "C" __global__ void mflux_gelu_concat_f16(GELU_ARGS) { gelu_concat<false>(GELU_CALL); }
""".replace("EPS", repr(EPS) + "f")

_cubin: bytes | None = None
_why_not: str | None = None  # why the kernels don't run, once that is known
_lock = threading.Lock()
_local = threading.local()  # .off: inside `off()` on this thread


def enabled() -> bool:
    """Whether the kernels run here: the tuning takes them, this thread is not inside `off()`, and
    their code could be built."""
    return tuning().kernels and not getattr(_local, "off", 0) and _load_cubin() is not None


@contextmanager
def off():
    """MLX's ops on this thread meanwhile. The trainer's step runs inside: at full size the double
    block's gradients through the kernels are non-finite, for a reason not yet found."""
    _local.off = getattr(_local, "off", 0) + 1
    try:
        yield
    finally:
        _local.off -= 1


def status() -> str:
    """Whether the kernels run, or why not (the benchmarks report it)."""
    if not tuning().kernels:
        return "off (tuned off)"
    return "on" if _load_cubin() is not None else f"off: {_why_not}"


# ---------------------------------------------------------------- the calls the blocks make


def qk_rope(streams, num_heads: int, pe: tuple[mx.array, mx.array], ops):
    """q and k normalized (RMSNorm per head) and rotated, and v, over the joint sequence of one or two
    streams. Each stream is (qkv (B, L, F), query norm weight (D,), key norm weight (D,)), its first
    3 * H * D columns q, k and v; pe holds `layers.rope`'s tables for the joint sequence. Returns q, k
    and v, (B, sum L, H, D). `ops(streams, num_heads, pe)` is the portable path: it runs where the
    kernel doesn't, and gives the kernel's gradient."""
    if not _qk_takes(streams, num_heads, pe):
        return ops(streams, num_heads, pe)
    two = len(streams) == 2

    @mx.custom_function
    def fused(src0, src1, wq0, wk0, wq1, wk1, a):
        return tuple(_qk_launch(src0, src1, wq0, wk0, wq1, wk1, a, num_heads, two))

    @fused.vjp
    def fused_vjp(primals, cotangents, _outputs):
        def portable(src0, src1, wq0, wk0, wq1, wk1):
            return ops([(src0, wq0, wk0), (src1, wq1, wk1)] if two else [(src1, wq1, wk1)], num_heads, pe)

        _, grads = mx.vjp(portable, list(primals[:6]), list(cotangents))
        return *grads, mx.zeros_like(primals[6])

    (src0, wq0, wk0), (src1, wq1, wk1) = streams[0], streams[-1]
    return fused(src0, src1, wq0, wk0, wq1, wk1, pe[0])


def _qk_takes(streams, num_heads: int, pe) -> bool:
    if not enabled():
        return False
    dtype = streams[0][0].dtype
    return (
        dtype in DTYPES
        and all(a.dtype == dtype for s in streams for a in s)
        and all(s[1].shape == (HEAD_DIM,) and s[2].shape == (HEAD_DIM,) for s in streams)
        and all(s[0].shape[-1] % 8 == 0 and s[0].shape[-1] >= 3 * num_heads * HEAD_DIM for s in streams)
        and pe[0].dtype == mx.float32
        and pe[0].shape[:2] == (streams[0][0].shape[0], sum(s[0].shape[1] for s in streams))
        and all(s[0].shape[0] == streams[0][0].shape[0] for s in streams)
        and num_heads % 2 == 0  # whole warps (see the kernel)
    )


def _qk_launch(src0, src1, wq0, wk0, wq1, wk1, a, num_heads: int, two: bool) -> list[mx.array]:
    B, S = src0.shape[0], src0.shape[1] if two else 0
    N = S + src1.shape[1]
    shape = (B, N, num_heads, HEAD_DIM)
    return mx.fast.precompiled_cuda_kernel(
        name=f"mflux_qk_rope_{DTYPES[src0.dtype]}",
        compiled_source=_load_cubin(),
        inputs=[src0, src1, wq0, wk0, wq1, wk1, a],
        output_shapes=[shape] * 3,
        output_dtypes=[src0.dtype] * 3,
        scalars=[B, N, S, num_heads, src0.shape[-1], src1.shape[-1]],
        grid=(3 * B * N * num_heads * (HEAD_DIM // 8), 1, 1),
        threadgroup=(256, 1, 1),
        ensure_row_contiguous=True,
    )


def gelu_concat(attn: mx.array, h: mx.array, offset: int, ops) -> mx.array:
    """[attn, gelu(h[..., offset:])] along the last axis: the single block's input to `linear2`, with
    attn (B, L, A) and h (B, L, F). `ops(attn, mlp)` is the portable path (and the kernel's gradient)."""
    if not (
        enabled()
        and attn.dtype in DTYPES
        and h.dtype == attn.dtype
        and attn.shape[:-1] == h.shape[:-1]
        and attn.shape[-1] % 8 == 0
        and h.shape[-1] % 8 == 0
        and offset % 8 == 0
    ):
        return ops(attn, h[..., offset:])

    @mx.custom_function
    def fused(attn, h):
        return _gelu_launch(attn, h, offset)

    @fused.vjp
    def fused_vjp(primals, cotangent, _output):
        _, grads = mx.vjp(lambda a, x: ops(a, x[..., offset:]), list(primals), [cotangent])
        return tuple(grads)

    return fused(attn, h)


def _gelu_launch(attn: mx.array, h: mx.array, offset: int) -> mx.array:
    *lead, A = attn.shape
    F = h.shape[-1]
    rows, M = attn.size // A, F - offset
    return mx.fast.precompiled_cuda_kernel(
        name=f"mflux_gelu_concat_{DTYPES[attn.dtype]}",
        compiled_source=_load_cubin(),
        inputs=[attn, h],
        output_shapes=[(*lead, A + M)],
        output_dtypes=[attn.dtype],
        scalars=[rows, A, M, F, offset],
        grid=(rows * (A + M) // 8, 1, 1),
        threadgroup=(256, 1, 1),
        ensure_row_contiguous=True,
    )[0]


# ---------------------------------------------------------------- building them


def _load_cubin() -> bytes | None:
    """The kernels' cubin: from the kernel cache, else compiled with NVRTC and written there (renamed into
    place, so no process reads half a file). None, with `_why_not` set, where that can't be done."""
    global _cubin, _why_not
    if _cubin is not None or _why_not is not None:
        return _cubin
    with _lock:
        if _cubin is None and _why_not is None:
            try:
                _cubin = _cached_or_compiled()
            except (OSError, RuntimeError) as e:
                _why_not = str(e)
    return _cubin


def _cached_or_compiled() -> bytes:
    from mflux.backend import kernel_cache_dir

    major, minor = _compute_capability()
    if major < 8:
        raise RuntimeError(f"compute capability {major}.{minor}: the kernels need 8.0 (bf16)")
    arch = f"sm_{major}{minor}"
    nvrtc = _nvrtc()
    version = _nvrtc_version(nvrtc)
    digest = hashlib.sha256(f"{_SOURCE}{arch}{version}".encode()).hexdigest()[:16]
    path = kernel_cache_dir() / f"mflux-glue-{arch}-{digest}.cubin"
    if path.exists():
        return path.read_bytes()
    code = _compile(nvrtc, _SOURCE, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(code)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache: this process keeps its build, the next one compiles again
    return code


def _nvrtc():
    """NVRTC: the copy MLX's CUDA build loaded, else one of the pip `nvidia` packages on sys.path."""
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for root in sys.path:
        for path in sorted(glob.glob(os.path.join(root, "nvidia", "**", "libnvrtc.so*"), recursive=True)):
            if "builtins" not in path:
                return ctypes.CDLL(path)
    raise OSError("NVRTC (libnvrtc) not found")


def _nvrtc_version(nvrtc) -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _compile(nvrtc, source: str, arch: str) -> bytes:
    """The card's own code (a cubin for `arch`, "sm_90"), not PTX: NVRTC may write a PTX version newer
    than the driver reads, while a cubin of the same CUDA major loads on an older driver."""
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"mflux_glue.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17"]
        if nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)):
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(
                f"NVRTC could not compile the kernels: {log.value.decode(errors='replace')[:2000]}"
            )
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        code = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(prog, code)
        return code.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def _compute_capability() -> tuple[int, int]:
    """The default GPU's compute capability, from the CUDA driver."""
    cuda = ctypes.CDLL("libcuda.so.1")
    major, minor, device = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0):
        raise RuntimeError("the CUDA driver did not answer")
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    return major.value, minor.value
