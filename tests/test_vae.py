import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from mflux.errors import MfluxError
from mflux.runtime.autoencoder import Autoencoder, AutoencoderConfig
from mflux.runtime.loader import cast_and_quantize, check_keys, read_weights
from tests.fixtures import TINY_VAE

CONFIG = TINY_VAE
# float32 bound, relative to the largest reference value
F32_BOUND = 1e-4


def random_vae(seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**CONFIG, **overrides}).eval()
    # default init leaves norms at (1, 0) and hides a swapped scale/shift; perturb them
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae


def load(folder, dtype=None) -> Autoencoder:
    config = AutoencoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = Autoencoder(config)
    weights = read_weights(folder, "vae", "hf")
    check_keys(weights, model, "vae")
    if dtype is not None:
        weights = cast_and_quantize("vae", weights, dtype, None)
    model.load_weights(list(weights.items()), strict=True)
    return model


def nhwc(t: torch.Tensor) -> mx.array:
    return mx.array(t.float().permute(0, 2, 3, 1).numpy())


def nchw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    vae = random_vae()
    vae.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 8, 12, generator=g)  # non-square latent -> 64x96 image
    x = torch.rand(1, 3, 64, 96, generator=g) * 2 - 1
    with torch.no_grad():
        decoded, encoded = vae.decode(z).sample, vae.encode(x).latent_dist.mean
    return folder, z, x, decoded, encoded


def test_config_from_diffusers_json(saved):
    folder = saved[0]
    config = AutoencoderConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert config.block_out_channels == (32, 32, 64, 64) and config.latent_channels == 16
    assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)
    assert not config.use_quant_conv and config.mid_block_add_attention
    assert AutoencoderConfig.from_dict({"shift_factor": None, "foo": 1}).shift_factor == 0.0
    with pytest.raises(MfluxError, match="down_block_types"):
        AutoencoderConfig.from_dict({"down_block_types": ["AttnDownEncoderBlock2D"]})


