"""The FLUX.1 VAE (diffusers' AutoencoderKL) in MLX: NHWC activations, OHWI conv weights, diffusers' names."""

from dataclasses import dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn

from mflux.errors import MfluxError


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

    def decode(self, z: mx.array) -> mx.array:
        """(B, h, w, C_latent) in VAE space (see `unscale`) -> (B, 8h, 8w, 3), roughly in [-1, 1]."""
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

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
