"""Building MLX's run-time kernels in a second process while the first one loads weights (issue 12, target 3).

On CUDA, MLX builds each `mx.compile`d graph's kernels with NVRTC the first time a process needs them,
unless its kernel cache (`mflux.backend.kernel_cache_dir`) holds them already: on the H200 a fresh
process spent 10.8 s building the transformer's four modules, inside the first step
(`bench/probe_first.py`, round 3 in docs/PERFORMANCE.md). A module's name comes from its graph and
dtypes, not from the array sizes, so a tiny model of the same code builds the same modules.

So the first time a `Flux1` on CUDA loads a component, `start` launches a child process that runs the
engine's code paths (`exercise`) on tiny random models of the same dtype and quantization: the
encoders, modulations, steps at batch 1 and 2 and with true CFG, the decode and the image encode.
That child builds into its own staging folder, then moves what it built into the cache (each file
renamed into place, a module's kernel list before its code, so no process reads a half-written one)
and leaves a marker there. Meanwhile the parent reads the weights and encodes the prompts (the
encoders use no run-time kernels on CUDA, `mflux.runtime.jitfree`); before its first transformer
computation it waits for the child (`Warmup.wait`), then finds every module in the cache. With the
marker present, later processes start no child.

The child costs a CUDA context and tiny models on the same GPU (a few hundred MB) and one CPU core,
for the seconds it runs. `WARM` says where it runs: on Metal MLX builds its kernels too, but no Mac was
measured, so Metal keeps today's behaviour; the CPU backend builds compiled graphs with the system
compiler into its own temporary folder, which MLX_PTX_CACHE_DIR does not move.
"""

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from mflux.runtime.qmatmul import backend
from mflux.runtime.quantization import QuantSpec

WARM = {"cuda": True, "metal": False, "cpu": False}
WAIT_S = 90  # the most the first transformer computation waits for the child; then it builds for itself
STALE_S = 3600  # a staging folder this old was left by a process that died
MARKER = "mflux-warm-{}.done"
STAGING = ".mflux-warm-"
LOG = "mflux-warm.log"  # the child's output; a failed child's is moved beside the cache


def key(dtype: mx.Dtype, spec: QuantSpec | None, guidance: bool) -> str:
    """What the built kernels depend on: MLX's and mflux's code, the dtype, the quantization, dev or not."""
    from importlib.metadata import version

    what = [mx.__version__, version("mflux"), str(dtype), spec.to_dict() if spec else None, guidance]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


class Warmup:
    """A child process building kernels into `staging`; `wait` before the first computation that needs them."""

    def __init__(self, proc: subprocess.Popen, staging: Path):
        self.proc, self.staging = proc, staging
        atexit.register(self.stop)

    def wait(self, timeout: float = WAIT_S) -> bool:
        """Whether the child finished (and published its kernels) within `timeout` seconds."""
        try:
            return self.proc.wait(timeout) == 0
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        """Kill the child if it still runs, and remove its staging folder; a failed child's output is
        kept as <cache>/mflux-warm.log."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        elif self.proc.returncode and (self.staging / LOG).exists():
            os.replace(self.staging / LOG, self.staging.parent / LOG)
        shutil.rmtree(self.staging, ignore_errors=True)


def start(
    dtype: mx.Dtype, spec: QuantSpec | None, guidance: bool, cache: Path | None = None
) -> Warmup | None:
    """The child for this backend, dtype and quantization, or None where none is needed (`WARM`, or the
    cache holds its marker already) or the cache folder can't be written."""
    if not WARM[backend()]:
        return None
    cache = Path(cache or os.environ.get("MLX_PTX_CACHE_DIR") or "")
    if not str(cache):
        return None
    k = key(dtype, spec, guidance)
    if (cache / MARKER.format(k)).exists():
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _remove_stale(cache)
        staging = Path(_mkdtemp(cache))
    except OSError:
        return None  # a read-only cache: MLX builds in-process, as without this
    args = {
        "dtype": str(dtype).split(".")[-1],
        "spec": spec.to_dict() if spec else None,
        "guidance": guidance,
    }
    args |= {"cache": str(cache), "marker": MARKER.format(k)}
    with open(staging / LOG, "w") as log:  # kept only if the child fails (see Warmup.stop)
        proc = subprocess.Popen(
            [sys.executable, "-m", "mflux.runtime.warmup", json.dumps(args)],
            env={**os.environ, "MLX_PTX_CACHE_DIR": str(staging)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    return Warmup(proc, staging)


def _mkdtemp(cache: Path) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=STAGING, dir=cache)


def _remove_stale(cache: Path) -> None:
    now = time.time()
    for p in cache.glob(STAGING + "*"):
        try:
            if now - p.stat().st_mtime > STALE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def publish(staging: Path, cache: Path, marker: str) -> None:
    """Move what was built in `staging` into `cache`, then write the marker. Each file is renamed into
    place (atomic on one file system), a module's kernel list and source before its code: MLX takes
    a module as cached once its code file (.ptx) exists."""
    files = sorted(p for p in staging.iterdir() if p.is_file() and p.name != LOG)
    for p in [*(p for p in files if p.suffix != ".ptx"), *(p for p in files if p.suffix == ".ptx")]:
        os.replace(p, cache / p.name)
    (cache / marker).write_text(json.dumps({"built": [p.stem for p in files if p.suffix == ".ptx"]}))


# ---------------------------------------------------------------- what the child runs


def tiny_models(dtype: mx.Dtype, spec: QuantSpec | None, guidance: bool) -> dict:
    """FLUX.1's four networks, one block or layer each at small widths, random weights in `dtype`,
    quantized under `spec` as the loader quantizes them. Real FLUX.1 kernels have the same graphs."""
    from mflux.runtime.autoencoder import Autoencoder, AutoencoderConfig
    from mflux.runtime.clip import CLIPTextConfig, CLIPTextModel
    from mflux.runtime.model import Flux, FluxParams
    from mflux.runtime.t5 import T5Config, T5Encoder

    flux = FluxParams.from_diffusers_config(
        {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "joint_attention_dim": 64}
        | {"pooled_projection_dim": 64, "guidance_embeds": guidance}
    )
    modules = {
        "transformer": Flux(flux),
        "text_encoder": CLIPTextModel(
            CLIPTextConfig(
                vocab_size=64,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
            )
        ),
        "text_encoder_2": T5Encoder(
            T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)
        ),
        "vae": Autoencoder(AutoencoderConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1)),
    }
    for component, module in modules.items():
        _randomize(module, component, dtype, spec)
    return modules


