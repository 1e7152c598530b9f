import os
from pathlib import Path

# huggingface_hub reads these once, at import: set them before any test module imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402

from tests.fixtures import build_tiny_pipeline, build_tiny_redux  # noqa: E402


@pytest.fixture(autouse=True)
def mflux_home(tmp_path, monkeypatch):
    """A fresh, not yet created model store per test, so no test touches ~/.mflux."""
    home = tmp_path / "mflux_home"
    monkeypatch.setenv("MFLUX_HOME", str(home))
    return home


def _tiny(variant: str, folder: str):
    """A session fixture: the tiny `variant` pipeline in a folder named as its Hub repo."""

    @pytest.fixture(scope="session")
    def pipeline(tmp_path_factory) -> Path:
        return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / folder, variant)

    return pipeline


# The tiny pipelines are shared by the whole session: tests must read them, never write into them.
tiny_schnell = _tiny("schnell", "FLUX.1-schnell")
tiny_dev = _tiny("dev", "FLUX.1-dev")
tiny_kontext = _tiny("kontext", "FLUX.1-Kontext-dev")
tiny_fill = _tiny("fill", "FLUX.1-Fill-dev")
tiny_krea = _tiny("krea", "FLUX.1-Krea-dev")
tiny_canny = _tiny("canny", "FLUX.1-Canny-dev")
tiny_depth = _tiny("depth", "FLUX.1-Depth-dev")


@pytest.fixture(scope="session")
def tiny_schnell_unprefixed(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "FLUX.1-schnell-unprefixed"
    return build_tiny_pipeline(folder, "schnell", clip_prefixed=False)


@pytest.fixture(scope="session")
def tiny_redux(tmp_path_factory) -> Path:
    """A tiny FLUX.1-Redux-dev folder (SigLIP keys under `vision_model.`, as the real repo)."""
    return build_tiny_redux(tmp_path_factory.mktemp("tiny") / "FLUX.1-Redux-dev")


@pytest.fixture(scope="session")
def tiny_redux_unprefixed(tmp_path_factory) -> Path:
    return build_tiny_redux(
        tmp_path_factory.mktemp("tiny") / "FLUX.1-Redux-dev-unprefixed", siglip_prefixed=False
    )


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers' VAE posterior sample replaced by its mean: mflux encodes images to the mean, and the
    pipelines that sample (Fill's masked image, Control's map) then encode as mflux does."""
    from diffusers.models.autoencoders import vae as vae_module

    monkeypatch.setattr(
        vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )


@pytest.fixture
def cuda_paths(monkeypatch):
    """The CUDA tuning's paths on this CPU (`mflux.runtime.cuda`, reached through `device.cuda()`), with
    every choice off: a test turns on what it exercises with `cuda.tuned(...)` or `tune(...)`. What needs
    a GPU falls back as it does on a card that can't (the kernels' NVRTC build, the driver's prefetch)."""
    from mflux.runtime import cuda, device

    monkeypatch.setattr(device, "_cuda", cuda)
    off = dict(
        kernels=False,
        avoid_jit=False,
        warm=False,
        load_threads=1,
        cpu_read_min_bytes=None,
        overlap_load=False,
        headroom=None,
        tight_headroom=None,
        train_share=None,
        dequantize_min_rows=None,
        fused_dequantize=False,
        batch_size=1,
    )
    monkeypatch.setattr(cuda, "TUNING", cuda.Tuning(**off))
    return cuda
