"""The FLUX.1 VAE (diffusers' AutoencoderKL) in MLX: NHWC activations, OHWI conv weights, diffusers' names."""

from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn

from mflux.errors import MfluxError

# A full-resolution layer's working memory per band, by default. At 1024x1024 in bfloat16 the largest
# layers need about 5 GB whole; bands of this size keep the decode's peak near 1 GB over its weights.
BAND_BYTES = 256 * 2**20


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
    """PyTorch's GroupNorm, eps 1e-6, computed in float32 and rounded once, as torch does for bf16."""

    def __init__(self, groups: int, dims: int):
        super().__init__(groups, dims, eps=1e-6, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x.astype(mx.float32)).astype(x.dtype)


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
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)  # (B, 1, L, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = mx.fast.scaled_dot_product_attention(q, k, v, scale=C**-0.5)
        return x + self.to_out[0](h).reshape(B, H, W, C)


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
        but slower (on an H200 at 1024x1024 bf16: 7.6 s against 0.07 s, 1.4 GB over the weights against
        18.6 GB). "auto" bands only when the whole-tensor decode would take more than a quarter of the
        device's memory (so a 16 GB Mac bands at 1024x1024 and a large GPU does not); None never bands.
        """
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        if band_bytes == "auto":
            whole = BandedDecoder(self.decoder, BAND_BYTES).working_set(z)
            band_bytes = BAND_BYTES if whole > _memory_bytes() // 4 else None
        banded = BandedDecoder(self.decoder, band_bytes) if band_bytes else None
        if banded is None or not banded.needed(z):
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


def _memory_bytes() -> int:
    """The device's memory: the GPU's where MLX reports it, else the machine's."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class BandedDecoder:
    """The decoder, evaluated layer by layer, each layer in bands of rows.

    Between layers the activation is one evaluated tensor. A 3x3 convolution computes each band of
    output rows from its input rows plus one halo row on each side (zeros at the image's edge, as the
    convolution's padding), so the result equals the whole-tensor convolution. A group norm's mean and
    variance are accumulated over every band first (two passes, float32), so the statistics are exact,
    and then applied band by band just before the convolution that reads them. Attention runs over
    bands of queries against all keys, which is exact too. Only one band's temporaries (the norm's
    float32 copy, the convolution's workspace) exist at a time.
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
        B, H, W, C = x.shape
        h = att.group_norm(x).reshape(B, 1, H * W, C)
        k, v = att.to_k(h), att.to_v(h)
        mx.eval(k, v)
        # a band of query rows against every key: its scores are (band * W) x (H * W) floats
        rows = self._rows(H, B * W * H * W * 4 * 3 + B * W * C * 16)
        out = []
        for a in range(0, H, rows):
            b = min(a + rows, H)
            q = att.to_q(h[:, :, a * W : b * W])
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=C**-0.5)
            band = x[:, a:b] + att.to_out[0](o).reshape(B, b - a, W, C)
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
        # rows are already padded (halo or zeros); columns get the layer's own zero padding
        y = mx.conv2d(band, conv.weight, padding=(0, pad))
        return y + conv.bias if "bias" in conv else y

    def _group_stats(self, norm: "GroupNorm", x: mx.array) -> tuple[mx.array, mx.array]:
        """Per (batch, group) mean and variance over all of x, accumulated band by band in float32."""
        B, H, W, C = x.shape
        G = norm.num_groups
        count = H * W * (C // G)
        rows = self._rows(H, B * W * C * 4 * 3)

        def per_group(band):
            # per channel over the rows first, then per group: one sum over axes (1, 3) of the
            # (B, N, G, C/G) view left 32 rows of work to CUDA's row reduce, 91 ms a call on the H200
            # (7.1 of the banded decode's 7.3 s, docs/PERFORMANCE.md round 7)
            return band.reshape(B, -1, C).sum(axis=1).reshape(B, G, C // G).sum(axis=2)

        total = mx.zeros((B, G), mx.float32)
        for a in range(0, H, rows):
            total = total + per_group(x[:, a : a + rows].astype(mx.float32))
            mx.eval(total)
        mean = total / count
        mean_c = mx.repeat(mean, C // G, axis=1)[:, None, None, :]
        sq = mx.zeros((B, G), mx.float32)
        for a in range(0, H, rows):
            sq = sq + per_group(mx.square(x[:, a : a + rows].astype(mx.float32) - mean_c))
            mx.eval(sq)
        var = sq / count
        return mean_c, mx.repeat(mx.rsqrt(var + norm.eps), C // G, axis=1)[:, None, None, :]

    @staticmethod
    def _apply_norm(norm: "GroupNorm", band: mx.array, stats) -> mx.array:
        mean, inv_std = stats
        y = (band.astype(mx.float32) - mean) * inv_std
        return (norm.weight * y + norm.bias).astype(band.dtype)

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
