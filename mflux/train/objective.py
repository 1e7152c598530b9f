"""The training objective: rectified-flow matching as diffusers' train_dreambooth_lora_flux.py has it.

- x_t = (1 - sigma) * x0 + sigma * noise, on the packed latents (the script noises before packing;
  packing only moves elements, so it is the same);
- target = noise - x0, loss = mean squared error, weighting scheme "none" (every sigma weighs 1);
- sigma: u ~ U[0, 1), index = int(u * 1000) into the scheduler's training sigmas (descending from 1 to
  1/1000; `shift` applied unless the scheduler shifts dynamically, so uniform for schnell and dev);
- the transformer gets timestep = (sigma * 1000) / 1000 in float32, and dev gets guidance 3.5 (the
  script's --guidance_scale default).
"""

import mlx.core as mx
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
DEV_GUIDANCE = 3.5


def training_sigmas(scheduler: dict) -> tuple[mx.array, mx.array]:
    """(sigmas, timesteps) of FlowMatchEulerDiscreteScheduler at init, index 0 the noisiest, float32."""
    n = int(scheduler.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
    s = (np.linspace(1, n, n, dtype=np.float32)[::-1] / n).astype(np.float32)
    if not scheduler.get("use_dynamic_shifting"):
        shift = np.float32(scheduler.get("shift", 1.0))
        s = shift * s / (1 + (shift - 1) * s)
    t = s * np.float32(n)  # scheduler.timesteps; the script passes timesteps / 1000
    return mx.array(s), mx.array(t / np.float32(1000))


def sample_sigmas(key: mx.array, batch: int, table: tuple[mx.array, mx.array]) -> tuple[mx.array, mx.array]:
    """(sigma, timestep) for each row: the script's uniform index into the training sigmas."""
    sigmas, timesteps = table
    idx = (mx.random.uniform(shape=(batch,), key=key) * sigmas.shape[0]).astype(mx.int32)
    return sigmas[idx], timesteps[idx]


def flow_loss(
    flux,
    x0: mx.array,  # (B, L, 64) packed clean latents
    noise: mx.array,  # (B, L, 64)
    sigma: mx.array,  # (B,)
    timestep: mx.array,  # (B,)
    txt: mx.array,  # (B, S, context)
    pooled: mx.array,  # (B, vec)
    pe: tuple[mx.array, mx.array],
    guidance: mx.array | None = None,  # (B,), dev only
    checkpoint: bool = True,
) -> mx.array:
    s = sigma[:, None, None]
    noisy = (1 - s) * x0 + s * noise
    mod = flux.block_modulations(flux.conditioning(timestep, pooled, guidance))  # (B, K, hidden)
    pred = flux.predict(noisy, txt, pe, mod, checkpoint=checkpoint)
    return mx.mean(mx.square(pred.astype(mx.float32) - (noise - x0)))
