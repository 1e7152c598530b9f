"""The FLUX.1 VAE (diffusers' AutoencoderKL) in MLX: NHWC activations, OHWI conv weights, diffusers' names."""

from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn

from mflux.errors import MfluxError
from mflux.runtime import memory

# A full-resolution layer's working memory per band, by default. At 1024x1024 in bfloat16 the largest
# layers need about 5 GB whole; bands of this size keep the decode's peak near 1 GB over its weights.
BAND_BYTES = 256 * 2**20
# Attention's queries go in chunks of image rows whose scores (float32, with the softmax's temporaries)
# take about this much, in the whole-tensor decode and in the banded one alike: on CUDA a matmul or
# attention over another number of query rows may add in another order, so both paths chunk the same
# way (the other layers gave the same bits at any band on an H200).
ATTENTION_BYTES = 256 * 2**20


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = field(default=(128, 256, 512, 512))
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        """Sizes from a diffusers vae/config.json; unknown keys are ignored, unsupported layouts refused."""
        _check_supported(d)
        kwargs = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        if "shift_factor" in d and d["shift_factor"] is None:
            kwargs["shift_factor"] = 0.0  # diffusers' null shift (VAEs other than FLUX's) means none
        if "block_out_channels" in kwargs:
            kwargs["block_out_channels"] = tuple(kwargs["block_out_channels"])
        return cls(**kwargs)


def _check_supported(d: dict) -> None:
    checks = [
        ("down_block_types", lambda v: all(t == "DownEncoderBlock2D" for t in v)),
        ("up_block_types", lambda v: all(t == "UpDecoderBlock2D" for t in v)),
        ("act_fn", lambda v: v in ("silu", "swish")),
    ]
    for key, ok in checks:
        if key in d and not ok(d[key]):
            raise MfluxError(
                f"VAE config: {key}={d[key]!r} is not supported (only FLUX.1's AutoencoderKL layout)"
            )


