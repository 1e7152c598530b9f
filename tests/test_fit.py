"""The memory preflight (mflux.fit) and --low-memory (issue 35): a run that can't fit is refused before any
pull or load, --ignore-memory runs it anyway, the figures agree with MLX's measured peaks, and the
low-memory path makes the default path's image at a lower peak."""

import numpy as np
import pytest
from click.testing import CliRunner

from mflux import Config, Flux1, fit
from mflux.cli import cli
from mflux.errors import MfluxError
from mflux.folders import open_folder
from tests.hub_server import HubServer, point_client_at

PROMPT = "Luxury food photograph"
SCHNELL = "black-forest-labs/FLUX.1-schnell"
RUN_FLAGS = dict(free_text_encoders=True, free_modulation_weights=True, free_transformer=True)  # mflux run's


@pytest.fixture
def hub(tiny_schnell, monkeypatch, tmp_path):
    """The local Hub, serving the tiny schnell as the catalog's schnell, with the client pointed at it."""
    from mflux.catalog import catalog

    with HubServer() as server:
        server.add_repo(SCHNELL, tiny_schnell, commit=catalog()["schnell"].revision)
        point_client_at(server, monkeypatch, tmp_path)
        yield server


def small_machine(monkeypatch, usable: int = 9 * fit.GB, total: int = 16 * fit.GB) -> None:
    """A Mac's figures: its usable memory, and attention's fused kernel (no scores held)."""
    monkeypatch.setattr(fit, "usable_memory", lambda: fit.Machine(total, usable, "this Mac"))
    monkeypatch.setattr(fit, "on_cpu", lambda: False)


def test_a_run_that_cannot_fit_is_refused_before_any_pull_and_ignore_memory_runs_it(
    hub, mflux_home, monkeypatch, tmp_path
):
    small_machine(monkeypatch)
    monkeypatch.chdir(tmp_path)
    args = ["run", "-m", "schnell-q8", "--prompt", PROMPT, "--precision", "bfloat16"]
    result = CliRunner().invoke(cli, args)

    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    # FLUX.1's sizes: the 8-bit transformer is 12.6 GB; q4 and --low-memory at 4 bits fit 9 GB
    assert lines[0].startswith("error: schnell-q8 needs about 13 GB at 1024x1024; this Mac has 16 GB ")
    assert "about 9.0 GB free to use: try schnell-q4 (about 6.7 GB)" in lines[0]
    assert "--ignore-memory" in lines[0]
    assert hub.requests == []  # no request to the Hub
    assert not mflux_home.exists()  # and no write to the store

    # the override: pulled (the Hub's schnell is the tiny one) and run
    args += ["--ignore-memory", "--height", "64", "--width", "64", "--steps", "1", "--seed", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "image.png").is_file() and hub.requests


def test_a_folder_is_checked_by_its_own_sizes(tiny_schnell, monkeypatch, tmp_path):
    """A folder's own configs give its sizes: the tiny model's figure, not FLUX.1's."""
    folder = open_folder(tiny_schnell)
    plan = fit.plan_for(folder.architecture, None, "float32", None, height=64, width=64, text_tokens=256)
    need = fit.peak(plan)
    assert need < 50 * 2**20
    monkeypatch.chdir(tmp_path)
    args = ["run", "--path", str(tiny_schnell), "--prompt", PROMPT, "--steps", "1", "--seed", "1"]
    args += ["--height", "64", "--width", "64", "--precision", "float32"]
    small_machine(monkeypatch, usable=need // 2, total=need // 2)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {tiny_schnell} needs about {need / 1e6:.0f} MB at 64x64")
    assert not list(tmp_path.glob("*.png"))
    small_machine(monkeypatch, usable=need * 2, total=need * 2)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "image.png").is_file()