def _randomize(module, component: str, dtype: mx.Dtype, spec: QuantSpec | None) -> None:
    from mlx.utils import tree_flatten

    from mflux.runtime.loader import cast_and_quantize
    from mflux.runtime.quantization import quantize_model_from_weights

    weights = {
        n: mx.random.normal(p.shape) * p.shape[-1] ** -0.5 if p.ndim >= 2 else p
        for n, p in tree_flatten(module.parameters())
    }
    weights = cast_and_quantize(component, weights, dtype, spec)
    if spec is not None:
        quantize_model_from_weights(module, weights, lambda path: spec)
    module.load_weights(list(weights.items()), strict=True)
    mx.eval(module.parameters())


def exercise(models: dict, dtype: mx.Dtype, guidance: bool) -> None:
    """The engine's computations at 32x32 pixels: what text-to-image (batches, true CFG), img2img and
    inpainting run, each evaluated as the engine evaluates it."""
    from mflux.runtime import engine, memory

    height = width = 32
    clip_ids = np.full((1, 77), 2, dtype=np.int32)
    clip_ids[0, :4] = [63, 5, 6, 2]
    t5_ids = np.array([[5, 6, 7, 1, 0, 0, 0, 0]], dtype=np.int32)
    txt, pooled = engine.encode_prompt(
        models["text_encoder"], models["text_encoder_2"], clip_ids, t5_ids, dtype
    )
    memory.evaluate(txt, pooled)
    flux, vae = models["transformer"], models["vae"]
    sigmas = engine.schedule(2, engine._seq_len(height, width), None)
    g = 3.5 if guidance else None
    latents = None
    # (latent rows, text rows): one image, a batch of two, one image with true CFG
    for b, rows, cfg in ((1, 1, 1.0), (2, 2, 1.0), (1, 2, 3.0)):
        noise = mx.random.normal((b, engine._seq_len(height, width), 64)).astype(dtype)
        mods = engine.modulations(flux, mx.concatenate([pooled] * rows), sigmas, g)
        txt_rows = mx.concatenate([txt] * rows)
        for latents in engine.denoise(flux, txt_rows, noise, sigmas, height, width, mods, cfg):
            memory.evaluate(latents)
    pixels = engine.decode(vae, latents[:1], height, width)
    image = engine.encode_image(vae, pixels, dtype)
    mask = engine.latent_mask(np.ones((height, width), dtype=bool), height, width).astype(dtype)
    for latents in engine.denoise(
        flux, txt, image, sigmas, height, width, mods[:, :1], 1.0, image, mask, noise[:1]
    ):
        memory.evaluate(latents)


def main(argv: list[str]) -> int:
    args = json.loads(argv[0])
    try:
        os.nice(10)  # the parent's loading threads come first
    except OSError:
        pass
    dtype = getattr(mx, args["dtype"])
    spec = QuantSpec.from_dict(args["spec"]) if args["spec"] else None
    exercise(tiny_models(dtype, spec, args["guidance"]), dtype, args["guidance"])
    mx.synchronize()
    publish(Path(os.environ["MLX_PTX_CACHE_DIR"]), Path(args["cache"]), args["marker"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