class GroupNorm(nn.GroupNorm):
    """PyTorch's GroupNorm, eps 1e-6, computed in float32 and rounded once, as torch does for bf16.

    Its statistics are two passes over per-row sums: each image row is summed over its width first
    (`row_sums`), and only then are the rows summed (`mean`, `inv_std`). The banded decoder sums one
    band of rows at a time with the same `row_sums`, so both paths add the same numbers in the same
    order and get the same bits. (MLX's fused layer norm, over the whole tensor at once, summed in
    another order: in bf16 that moved some outputs by a rounding step, and a decoder's 30 norms took
    the difference to 6-13/255 between the two paths.)
    """

    def __init__(self, groups: int, dims: int):
        super().__init__(groups, dims, eps=1e-6, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        mean = self.mean(self.row_sums(x), x.shape)
        inv_std = self.inv_std(self.row_sums(x, mean), x.shape)
        return self.apply(x, mean, inv_std)

    @staticmethod
    def row_sums(x: mx.array, mean: mx.array | None = None) -> mx.array:
        """(B, rows, W, C) -> (B, rows, C), float32: each row's sum over its width of x, or of
        (x - mean)²."""
        x32 = x.astype(mx.float32)
        return (x32 if mean is None else mx.square(x32 - mean)).sum(axis=2)

    def mean(self, sums: mx.array, shape) -> mx.array:
        """Every row's `row_sums` (B, H, C) -> the per-group mean, per channel: (B, 1, 1, C)."""
        return self._per_channel(self._per_group(sums) / self._count(shape))

    def inv_std(self, sq_sums: mx.array, shape) -> mx.array:
        """Every row's `row_sums(x, mean)` -> 1 / sqrt(variance + eps), per channel: (B, 1, 1, C)."""
        return self._per_channel(mx.rsqrt(self._per_group(sq_sums) / self._count(shape) + self.eps))

    def apply(self, x: mx.array, mean: mx.array, inv_std: mx.array) -> mx.array:
        """The norm of x (the whole tensor or a band of its rows) from its statistics."""
        y = (x.astype(mx.float32) - mean) * inv_std
        return (self.weight * y + self.bias).astype(x.dtype)

    def _per_group(self, sums: mx.array) -> mx.array:
        B, _, C = sums.shape
        return sums.sum(axis=1).reshape(B, self.num_groups, C // self.num_groups).sum(axis=2)

    def _per_channel(self, per_group: mx.array) -> mx.array:
        C = self.weight.shape[0]
        return mx.repeat(per_group, C // self.num_groups, axis=1)[:, None, None, :]

    def _count(self, shape) -> int:
        _, H, W, C = shape
        return H * W * (C // self.num_groups)


class ResnetBlock(nn.Module):
    def __init__(self, dims: int, out_dims: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, dims)
        self.conv1 = nn.Conv2d(dims, out_dims, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_dims)
        self.conv2 = nn.Conv2d(out_dims, out_dims, 3, padding=1)
        if dims != out_dims:
            self.conv_shortcut = nn.Conv2d(dims, out_dims, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, dims)
        self.to_q = nn.Linear(dims, dims)
        self.to_k = nn.Linear(dims, dims)
        self.to_v = nn.Linear(dims, dims)
        self.to_out = [nn.Linear(dims, dims)]

    def __call__(self, x: mx.array) -> mx.array:
        chunks = [chunk for _, chunk in self.chunks(x)]
        return chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=1)

    def chunks(self, x: mx.array):
        """(first row, output rows) for each chunk of query rows (`ATTENTION_BYTES`), lazily; all share
        one computation of the keys and values."""
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)  # (B, 1, L, C)
        k, v = self.to_k(h), self.to_v(h)
        rows = max(1, min(H, ATTENTION_BYTES // (B * W * H * W * 4 * 3)))
        for a in range(0, H, rows):
            b = min(a + rows, H)
            q = self.to_q(h[:, :, a * W : b * W])
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=C**-0.5)
            yield a, x[:, a:b] + self.to_out[0](o).reshape(B, b - a, W, C)


class MidBlock(nn.Module):
    def __init__(self, dims: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(dims, dims, groups), ResnetBlock(dims, dims, groups)]
        if attention:
            self.attentions = [Attention(dims, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.conv = nn.Conv2d(dims, dims, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # diffusers pads only bottom and right, so the stride-2 windows start at the top-left pixel
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        self.conv = nn.Conv2d(dims, dims, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))  # nearest x2
        return self.conv(x.reshape(B, 2 * H, 2 * W, C))


class DownBlock(nn.Module):
    def __init__(self, dims: int, out_dims: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(dims if i == 0 else out_dims, out_dims, groups) for i in range(layers)]
        if downsample:
            self.downsamplers = [Downsample(out_dims)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class UpBlock(nn.Module):
    def __init__(self, dims: int, out_dims: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(dims if i == 0 else out_dims, out_dims, groups) for i in range(layers)]
        if upsample:
            self.upsamplers = [Upsample(out_dims)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, groups, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, i < n - 1) for i in range(n)
        ]
        self.mid_block = MidBlock(ch[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1])
        # mean and log-variance of the posterior
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        ch, groups, n = (
            config.block_out_channels[::-1],
            config.norm_num_groups,
            len(config.block_out_channels),
        )
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, config.mid_block_add_attention)
        self.up_blocks = [
            UpBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, i < n - 1)
            for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(groups, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c, c, 1)

    def decode(self, z: mx.array, band_bytes: int | None | str = "auto") -> mx.array:
        """(B, h, w, C_latent) in VAE space (see `unscale`) -> (B, 8h, 8w, 3), roughly in [-1, 1].

        When a full-resolution layer would need more than `band_bytes` of working memory, the decoder
        runs layer by layer in row bands (`BandedDecoder`): the same pixels, at a fraction of the peak,
        but slower (on an H200 at 1024x1024 bf16, in 1024 MB bands: 0.136 s against 0.073 s, 1.5 GB over
        the weights against 3.0 GB under the runtime's queue bound, 18.6 GB without it). "auto" bands
        only when the whole-tensor decode would take more than a quarter of the device's memory (so a
        16 GB Mac bands at 1024x1024 and a large GPU does not); "always" bands at any size (low
        memory: layer by layer, so even a small decode holds one layer's tensors); None never bands.
        """
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        always = band_bytes == "always"
        if always:
            band_bytes = BAND_BYTES
        if band_bytes == "auto":
            whole = BandedDecoder(self.decoder, BAND_BYTES).working_set(z)
            band_bytes = BAND_BYTES if whole > memory.device_memory() // 4 else None
        banded = BandedDecoder(self.decoder, band_bytes) if band_bytes else None
        if banded is None or not (always or banded.needed(z)):
            return self.decoder(z)
        return banded(z)

    def encode(self, x: mx.array) -> mx.array:
        """(B, H, W, 3) in [-1, 1] -> the posterior mean (B, H/8, W/8, C_latent), in VAE space."""
        moments = self.encoder(x)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        return moments[..., : self.config.latent_channels]

    def unscale(self, z: mx.array) -> mx.array:
        """The transformer's latent -> VAE space, as FluxPipeline does before decoding."""
        # float32 arithmetic, so a bf16 latent is rounded once, like torch's opmath
        z32 = z.astype(mx.float32) / self.config.scaling_factor + self.config.shift_factor
        return z32.astype(z.dtype)

    def scale(self, z: mx.array) -> mx.array:
        """VAE space -> the transformer's latent; the inverse of `unscale`, for an encoded image."""
        z32 = (z.astype(mx.float32) - self.config.shift_factor) * self.config.scaling_factor
        return z32.astype(z.dtype)


class BandedDecoder:
    """The decoder, evaluated layer by layer, each layer in bands of rows.

    Between layers the activation is one evaluated tensor. A 3x3 convolution computes each band of
    output rows from its input rows plus one halo row on each side (zeros at the image's edge, as the
    convolution's padding), so the result equals the whole-tensor convolution. A group norm's mean and
    variance are accumulated over every band first (two passes, float32, from `GroupNorm.row_sums`:
    the sums the whole tensor's norm adds up too, so the statistics are its very bits), then applied
    band by band just before the convolution that reads them. Attention runs over the chunks of
    queries that the whole tensor's takes too (`Attention.chunks`), against all keys. Only one band's
    temporaries (the norm's float32 copy, the convolution's workspace) exist at a time.
    """

    def __init__(self, decoder: "Decoder", band_bytes: int):
        self.d = decoder
        self.band_bytes = band_bytes

    def working_set(self, z: mx.array) -> int:
        """The widest full-resolution convolution's working set on the whole tensor, in bytes."""
        B, h, w, _ = z.shape
        ch = [r.conv1.weight.shape[-1] for r in self.d.up_blocks[-1].resnets]
        return self._row_bytes(B * 8 * w, max(ch), z.dtype) * 8 * h

    def needed(self, z: mx.array) -> bool:
        """Whether that working set exceeds one band."""
        return self.working_set(z) > self.band_bytes

    def __call__(self, z: mx.array) -> mx.array:
        d = self.d
        x = self.conv(d.conv_in, z)
        x = self.resnet(d.mid_block.resnets[0], x)
        if "attentions" in d.mid_block:
            x = self.attention(d.mid_block.attentions[0], x)
        x = self.resnet(d.mid_block.resnets[1], x)
        for block in d.up_blocks:
            for resnet in block.resnets:
                x = self.resnet(resnet, x)
            if "upsamplers" in block:
                x = self.conv(block.upsamplers[0].conv, x, upsample=True)
        return self.conv(d.conv_out, x, norm=d.conv_norm_out)

    # ------------------------------------------------------------ layers

    def resnet(self, r: "ResnetBlock", x: mx.array) -> mx.array:
        h = self.conv(r.conv1, x, norm=r.norm1)
        shortcut = r.conv_shortcut if "conv_shortcut" in r else None

        def residual(a, b):
            band = x[:, a:b]
            return self._conv(shortcut, band, 0) if shortcut is not None else band

        return self.conv(r.conv2, h, norm=r.norm2, residual=residual)

    def attention(self, att: "Attention", x: mx.array) -> mx.array:
        # the chunks of query rows the whole tensor's attention takes too, each evaluated on its own
        out = []
        for _, band in att.chunks(x):
            mx.eval(band)
            out.append(band)
        return self._join(out)

    def conv(self, conv: nn.Conv2d, x: mx.array, norm=None, upsample=False, residual=None) -> mx.array:
        """conv(silu(norm(x))) (or conv(x), or conv(upsample(x))), plus `residual(a, b)` for output rows
        [a, b), one band of output rows at a time."""
        B, H, W, C = x.shape
        stats = self._group_stats(norm, x) if norm is not None else None
        scale = 2 if upsample else 1
        out_h, out_w = H * scale, W * scale
        pad = conv.weight.shape[1] // 2
        rows = self._rows(out_h, self._row_bytes(B * out_w, C, x.dtype), multiple=scale)
        out = []
        for a in range(0, out_h, rows):
            b = min(a + rows, out_h)
            band = self._input_rows(x, a - pad, b + pad, scale, norm, stats)
            y = self._conv(conv, band, pad)
            if residual is not None:
                y = residual(a, b) + y
            mx.eval(y)
            out.append(y)
        return self._join(out)

    # ------------------------------------------------------------ pieces

    def _input_rows(self, x, lo: int, hi: int, scale: int, norm, stats) -> mx.array:
        """Rows [lo, hi) of the convolution's input (x normed and activated, or x upsampled), with zero
        rows where they fall outside the image."""
        H = x.shape[1] * scale
        a, b = max(lo, 0), min(hi, H)
        if scale == 1:
            band = x[:, a:b]
            if norm is not None:
                band = nn.silu(self._apply_norm(norm, band, stats))
        else:
            src = x[:, a // scale : (b - 1) // scale + 1]
            Bn, h, w, C = src.shape
            up = mx.broadcast_to(src[:, :, None, :, None, :], (Bn, h, scale, w, scale, C))
            up = up.reshape(Bn, h * scale, w * scale, C)
            band = up[:, a - (a // scale) * scale : a - (a // scale) * scale + (b - a)]
        if a - lo or hi - b:
            band = mx.pad(band, [(0, 0), (a - lo, hi - b), (0, 0), (0, 0)])
        return band

    @staticmethod
    def _conv(conv: nn.Conv2d, band: mx.array, pad: int) -> mx.array:
        # The rows already hold their halo (or zeros at the image's edge). The convolution still takes the
        # layer's own padding on both axes, as on the whole tensor, and the output rows centred on the
        # halo are dropped: padded by columns only, a 146-row band of the 512x512 level's 512-channel
        # convolutions gave other bits than the whole tensor on an H200 (cuDNN chose another
        # algorithm), padded both ways none did.
        y = mx.conv2d(band, conv.weight, padding=(pad, pad))
        y = y[:, pad:-pad] if pad else y
        return y + conv.bias if "bias" in conv else y

    def _group_stats(self, norm: "GroupNorm", x: mx.array) -> tuple[mx.array, mx.array]:
        """Per (batch, group) mean and 1/std over all of x, as `GroupNorm` computes them: its per-row
        sums, a band of rows at a time, then its sums over the rows (the same bits as the whole tensor's)."""
        rows = self._rows(x.shape[1], x.shape[0] * x.shape[2] * x.shape[3] * 4 * 3)

        def over_bands(mean=None):
            sums = []
            for a in range(0, x.shape[1], rows):
                sums.append(norm.row_sums(x[:, a : a + rows], mean))
                mx.eval(sums[-1])
            return mx.concatenate(sums, axis=1) if len(sums) > 1 else sums[0]

        mean = norm.mean(over_bands(), x.shape)
        mx.eval(mean)
        inv_std = norm.inv_std(over_bands(mean), x.shape)
        mx.eval(inv_std)
        return mean, inv_std

    @staticmethod
    def _apply_norm(norm: "GroupNorm", band: mx.array, stats) -> mx.array:
        return norm.apply(band, *stats)

    @staticmethod
    def _row_bytes(pixels: int, channels: int, dtype) -> int:
        # one output row's working set: the float32 normed input, the convolution's 3x3 unfolding of
        # it in the model dtype, and the output
        return pixels * channels * (8 + 10 * dtype.size)

    def _rows(self, total: int, row_bytes: int, multiple: int = 1) -> int:
        rows = max(multiple, self.band_bytes // max(row_bytes, 1) // multiple * multiple)
        return min(rows, total)

    @staticmethod
    def _join(bands: list) -> mx.array:
        if len(bands) == 1:
            return bands[0]
        out = mx.concatenate(bands, axis=1)
        bands.clear()
        mx.eval(out)
        return out