@pytest.mark.parametrize(
    "overrides",
    [{}, {"use_quant_conv": True, "use_post_quant_conv": True}, {"mid_block_add_attention": False}],
)
def test_names_and_shapes_match_diffusers(overrides):
    small = {"block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2}
    small["up_block_types"] = ("UpDecoderBlock2D",) * 2
    vae = AutoencoderKL(**{**CONFIG, **small, **overrides})
    ours = Autoencoder(AutoencoderConfig.from_dict(dict(vae.config)))
    theirs = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    mine = {k: v.shape for k, v in _flat(ours.parameters())}
    assert set(mine) == set(theirs)
    for k, shape in theirs.items():
        # OIHW -> OHWI
        assert mine[k] == (shape if len(shape) != 4 else (shape[0], shape[2], shape[3], shape[1])), k


def _flat(tree, prefix=""):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_decode_and_encode_float32(saved):
    folder, z, x, decoded, encoded = saved
    model = load(folder)
    out = nchw(model.decode(nhwc(z)))
    assert out.shape == (1, 3, 64, 96)
    err = np.abs(out - decoded.numpy()).max() / np.abs(decoded.numpy()).max()
    print(f"decode float32: max |diff| / max |ref| = {err:.2e}")
    assert err < F32_BOUND

    mean = nchw(model.encode(nhwc(x)))
    assert mean.shape == (1, 16, 8, 12)
    err = np.abs(mean - encoded.numpy()).max() / np.abs(encoded.numpy()).max()
    print(f"encode float32: max |diff| / max |ref| = {err:.2e}")
    assert err < F32_BOUND


def test_decode_and_encode_bfloat16(saved):
    """MLX in bf16 must be about as close to the float32 reference as diffusers in bf16 is."""
    folder, z, x, decoded, encoded = saved
    model = load(folder, dtype=mx.bfloat16)
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        torch_dec = vae.decode(z.bfloat16()).sample.float().numpy()
        torch_enc = vae.encode(x.bfloat16()).latent_dist.mean.float().numpy()
    dec = model.decode(nhwc(z).astype(mx.bfloat16))
    enc = model.encode(nhwc(x).astype(mx.bfloat16))
    assert dec.dtype == enc.dtype == mx.bfloat16
    for what, ours, theirs, ref in [
        ("decode", nchw(dec), torch_dec, decoded.numpy()),
        ("encode", nchw(enc), torch_enc, encoded.numpy()),
    ]:
        scale = np.abs(ref).max()
        ours_max, theirs_max = np.abs(ours - ref).max() / scale, np.abs(theirs - ref).max() / scale
        ours_mean, theirs_mean = np.abs(ours - ref).mean() / scale, np.abs(theirs - ref).mean() / scale
        print(
            f"{what} bfloat16 vs float32 reference, relative to max |ref|: "
            f"mlx max {ours_max:.2e} mean {ours_mean:.2e}; diffusers max {theirs_max:.2e} mean {theirs_mean:.2e}"
        )
        assert ours_max < 0.1 and ours_max < 2 * theirs_max
        assert ours_mean < 2 * theirs_mean


def test_legacy_attention_names_and_quant_convs(tmp_path):
    """Old exports name the mid attention query/key/value/proj_attn, sometimes as 1x1 convs."""
    small = dict(
        block_out_channels=(32, 64), layers_per_block=1, use_quant_conv=True, use_post_quant_conv=True
    )
    small["down_block_types"], small["up_block_types"] = (
        ("DownEncoderBlock2D",) * 2,
        ("UpDecoderBlock2D",) * 2,
    )
    vae = random_vae(seed=3, **small)
    vae.save_pretrained(tmp_path)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in vae.state_dict().items():
        for new, old in legacy.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        state[k] = v.contiguous()
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    assert any("proj_attn" in k for k in state)

    model = load(tmp_path)
    g = torch.Generator().manual_seed(2)
    z, x = torch.randn(1, 16, 6, 4, generator=g), torch.rand(1, 3, 24, 16, generator=g) * 2 - 1
    with torch.no_grad():
        decoded, encoded = vae.decode(z).sample.numpy(), vae.encode(x).latent_dist.mean.numpy()
    for ours, ref in [(nchw(model.decode(nhwc(z))), decoded), (nchw(model.encode(nhwc(x))), encoded)]:
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < F32_BOUND * np.abs(ref).max()


def test_scale_and_unscale_match_flux_pipeline(saved):
    model = load(saved[0])
    z = torch.randn(1, 16, 4, 6)
    vae_space = model.unscale(nhwc(z))
    np.testing.assert_allclose(nchw(vae_space), (z / 0.3611 + 0.1159).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(nchw(model.scale(vae_space)), z.numpy(), rtol=1e-5, atol=1e-6)


# The banded decoder sums each group norm's statistics per row, a band of rows at a time, as GroupNorm
# does for the whole tensor (autoencoder.GroupNorm), and its convolutions and attention compute each
# output row from the same inputs: so the two paths give the same bits, in bfloat16 too. (With MLX's
# fused layer norm on the whole tensor they differed here by up to 11/255 in bfloat16, a mean 0.99.)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_banded_decode_equals_the_whole_tensor_decode(saved, monkeypatch, dtype):
    import mflux.runtime.autoencoder as ae

    folder, *_ = saved
    model = load(folder, dtype=dtype)
    z = nhwc(torch.randn(1, 16, 16, 12, generator=torch.Generator().manual_seed(2))).astype(dtype)
    whole = model.decode(z, band_bytes=None)
    joins = []
    join = ae.BandedDecoder._join
    monkeypatch.setattr(
        ae.BandedDecoder, "_join", staticmethod(lambda bands: joins.append(len(bands)) or join(bands))
    )
    banded = model.decode(z, band_bytes=2**14)
    assert len(joins) > 10 and max(joins) >= 16  # every layer ran in bands, the largest in many
    assert banded.dtype == whole.dtype == dtype
    assert mx.array_equal(banded, whole)


def test_attention_in_chunks_of_queries_is_the_same_attention(saved, monkeypatch):
    """Attention.chunks: a few query rows at a time against every key, in both decode paths; the
    result is the one-shot attention's (float32: to rounding), and the two paths stay bit-equal."""
    import mflux.runtime.autoencoder as ae

    folder, *_ = saved
    model = load(folder)
    att = model.decoder.mid_block.attentions[0]
    x = mx.random.normal((1, 8, 6, att.to_q.weight.shape[0]), key=mx.random.key(3))
    one_shot = att(x)
    row = 1 * 6 * 8 * 6 * 4 * 3  # one query row's scores
    monkeypatch.setattr(ae, "ATTENTION_BYTES", 3 * row)
    assert [a for a, _ in att.chunks(x)] == [0, 3, 6]
    np.testing.assert_allclose(np.array(att(x)), np.array(one_shot), rtol=1e-5, atol=1e-5)
    joins = []
    join = ae.BandedDecoder._join
    monkeypatch.setattr(
        ae.BandedDecoder, "_join", staticmethod(lambda bands: joins.append(len(bands)) or join(bands))
    )
    banded = ae.BandedDecoder(model.decoder, 2**10).attention(att, x)  # bands far smaller than a chunk
    assert joins == [3] and mx.array_equal(banded, att(x))  # the whole tensor's chunks, not the band's
    z = nhwc(torch.randn(1, 16, 16, 12, generator=torch.Generator().manual_seed(4))).astype(mx.bfloat16)
    model = load(folder, dtype=mx.bfloat16)
    monkeypatch.setattr(ae, "ATTENTION_BYTES", 16 * 16 * 16 * 4 * 3 * 5)  # 5 of the latent's 16 rows
    assert mx.array_equal(model.decode(z, band_bytes=2**14), model.decode(z, band_bytes=None))


def test_small_decodes_keep_the_whole_tensor_path(saved):
    from mflux.runtime.autoencoder import BAND_BYTES, BandedDecoder

    folder, *_ = saved
    model = load(folder)
    z = mx.zeros((1, 16, 16, 16))  # a 128 px image: far below one band
    assert not BandedDecoder(model.decoder, BAND_BYTES).needed(z)
    # the real VAE's widths at 1024x1024 need bands
    full = Autoencoder(AutoencoderConfig())
    assert BandedDecoder(full.decoder, BAND_BYTES).needed(mx.zeros((1, 128, 128, 16), mx.bfloat16))