def test_the_suggestion_is_the_largest_configuration_that_fits():
    full = fit.catalog_architecture("schnell")

    def plan(bits, low=False):
        return fit.Plan(full, 2, fit_quant(bits), text_tokens=256, low_memory=low, device_memory=16 * 2**30)

    machine = fit.Machine(16 * fit.GB, 13 * fit.GB, "this Mac")
    fit.preflight("schnell-q8", plan(8), 8, machine)  # 12.6 GB fits 13 GB
    with pytest.raises(MfluxError, match=r"^schnell needs about 24 GB .*: try schnell-q8 \(about 13 GB\)"):
        fit.preflight("schnell", plan(None), None, machine)
    small = fit.Machine(8 * fit.GB, 5.3 * fit.GB, "this Mac")
    with pytest.raises(MfluxError, match=r"try schnell-q3 \(about 5\.\d GB\)"):
        fit.preflight("schnell-q4", plan(4), 4, small)
    tiny = fit.Machine(8 * fit.GB, 2 * fit.GB, "this Mac")
    with pytest.raises(MfluxError, match="nothing fits at this size"):
        fit.preflight("schnell-q4", plan(4), 4, tiny)


def fit_quant(bits):
    from mflux.runtime.quantization import QUANTIZABLE_COMPONENTS, QuantSpec

    return {} if bits is None else {c: QuantSpec(bits) for c in QUANTIZABLE_COMPONENTS}


def test_full_size_figures_match_the_h200s_measured_peaks():
    """docs/PERFORMANCE.md: a schnell run at 1024² on the H200 (CUDA, 140 GB) peaked at 23.9 GB (bf16),
    13.1 GB (8-bit), 7.25 GB (4-bit)."""
    full = fit.catalog_architecture("schnell")
    for bits, measured in ((None, 23.9e9), (8, 13.1e9), (4, 7.25e9)):
        plan = fit.Plan(full, 2, fit_quant(bits), text_tokens=256, cuda=True, device_memory=140 * 2**30)
        assert fit.peak(plan) == pytest.approx(measured, rel=0.15), bits


def measured_peak(flux: Flux1, size: int) -> int:
    """The run's own peak: MLX's peak counts every live array of the process, and in the whole suite
    other tests' arrays are still alive (13 MB of them when this ran after the rest), so their sum is
    taken off."""
    import gc

    import mlx.core as mx

    gc.collect()
    before = mx.get_active_memory()
    image = flux.generate_image(
        1, PROMPT, Config(num_inference_steps=2, height=size, width=size), **RUN_FLAGS
    )
    return max(image.peak_memory.values()) - before


@pytest.mark.parametrize("size", [64, 128])
def test_the_figures_agree_with_mlxs_peak_for_the_tiny_model(tiny_schnell, size):
    folder = open_folder(tiny_schnell)
    plan = fit.plan_for(
        folder.architecture,
        None,
        "float32",
        None,
        height=size,
        width=size,
        text_tokens=folder.defaults["max_sequence_length"],
    )
    measured = measured_peak(Flux1.from_path(tiny_schnell, precision="float32"), size)
    print(f"tiny {size}²: measured {measured / 2**20:.1f} MiB, expected {fit.peak(plan) / 2**20:.1f} MiB")
    assert fit.peak(plan) == pytest.approx(measured, rel=0.15)


def test_low_memory_makes_the_same_image_at_a_lower_peak(tiny_schnell):
    """At -q 4 every component has the same quantization on both paths (low memory's T5 is 4-bit)."""
    config = Config(num_inference_steps=2, height=128, width=128)
    default = Flux1.from_path(tiny_schnell, precision="float32", quantize=4)
    low = Flux1.from_path(tiny_schnell, precision="float32", quantize=4, low_memory=True)
    a = default.generate_image(3, PROMPT, config, **RUN_FLAGS)
    b = low.generate_image(3, PROMPT, config)
    assert np.asarray(a.image).std() > 10  # a real image, so equality means something
    np.testing.assert_array_equal(np.asarray(b.image), np.asarray(a.image))
    peak_default, peak_low = max(a.peak_memory.values()), max(b.peak_memory.values())
    print(f"tiny 128², 4-bit: peak {peak_default / 2**20:.1f} MiB, --low-memory {peak_low / 2**20:.1f} MiB")
    assert peak_low < 0.8 * peak_default
    assert not low.models.modules  # every component freed after use


