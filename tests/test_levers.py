"""The transformer's per-generation path (positions, modulations, predict) against its plain call, and
the benchmark harness as the README runs it."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mflux.errors import MfluxError
from mflux.runtime import layers
from mflux.runtime.model import Flux, FluxParams
from tests.test_transformer import CONFIG as TRANSFORMER_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {**TRANSFORMER_CONFIG, "guidance_embeds": True}
ROWS, COLS, TXT, BATCH = 4, 6, 8, 2


def _model() -> Flux:
    mx.random.seed(0)
    flux = Flux(FluxParams.from_diffusers_config(CONFIG))
    # every parameter random, norms and modulation biases too, so a lost 1 + scale shows
    flux.update(_randomized(flux))
    return flux


def _randomized(flux: Flux) -> dict:
    from mlx.utils import tree_unflatten

    params = [
        (k, mx.random.normal(v.shape) * (v.shape[-1] ** -0.5 if v.ndim > 1 else 0.3))
        for k, v in tree_flatten(flux.parameters())
    ]
    return tree_unflatten(params)


def _inputs():
    rng = np.random.default_rng(1)
    img_ids = np.zeros((1, ROWS * COLS, 3), np.float32)
    img_ids[0, :, 1] = np.repeat(np.arange(ROWS), COLS)
    img_ids[0, :, 2] = np.tile(np.arange(COLS), ROWS)
    return {
        "img": mx.array(rng.standard_normal((BATCH, ROWS * COLS, 64), dtype=np.float32)),
        "img_ids": mx.broadcast_to(mx.array(img_ids), (BATCH, ROWS * COLS, 3)),
        "txt": mx.array(rng.standard_normal((BATCH, TXT, 64), dtype=np.float32)),
        "txt_ids": mx.zeros((BATCH, TXT, 3)),
        "y": mx.array(rng.standard_normal((BATCH, 64), dtype=np.float32)),
        "g": mx.array([3.5, 4.0]),
    }


def _relative(a: mx.array, b: mx.array) -> float:
    a, b = np.array(a), np.array(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_precomputed_modulations_match_the_plain_call():
    flux, x = _model(), _inputs()
    timesteps = [1.0, 0.7305, 0.25]
    pe = flux.positions(x["img_ids"], x["txt_ids"])
    mods = flux.modulations(timesteps, x["y"], x["g"])
    K = 12 * CONFIG["num_layers"] + 3 * CONFIG["num_single_layers"] + 2
    assert mods.shape == (len(timesteps), BATCH, K, 64)
    for i, t in enumerate(timesteps):
        plain = flux(x["img"], x["img_ids"], x["txt"], x["txt_ids"], mx.full((BATCH,), t), x["y"], x["g"])
        fast = flux.predict(x["img"], x["txt"], pe, mods[i])
        err = _relative(fast, plain)
        print(f"t={t}: relative difference {err:.1e}")
        assert err < 1e-5
    # a different timestep gives a different step: the rows really depend on t
    other = flux.predict(x["img"], x["txt"], pe, mods[2])
    assert _relative(other, flux.predict(x["img"], x["txt"], pe, mods[0])) > 1e-3


def test_modulation_rows_hold_one_plus_scale():
    flux = _model()
    vec = mx.random.normal((BATCH, 64))
    block = flux.single_blocks[0]
    raw = block.modulation.lin(vec * mx.sigmoid(vec)).reshape(BATCH, 3, 64)
    mod = block.modulations(vec)
    np.testing.assert_allclose(np.array(mod[:, 1]), np.array(raw[:, 1] + 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.array(mod[:, 0]), np.array(raw[:, 0]))
    np.testing.assert_array_equal(np.array(mod[:, 2]), np.array(raw[:, 2]))


def test_batch_one_fused_layer_norm_matches_the_batched_path():
    # batch 1 takes mx.fast.layer_norm's own affine; larger batches a separate pass
    x = mx.random.normal((3, 5, 64))
    shift, scale1 = mx.random.normal((3, 64)), 1 + mx.random.normal((3, 64))
    both = layers.modulate(x, shift, scale1)
    for i in range(3):
        one = layers.modulate(x[i : i + 1], shift[i : i + 1], scale1[i : i + 1])
        assert _relative(one, both[i : i + 1]) < 1e-5


def test_free_modulation_weights():
    flux, x = _model(), _inputs()
    pe = flux.positions(x["img_ids"], x["txt_ids"])
    mods = flux.modulations([0.5], x["y"], x["g"])
    before = flux.predict(x["img"], x["txt"], pe, mods[0])
    modulation_layers = [flux.time_in, flux.vector_in, flux.guidance_in, flux.final_layer.adaLN_modulation]
    modulation_layers += [m for b in flux.double_blocks for m in (b.img_mod, b.txt_mod)]
    modulation_layers += [b.modulation for b in flux.single_blocks]
    dropped = sum(_count(m) for m in modulation_layers)
    before_count = _count(flux)
    flux.free_modulation_weights()
    assert before_count - _count(flux) == dropped
    np.testing.assert_array_equal(np.array(flux.predict(x["img"], x["txt"], pe, mods[0])), np.array(before))
    with pytest.raises(MfluxError, match="freed"):
        flux(x["img"], x["img_ids"], x["txt"], x["txt_ids"], mx.array([0.5, 0.5]), x["y"], x["g"])


def _count(module) -> int:
    return sum(
        v.size
        for _, v in tree_flatten(
            module.parameters() if hasattr(module, "parameters") else [m.parameters() for m in module]
        )
    )


def _bench(*args: str, timeout: int = 180) -> str:
    cmd = [
        sys.executable,
        str(ROOT / "bench/bench_flux.py"),
        "--size",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "1",
    ]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, check=True).stdout


def test_bench_flux_tiny_runs_every_section():
    # firstrun starts child processes of the pipeline section; it has its own test below
    sections = "step,levers,qmatmul,micro,decode,encode,pipeline,load"
    out = _bench("--sections", sections)
    figures = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    seen = {f["what"] for f in figures}
    assert {
        "step",
        "lever",
        "single_block",
        "single_block_parts",
        "double_block",
        "encode",
        "decode",
        "load",
    } <= seen
    assert "skipped" not in seen
    assert {"qmatmul", "pipeline", "decode_diff"} <= seen
    steps = [f for f in figures if f["what"] == "step"]
    # every quantized path is timed (the kernel path falls back to mx.dequantize off CUDA), each with
    # its peak memory and the bound
    assert {(f["variant"], f["quant"], f["path"]) for f in steps} == {
        (v, q, p)
        for v in ("schnell", "dev")
        for q, p in [("fp32", "float")]
        + [(q, p) for q in ("q8", "q4") for p in ("qmm", "dequant", "fused", "kernel")]
    }
    assert all(f["s"] > 0 and f["peak_gb"] > 0 for f in steps)
    assert all("bound_gb" in f for f in steps if f["quant"] != "fp32")
    pipe = {f["quant"]: f for f in figures if f["what"] == "pipeline"}
    assert set(pipe) == {"fp32", "q8", "q4"}
    # the transformer is freed before the decode, and T5/CLIP before the transformer loads
    for f in pipe.values():
        assert f["load_transformer_start_gb"] < f["text_weights_gb"] / 2
        assert f["load_vae_start_gb"] < f["transformer_weights_gb"] / 2
        # as `mflux run`: the conditioning layers are dropped before the first step (what it holds)
        assert f["denoiser_weights_gb"] < 0.9 * f["transformer_weights_gb"]
        assert f["denoise_0_start_gb"] < f["transformer_weights_gb"]
    assert pipe["q4"]["transformer_weights_gb"] < pipe["fp32"]["transformer_weights_gb"] / 4
    bpp = {
        (f["quant"], f["component"]): f["bytes_per_param"] for f in figures if f["what"] == "bytes_per_param"
    }
    assert bpp[("fp32", "transformer")] == pytest.approx(4.0, rel=0.01)
    assert bpp[("q4", "vae")] == pytest.approx(4.0, rel=0.02)  # never quantized
    assert bpp[("q8", "transformer")] < 1.2 and bpp[("q4", "transformer")] < 0.7
    assert "| figure |" in out  # the closing table


def test_bench_firstrun_times_an_empty_and_a_warm_cache(tmp_path):
    out = _bench("--sections", "firstrun", "--quant", "q4", "--ptx-cache", str(tmp_path))
    runs = [json.loads(line) for line in out.splitlines() if line.startswith('{"what": "firstrun"')]
    assert [r["cache"] for r in runs] == ["empty", "warm"]
    assert all(r["quant"] == "q4" and r["first_image_s"] > 0 and r["second_image_s"] > 0 for r in runs)
    assert all(r["modules_built"] == 0 for r in runs)  # MLX's CPU backend compiles no kernels at run time


@pytest.mark.parametrize("script", ["bench_flux.py", "bench_cpu.py", "peer.py"])
def test_bench_help(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, check=True
    )
    assert "usage:" in out.stdout
