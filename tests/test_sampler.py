import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift, retrieve_timesteps

from mflux.errors import InvalidArgument
from mflux.runtime import sampler
from tests.fixtures import SCHEDULER

SCHNELL, DEV = SCHEDULER["schnell"], SCHEDULER["dev"]
SIZES = [(1024, 1024), (512, 768), (1360, 768), (128, 64), (2048, 1024), (256, 256)]


def reference_schedule(config: dict, num_steps: int, height: int, width: int):
    """Sigmas and timesteps exactly as FluxPipeline.__call__ sets them up."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    image_seq_len = (height // 16) * (width // 16)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = calculate_shift(
        image_seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler, timesteps


def ours(config: dict, num_steps: int, height: int, width: int) -> list[float]:
    return sampler.sigmas(
        num_steps,
        (height // 16) * (width // 16),
        config["use_dynamic_shifting"],
        base_seq_len=config["base_image_seq_len"],
        max_seq_len=config["max_image_seq_len"],
        base_shift=config["base_shift"],
        max_shift=config["max_shift"],
    )


@pytest.mark.parametrize("config", [SCHNELL, DEV], ids=["schnell", "dev"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 20, 28, 50])
def test_sigmas_and_timesteps_are_bit_identical(config, num_steps):
    for height, width in SIZES:
        scheduler, timesteps = reference_schedule(config, num_steps, height, width)
        got = ours(config, num_steps, height, width)
        assert got == scheduler.sigmas.tolist()
        # what the transformer is fed: (sigma * 1000) / 1000 in float32
        assert sampler.timesteps(got) == (timesteps.float() / 1000).tolist()


def test_dev_shift_depends_on_resolution():
    small, large = ours(DEV, 4, 256, 256), ours(DEV, 4, 1024, 1024)
    assert small[0] == large[0] == 1.0 and small[-1] == large[-1] == 0.0
    assert all(a < b for a, b in zip(small[1:-1], large[1:-1]))
    assert ours(SCHNELL, 4, 256, 256) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(InvalidArgument):
        sampler.sigmas(0, 256, False)


@pytest.mark.parametrize(
    "dtype", [(torch.float32, mx.float32), (torch.bfloat16, mx.bfloat16)], ids=["float32", "bfloat16"]
)
def test_euler_steps_equal_scheduler_step(dtype):
    torch_dtype, mx_dtype = dtype
    scheduler, timesteps = reference_schedule(DEV, 6, 256, 384)
    sig = ours(DEV, 6, 256, 384)
    scheduler.set_begin_index(0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 384, 64, generator=g).to(torch_dtype)
    x = mx.array(latents.float().numpy()).astype(mx_dtype)
    for i, t in enumerate(timesteps):
        v = (3 * torch.randn(1, 384, 64, generator=g)).to(torch_dtype)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        x = sampler.euler_step(x, mx.array(v.float().numpy()).astype(mx_dtype), sig[i], sig[i + 1])
        assert x.dtype == mx_dtype and latents.dtype == torch_dtype
        np.testing.assert_array_equal(np.array(x.astype(mx.float32)), latents.float().numpy())


@pytest.mark.parametrize("height,width", [(128, 128), (64, 128), (128, 48), (1024, 768), (100, 130)])
def test_pack_unpack_equal_diffusers(height, width):
    h, w = 2 * (height // 16), 2 * (width // 16)
    z = torch.randn(2, 16, h, w)
    packed_ref = FluxPipeline._pack_latents(z, 2, 16, h, w)
    packed = sampler.pack(mx.array(z.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_array_equal(np.array(packed), packed_ref.numpy())

    unpacked_ref = FluxPipeline._unpack_latents(packed_ref, height, width, 8)
    unpacked = sampler.unpack(packed, height, width)
    np.testing.assert_array_equal(np.array(unpacked), unpacked_ref.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.array(unpacked), z.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize("height,width", [(128, 128), (64, 128), (1024, 768), (100, 130)])
def test_image_ids_equal_diffusers(height, width):
    h, w = 2 * (height // 16), 2 * (width // 16)
    ref = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    ids = sampler.image_ids(height, width)
    assert ids.shape == (1, (height // 16) * (width // 16), 3)
    np.testing.assert_array_equal(np.array(ids)[0], ref.numpy())


def test_text_ids_and_noise():
    assert sampler.text_ids(7).shape == (1, 7, 3) and not np.array(sampler.text_ids(7)).any()
    a, b = sampler.noise(42, 128, 96), sampler.noise(42, 128, 96)
    assert a.shape == (1, 8 * 6, 64) and a.dtype == mx.float32
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert not np.array_equal(np.array(a), np.array(sampler.noise(43, 128, 96)))
    n = np.array(sampler.noise(0, 1024, 1024))
    assert abs(n.mean()) < 0.02 and abs(n.std() - 1) < 0.02