def test_low_memory_loads_t5_at_4_bits(tiny_schnell):
    low = Flux1.from_path(tiny_schnell, precision="float32", low_memory=True)
    assert low.models.spec("text_encoder_2").bits == 4
    assert low.models.spec("transformer") is None and low.models.spec("text_encoder") is None
    assert (
        Flux1.from_path(tiny_schnell, precision="float32", quantize=3, low_memory=True)
        .models.spec("text_encoder_2")
        .bits
        == 3
    )  # never more bits than -q asks for
    assert Flux1.from_path(tiny_schnell, precision="float32").models.spec("text_encoder_2") is None


def test_list_available_shows_each_models_expected_peak():
    from mflux.catalog import catalog

    result = CliRunner().invoke(cli, ["list", "--available"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert "PEAK 1024² (-/Q8/Q4)" in header
    schnell = next(r for r in rows if r.startswith("schnell "))
    figures = fit.catalog_peaks(catalog()["schnell"])  # this backend's: float32 on a CPU
    assert list(figures) == ["-", "q8", "q4"] and figures["-"] > figures["q8"] > figures["q4"] > 5 * fit.GB
    assert "/".join(fit.gb(v, unit=False) for v in figures.values()) + " GB" in schnell


def test_serve_refuses_a_model_that_cannot_fit_before_listening(tiny_schnell, monkeypatch):
    from tests.fixtures import store_hf_folder

    store_hf_folder(tiny_schnell, "schnell")
    small_machine(monkeypatch, usable=2**20, total=2**20)
    listened = []
    monkeypatch.setattr("mflux.server.serve.check_port", lambda *a: listened.append(a))
    result = CliRunner().invoke(cli, ["serve", "--model", "schnell"])
    assert result.exit_code == 1
    assert result.output.startswith("error: schnell needs about ") and "--ignore-memory" in result.output
    assert listened == []  # refused before the port is even tried


def test_a_low_memory_server_worker_loads_nothing_ahead(tiny_schnell):
    from mflux.server.worker import Models
    from tests.fixtures import store_hf_folder

    store_hf_folder(tiny_schnell, "schnell")
    flux = Models(low_memory=True).get("schnell")
    assert flux.low_memory and not flux.models.modules  # each request loads, and frees, its components
    assert set(Models().get("schnell").models.modules) == {"transformer", "vae"}


def test_the_readmes_first_lines_say_which_model_fits_each_mac():
    """README.md's table, near its top: each row's model fits two thirds of the row's unified memory (about
    what Metal lets a process use), and its stated peak is mflux.fit's figure on a Mac (bf16, 1024²)."""
    import re
    from pathlib import Path

    head = (Path(__file__).parents[1] / "README.md").read_text().splitlines()[:25]
    rows = [line for line in head if re.match(r"\| \d+ GB", line)]
    assert [r.split("|")[1].strip() for r in rows] == ["8 GB", "16 GB", "24 GB", "32 GB", "48 GB and more"]
    for row in rows:
        memory, choice, stated = (cell.strip() for cell in row.strip("|").split("|"))
        name = re.search(r"`-m ([\w-]+)`", choice).group(1)
        base, _, bits = name.partition("-q")
        plan = fit.Plan(
            fit.catalog_architecture(base),
            2,
            fit_quant(int(bits) if bits else None),
            text_tokens=256 if base == "schnell" else 512,
            device_memory=int(memory.split()[0]) * 2**30,
        )
        assert fit.gb(fit.peak(plan)) == stated, row
        assert fit.peak(plan) <= int(memory.split()[0]) * 2**30 * 2 / 3, row
