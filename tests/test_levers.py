"""The transformer's per-generation path (positions, modulations, predict) against its plain call, and
the benchmarks in bench/ at their tiny size, as CI can run them."""

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
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")
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


def _bench(script: str, *args: str) -> list[dict]:
    """The figures (JSON lines) a benchmark prints; it must exit 0."""
    cmd = [sys.executable, str(ROOT / "bench" / script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_bench_steps_times_each_quantization_the_matmuls_and_the_decode():
    args = "--size tiny --steps 1 --warmup 1 --variants schnell --layers qkv --band-mb 0,0.01"
    figures = _bench("steps.py", *args.split())
    steps = {f["quant"]: f for f in figures if f["what"] == "step"}
    assert set(steps) == {"fp32", "q8", "q4"}  # float32 on a CPU
    assert all(f["s"] > 0 and f["peak_gb"] >= f["weights_gb"] > 0 for f in steps.values())
    assert steps["q4"]["weights_gb"] < steps["fp32"]["weights_gb"] / 4
    # a quantized step's bound: its weights, one dequantized layer, the float step's activations
    assert "bound_gb" not in steps["fp32"] and steps["q8"]["bound_gb"] > steps["q8"]["weights_gb"]
    matmul = [f for f in figures if f["what"] == "matmul"]
    assert [f["rows"] for f in matmul] == [1, 16, 32]  # 1 row, the text, the step's tokens (16 + 16)
    assert all(
        f[f"{k}_ms"] > 0 for f in matmul for k in ("float", "q8_qmm", "q8_dequant", "q4_qmm", "q4_dequant")
    )
    decode = {f["band_mb"]: f for f in figures if f["what"] == "decode"}
    assert decode[0.01]["over_weights_gb"] < decode[0]["over_weights_gb"] / 2  # bands hold less
    (diff,) = [f for f in figures if f["what"] == "decode_diff"]
    assert diff["max_diff_255"] == 0  # the same pixels (on this CPU, bit for bit: tests/test_vae.py)


def test_bench_load_reads_and_makes_first_images():
    figures = _bench("load.py", "--size", "tiny", "--layout", "mlx", "--quant", "bf16,q4")
    reads = {f["stored"]: f for f in figures if f["what"] == "read"}
    assert set(reads) == {"fp32", "q4"}
    for f in reads.values():
        assert f["gb_per_s"] > 0 and f["s"] == pytest.approx(sum(f[f"{c}_s"] for c in COMPONENTS), rel=1e-3)
    assert reads["q4"]["transformer_gb"] < reads["fp32"]["transformer_gb"] / 4
    firsts = [f for f in figures if f["what"] == "first"]
    assert [f["stored"] for f in firsts] == ["fp32", "q4"]
    assert all(f["load_plus_first_s"] > f["load_s"] > 0 and f["second_image_s"] > 0 for f in firsts)


def test_bench_memory_gives_each_phase_its_peak():
    figures = _bench(
        "memory.py", "--size", "tiny", "--quant", "bf16,q4", "--images", "1", "--image-steps", "1"
    )
    runs = {f["stored"]: f for f in figures if f["what"] == "memory"}
    assert set(runs) == {"fp32", "q4"}
    for f in runs.values():
        phases = [f[f"{k}_peak_gb"] for k in ("text_encoding", "denoising", "decoding")]
        assert f["peak_gb"] == max(phases) and min(phases) > 0
        assert f["denoising_peak_gb"] > f["transformer_weights_gb"]  # the transformer is held then
    assert runs["q4"]["denoising_peak_gb"] < runs["fp32"]["denoising_peak_gb"]


def test_bench_train_runs_mflux_and_diffusers():
    figures = _bench(
        "train.py",
        "--size",
        "tiny",
        "--res",
        "64",
        "--txt",
        "16",
        "--quant",
        "bf16",
        "--steps",
        "1",
        "--warmup",
        "1",
    )
    assert [f["impl"] for f in figures] == ["mflux", "diffusers"]  # --impl both, the default
    assert all("error" not in f and f["step_s"] > 0 and f["lora_params"] > 0 for f in figures), figures


@pytest.mark.parametrize(
    "script, args, error",
    [
        ("steps.py", ["--tune", "kernels=false"], "runs only on CUDA"),
        ("train.py", ["--impl", "mflux,diffusers"], "invalid choice"),
        ("load.py", ["--empty-cache"], "needs --kernel-cache"),
    ],
)
def test_bench_refuses_in_one_line(script, args, error):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True
    )
    assert out.returncode == 2 and error in out.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    "script", ["steps.py", "load.py", "memory.py", "train.py", "peer.py", "parallel.py", "compare_trees.py"]
)
def test_bench_help(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, check=True
    )
    assert "usage:" in out.stdout


def test_bench_first_image_times_whole_processes_and_says_what_is_owed(tmp_path):
    # the MLX-native case alone, the quickest to write; `--tiny` runs every case in a few minutes
    args = ["--tiny", "--runs", "2", "--warmup", "0", "--no-diffusers", "--disk", str(tmp_path)]
    figures = _bench("first_image.py", *args, "--cases", "mlx-bf16")
    (run,) = [f for f in figures if "median_s" in f]
    assert run["case"] == "mlx-bf16" and run["runs"] == 2 and run["min_s"] <= run["median_s"] <= run["max_s"]
    # timed from outside, with MFLUX_TRACE's marks inside the process's wall time
    assert 0 < run["first_weight_read_s"] < run["prompts_encoded_s"] < run["first_step_s"] < run["max_s"]
    assert not (tmp_path / "first-image-tiny/mlx-bf16").exists()  # the model is deleted after
    owed = _bench("first_image.py", *args, "--cases", "q4,mlx-bf16", "--time-limit", "0")
    assert owed[-1]["what"] == "out of time" and owed[-1]["owed"] == ["q4", "mlx-bf16"]
