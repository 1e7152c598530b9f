"""`mflux train` on the tiny pipelines: gradients against PyTorch + PEFT, learning, the saved LoRA in
diffusers, exact resume, QLoRA, and bad input.

Tolerances are stated where they are used: gradients within 1e-4 of each tensor's largest entry
(float32; measured 3e-5), images within 2/255 of diffusers' (the runtime's float32 bound)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from mflux import Config, Flux1
from mflux.errors import MfluxError
from mflux.folders import open_folder
from mflux.runtime import engine, sampler
from mflux.runtime.loader import load_component
from mflux.runtime.lora import apply_loras
from mflux.runtime.weights import SafetensorsFile
from mflux.train import lora, train
from mflux.train.objective import flow_loss, sample_sigmas, training_sigmas
from tests import lora_files as lf
from tests.fixtures import write_dataset

RES = 64  # 4x4 latent tokens... 16 packed tokens
SEQ = 32  # T5 tokens while training and generating (the model's 256 costs 8x the attention)
GRAD_TOL = 1e-4
FLOAT32_BOUND = 2
# The held-out-noise loss of the tiny random model falls 1.32x in 120 steps (1.37 -> 1.04) and then
# levels off: at small sigma the target noise - x0 is nearly unpredictable from x_t whatever is learned.
LOSS_FACTOR = 1.25
LEARN = dict(steps=120, rank=8, lr=3e-3, resolution=RES, max_sequence_length=SEQ, precision="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "images")


@pytest.fixture(scope="module")
def trained(tiny_schnell, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "colours.safetensors"
    result = train(
        str(tiny_schnell),
        str(data),
        str(out),
        trigger="mfx",
        validation_prompt="mfx a solid red square",
        validation_every=60,
        **LEARN,
    )
    return result


# --- gradients ---


def set_random_lora(layers, rng):
    """Random non-zero A and B (PEFT starts B at zero, which makes every A gradient zero)."""
    values = {}
    for layer in layers.values():
        for i, name in enumerate(layer.layout.names):
            a = (rng.standard_normal(layer.lora_A[i].shape) / 8).astype(np.float32)
            b = (rng.standard_normal(layer.lora_B[i].shape) / 4).astype(np.float32)
            layer.lora_A[i], layer.lora_B[i] = mx.array(a), mx.array(b)
            values[name] = (a, b)
    return values


def batch(rng, flux, tokens=16, seq=24):
    arrays = {
        "x0": rng.standard_normal((1, tokens, 64)),
        "noise": rng.standard_normal((1, tokens, 64)),
        "txt": rng.standard_normal((1, seq, 64)),
        "pooled": rng.standard_normal((1, 64)),
        "sigma": np.array([0.63]),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    arrays["guidance"] = np.array([3.5], np.float32) if flux.params.guidance_embed else None
    return arrays


def our_grads(flux, layers, b) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    side = int(np.sqrt(b["x0"].shape[1])) * 16
    pe = flux.positions(sampler.image_ids(side, side), sampler.text_ids(b["txt"].shape[1]))
    m = {k: None if v is None else mx.array(v) for k, v in b.items()}
    loss_and_grad = nn.value_and_grad(flux, flow_loss)
    _, grads = loss_and_grad(
        flux, m["x0"], m["noise"], m["sigma"], m["sigma"], m["txt"], m["pooled"], pe, m["guidance"], True
    )
    g = dict(tree_flatten(grads))
    return {
        name: (np.array(g[f"{path}.lora_A.{i}"]), np.array(g[f"{path}.lora_B.{i}"]))
        for path, layer in layers.items()
        for i, name in enumerate(layer.layout.names)
    }


def peft_grads(folder, modules, values, rank, alpha, b):
    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from tests.fixtures import _quiet

    with _quiet():
        t = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    t.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules))
    for name, (a, bb) in values.items():
        m = t.get_submodule(name)
        m.lora_A["default"].weight.data = torch.from_numpy(a)
        m.lora_B["default"].weight.data = torch.from_numpy(bb)
    tb = {k: None if v is None else torch.from_numpy(v) for k, v in b.items()}
    s = tb["sigma"][:, None, None]
    noisy = (1 - s) * tb["x0"] + s * tb["noise"]
    side = int(np.sqrt(b["x0"].shape[1]))
    img_ids = torch.from_numpy(np.array(sampler.image_ids(side * 16, side * 16)[0]))
    pred = t(
        hidden_states=noisy,
        timestep=tb["sigma"],
        guidance=tb["guidance"],
        pooled_projections=tb["pooled"],
        encoder_hidden_states=tb["txt"],
        txt_ids=torch.zeros(b["txt"].shape[1], 3),
        img_ids=img_ids,
        return_dict=False,
    )[0]
    ((pred - (tb["noise"] - tb["x0"])) ** 2).mean().backward()
    return {
        name: tuple(
            getattr(t.get_submodule(name), p)["default"].weight.grad.numpy() for p in ("lora_A", "lora_B")
        )
        for name in modules
    }


def lora_on(folder, targets, rank, alpha, quantize=None):
    from mflux.runtime.quantization import QuantSpec

    flux = load_component(
        open_folder(folder), "transformer", mx.float32, QuantSpec(quantize) if quantize else None
    )
    modules = lora.target_modules(flux.params, lora.target_leaves(targets))
    return flux, modules, lora.attach(flux, modules, rank, alpha)


def test_gradients_equal_pytorch_peft(tiny_dev):
    """Every LoRA target kind (q/k/v slices of qkv and linear1, the MLP rows of linear1, linear2, the
    text stream, to_out), on dev (guidance input), against autograd through diffusers + PEFT."""
    rank, alpha = 4, 6.0
    flux, modules, layers = lora_on(tiny_dev, "attn,mlp,text,linear2", rank, alpha)
    rng = np.random.default_rng(0)
    values = set_random_lora(layers, rng)
    b = batch(rng, flux)
    ours, ref = our_grads(flux, layers, b), peft_grads(tiny_dev, modules, values, rank, alpha, b)
    assert len(ref) == len(modules) == 34
    worst = 0.0
    for name in modules:
        for got, want in zip(ours[name], ref[name]):
            assert np.abs(want).max() > 1e-7  # a real gradient, not zeros on both sides
            err = np.abs(got - want).max() / np.abs(want).max()
            worst = max(worst, err)
            assert err <= GRAD_TOL, name
    print(f"{2 * len(modules)} LoRA gradients: worst max|ours - torch| / max|torch| = {worst:.1e}")


def test_quantized_base_gradients(tiny_schnell):
    """QLoRA: the same LoRA on a q8 and a q4 base; how far its gradients are from the float base's."""
    rng = np.random.default_rng(1)
    grads = {}
    for bits in (None, 8, 4):
        flux, modules, layers = lora_on(tiny_schnell, None, 4, 4.0, bits)
        set_random_lora(layers, np.random.default_rng(2))
        grads[bits] = our_grads(flux, layers, batch(np.random.default_rng(3), flux))
    del rng
    errors = {}
    for bits in (8, 4):
        flat = lambda g: np.concatenate([x.ravel() for pair in g.values() for x in pair])  # noqa: E731
        ref, got = flat(grads[None]), flat(grads[bits])
        errors[bits] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        cosine = got @ ref / np.linalg.norm(got) / np.linalg.norm(ref)
        print(f"q{bits} base: LoRA gradient relative error {errors[bits]:.4f}, cosine {cosine:.5f}")
    assert 0 < errors[8] < errors[4] < 0.5


def test_saved_file_is_the_trained_function(tiny_schnell, tmp_path):
    """The LoRA as trained (per-module pairs in memory) and as saved then applied by mflux's LoRA loader
    (PEFT names, alpha from the metadata, alpha != rank) give the same transformer output."""
    from mflux.train.files import atomic_save

    flux, modules, layers = lora_on(tiny_schnell, "attn,mlp,linear2", 4, 6.0)
    set_random_lora(layers, np.random.default_rng(5))
    path = tmp_path / "random.safetensors"
    atomic_save(path, lora.peft_tensors(layers), lora.peft_metadata(modules, 4, 6.0, {}))
    plain = load_component(open_folder(tiny_schnell), "transformer", mx.float32)
    applied = load_component(open_folder(tiny_schnell), "transformer", mx.float32)
    apply_loras({"transformer": applied}, [str(path)], [1.0])
    rng = np.random.default_rng(6)
    img, txt = (
        mx.array(rng.standard_normal((1, 16, 64)), mx.float32),
        mx.array(rng.standard_normal((1, 8, 64)), mx.float32),
    )
    ids = sampler.image_ids(RES, RES), sampler.text_ids(8)
    y, t = mx.array(rng.standard_normal((1, 64)), mx.float32), mx.array([0.4])
    outs = [np.array(m(img, ids[0], txt, ids[1], t, y)) for m in (flux, applied, plain)]
    assert np.abs(outs[0] - outs[2]).max() > 0.1  # the LoRA matters
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


# --- it learns, and the file it writes ---


def eval_loss(flux, cache, folder, draws=16) -> float:
    """The loss over fixed noise and sigmas for every example: the training loss without its noise."""
    table = training_sigmas(open_folder(folder).architecture["scheduler"])
    key = mx.random.key(123)
    pe = flux.positions(sampler.image_ids(RES, RES), sampler.text_ids(cache["txt"].shape[1]))
    total = 0.0
    for i in range(cache["latents"].shape[0]):
        row = cache["caption"][i : i + 1]
        for _ in range(draws):
            key, k1, k2 = mx.random.split(key, 3)
            x0 = cache["latents"][i : i + 1]
            sigma, t = sample_sigmas(k2, 1, table)
            noise = mx.random.normal(x0.shape, key=k1)
            total += flow_loss(flux, x0, noise, sigma, t, cache["txt"][row], cache["pooled"][row], pe).item()
    return total / (draws * cache["latents"].shape[0])


def test_loss_falls(trained, tiny_schnell):
    cache = mx.load(str(trained.work_dir / "cache.safetensors"))
    before = load_component(open_folder(tiny_schnell), "transformer", mx.float32)
    after = load_component(open_folder(tiny_schnell), "transformer", mx.float32)
    apply_loras({"transformer": after}, [str(trained.output)], [1.0])  # the saved file, as mflux run reads it
    first, last = eval_loss(before, cache, tiny_schnell), eval_loss(after, cache, tiny_schnell)
    print(f"{trained.steps} steps: held-out-noise loss {first:.4f} -> {last:.4f} ({first / last:.2f}x)")
    assert first / last >= LOSS_FACTOR
    log = [json.loads(line) for line in (trained.work_dir / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, trained.steps + 1))
    assert np.mean([r["loss"] for r in log[:10]]) > 1.2 * np.mean([r["loss"] for r in log[-10:]])
    assert Image.open(trained.work_dir / "loss.png").size == (640, 360)
    assert [p.name for p in trained.validation_images] == ["step-000060.png", "step-000120.png"]
    assert Image.open(trained.validation_images[0]).size == (RES, RES)


def test_generations_move_toward_the_data(trained, tiny_schnell):
    """Latents generated for each training caption (4 Euler steps, fixed seed) end closer to that
    image's latents with the saved LoRA than without. Measured on latents: the pixel distance to the
    VAE's round trip of each image did not move (ratios 0.99-1.01 measured), since the generations are
    still ~1.0 rms from latents of rms 0.12, where this random decoder's output says little."""

    cache = mx.load(str(trained.work_dir / "cache.safetensors"))
    base = load_component(open_folder(tiny_schnell), "transformer", mx.float32)
    tuned = load_component(open_folder(tiny_schnell), "transformer", mx.float32)
    apply_loras({"transformer": tuned}, [str(trained.output)], [1.0])
    sigmas = sampler.sigmas(4, (RES // 16) ** 2, shift=False)
    ratios = []
    for i in range(cache["latents"].shape[0]):
        row = cache["caption"][i : i + 1]
        dist = []
        for flux in (base, tuned):
            mods = engine.modulations(flux, cache["pooled"][row], sigmas, None)
            steps = engine.denoise(
                flux, cache["txt"][row], sampler.noise(5, RES, RES), sigmas, RES, RES, mods
            )
            *_, x = steps
            dist.append(float(mx.sqrt(mx.mean(mx.square(x - cache["latents"][i : i + 1])))))
        ratios.append(dist[0] / dist[1])
        print(f"example {i}: rms |generated - data latents| {dist[0]:.3f} -> {dist[1]:.3f}")
    assert min(ratios) > 1.1


def test_saved_lora_is_small_named_and_described(trained):
    sf = SafetensorsFile(trained.output)
    keys = sf.keys()
    assert all(
        k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys
    )
    assert "transformer.single_transformer_blocks.1.attn.to_k.lora_B.weight" in keys
    params = sum(int(np.prod(shape)) for _, shape, _ in sf.tensors.values())
    assert params == 14 * 8 * (64 + 64)  # 14 modules x rank x (in + out): no base weights
    meta = sf.metadata
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 8 and peft["transformer.lora_alpha"] == 8.0
    assert meta["mflux.rank"] == "8" and meta["mflux.trigger"] == "mfx" and meta["mflux.base_model"]


def test_diffusers_loads_it_and_agrees(trained, tiny_schnell):
    prompt = "mfx a solid blue square"
    latents = np.random.default_rng(4).standard_normal((1, (RES // 16) ** 2, 64)).astype(np.float32)
    kwargs = dict(height=RES, width=RES, steps=2, latents=latents, max_sequence_length=SEQ)
    ref = lf.diffusers_image(tiny_schnell, [(trained.output, 1.0)], prompt, **kwargs)
    cfg = Config(num_inference_steps=2, height=RES, width=RES, max_sequence_length=SEQ)
    images = []
    for paths in ([], [str(trained.output)]):
        flux = Flux1.from_path(tiny_schnell, precision="float32", lora_paths=paths)
        images.append(np.array(flux.generate_image(0, prompt, cfg, latents=latents).image).astype(int))
    base, ours = images
    changed, error = np.abs(ours - base).mean(), np.abs(ours - ref).max()
    print(f"the LoRA changes the image by {changed:.1f}/255 on average; max |mflux - diffusers| {error}/255")
    assert changed > 5  # the LoRA matters, so agreeing means something
    assert error <= FLOAT32_BOUND


# --- resume, QLoRA ---

RESUME = dict(steps=4, rank=4, lr=1e-3, batch_size=2, resolution=RES, max_sequence_length=SEQ)
RESUME |= dict(precision="float32", checkpoint_every=0)


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tiny_dev, data, tmp_path, capsys):
    """dev (guidance, dynamic shift), batches of 2 over 5 images (the order crosses epochs): Ctrl-C at
    step 2 saves a checkpoint, and resuming it (the checkpoint alone: it knows the run's model, data,
    output and settings) gives the uninterrupted run's losses and LoRA exactly."""
    whole = train(str(tiny_dev), str(data), str(tmp_path / "whole.safetensors"), **RESUME)

    def ctrl_c(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    part = tmp_path / "part.safetensors"
    work = tmp_path / "part.train"
    work.mkdir()
    shutil.copy(whole.work_dir / "cache.safetensors", work)  # same files and settings: reused, not re-encoded
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_dev), str(data), str(part), on_step=ctrl_c, **RESUME)
    assert not part.exists() and [p.name for p in (work / "checkpoints").iterdir()] == [
        "step-000002.safetensors"
    ]
    capsys.readouterr()
    rest = train(resume=str(work))
    assert "resuming from step 2 (" in capsys.readouterr().err
    assert whole.encoded and not rest.encoded
    assert rest.losses == whole.losses[2:] and len(rest.losses) == 2
    a, b = mx.load(str(whole.output)), mx.load(str(part))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    log = [json.loads(line)["loss"] for line in (work / "loss.jsonl").read_text().splitlines()]
    assert log == whole.losses


def rewritten(checkpoint, folder, **meta):
    """A copy of `checkpoint` with its metadata changed (a None value removes the key)."""
    arrays, old = mx.load(str(checkpoint), return_metadata=True)
    meta = {k: v for k, v in (old | meta).items() if v is not None}
    path = folder / f"{len(list(folder.iterdir()))}-{checkpoint.name}"
    mx.save_safetensors(str(path), arrays, metadata=meta)
    return path


def test_checkpoint_format_is_versioned_and_older_ones_resume(trained, data, tmp_path):
    from mflux.train.trainer import CHECKPOINT_FORMAT, resumed

    checkpoint = sorted((trained.work_dir / "checkpoints").iterdir())[-1]
    meta = SafetensorsFile(checkpoint).metadata
    assert meta["format_version"] == str(CHECKPOINT_FORMAT) == "1"
    recorded = json.loads(meta["config"])
    assert (recorded["data"], recorded["output"]) == (str(data), str(trained.output))  # absolute paths
    # unversioned (before format 1): resumes when it records its run's settings, as those of mflux did
    old = rewritten(checkpoint, tmp_path, format_version=None)
    assert resumed({"resume": str(old)})["steps"] == 120
    # else with them given again, or it says what to give
    bare = rewritten(checkpoint, tmp_path, format_version=None, config=json.dumps({"rank": 8}))
    with pytest.raises(MfluxError, match="does not record its run's --model, --data and --output"):
        resumed({"resume": str(bare)})
    given = {"model": recorded["model"], "data": str(data), "output": "me.safetensors"}
    assert resumed({"resume": str(bare), **given})["rank"] == 8
    newer = rewritten(checkpoint, tmp_path, format_version="2")
    with pytest.raises(MfluxError, match=r"checkpoint format 2, newer than this mflux reads \(1\)"):
        resumed({"resume": str(newer)})


def test_cli_resume_continues_the_run_it_names(tiny_schnell, data, tmp_path, monkeypatch):
    """Ctrl-C is the saved line alone and exit 130; --resume alone then continues the run from any
    folder (its paths were relative), says from which step, and replaces the LoRA that run wrote when
    given more steps; a change of what makes the run is refused in one line."""
    from mflux.train.trainer import LossLog

    write = LossLog.write

    def press_ctrl_c_at_step_2(self, step, *rest):
        write(self, step, *rest)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    monkeypatch.setattr(LossLog, "write", press_ctrl_c_at_step_2)
    model = os.path.relpath(tiny_schnell)  # recorded absolute
    args = ["--model", model, "--data", data, "--output", "me.safetensors", "--steps", 3, "--rank", 2]
    args += ["--resolution", RES, "--max-sequence-length", SEQ, "--precision", "float32"]
    result = cli("train", *args, "--checkpoint-every", 0)
    assert result.exit_code == 130, result.stderr
    assert said(result) == [
        "interrupted at step 2: saved me.train/checkpoints/step-000002.safetensors "
        "(continue with: mflux train --resume me.train)"
    ]
    monkeypatch.setattr(LossLog, "write", write)
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "moved.train"
    shutil.move(tmp_path / "run/me.train", work)  # the run lives in its work folder, wherever it is
    result = cli("train", "--resume", work)
    assert result.exit_code == 0, result.stderr
    assert f"resuming from step 2 ({work / 'checkpoints/step-000002.safetensors'})" in result.stderr
    out = tmp_path / "run/me.safetensors"
    assert f"wrote {out} (step 3; work folder {work})" in result.output
    assert "encoding none (read from the cache)" in result.output  # the same model, however named
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["me.safetensors"]
    result = cli("train", "--resume", work, "--steps", 4)  # no --force: the run that wrote it goes on
    assert result.exit_code == 0 and "resuming from step 3" in result.stderr, result.stderr
    assert SafetensorsFile(out).metadata["mflux.steps"] == "4"
    one_line_error(cli("train", "--resume", work, "--lr", 0.5), "trained with --lr 0.0001, not 0.5")
    one_line_error(cli("train", "--resume", work, "--rank", 4), "has rank 2, not 4")
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"")  # not the LoRA this run wrote: --force as ever
    one_line_error(cli("train", "--resume", work, "-o", other), "other.safetensors exists (pass --force")


def test_qlora_on_a_4bit_base_trains(trained, tiny_schnell, data, tmp_path):
    (tmp_path / "q4.train").mkdir()
    shutil.copy(trained.work_dir / "cache.safetensors", tmp_path / "q4.train")  # the same encodings
    options = {**LEARN, "steps": 30, "trigger": "mfx", "validation_prompt": "mfx a solid red square"}
    r = train(str(tiny_schnell), str(data), str(tmp_path / "q4.safetensors"), quantize=4, **options)
    first, last = np.mean(r.losses[:10]), np.mean(r.losses[-10:])
    print(f"q4 base: training loss {first:.4f} -> {last:.4f} over 30 steps (means of 10)")
    assert first > 1.1 * last  # measured 1.31 -> 1.08
    assert SafetensorsFile(r.output).metadata["mflux.quantized_base"] == "4" and not r.encoded


# --- the command and bad input ---


def cli(*args):
    from click.testing import CliRunner

    from mflux.cli import cli as group

    return CliRunner().invoke(group, [str(a) for a in args])


def said(result) -> list[str]:
    """stderr's lines less the progress lines a run off a terminal prints (`step N/M, loss ...`)."""
    return [
        line for line in result.stderr.strip("\n").splitlines() if not re.match(r"step \d+/\d+, loss", line)
    ]


def one_line_error(result, match: str) -> None:
    lines = said(result)
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]


def test_cli_config_file_and_flags(tiny_schnell, data, tmp_path):
    """A TOML config with a flag overriding it; the LoRA then runs with `mflux run --lora-paths`."""
    config = tmp_path / "train.toml"
    config.write_text(
        f'model = "{tiny_schnell}"\ndata = "{data}"\nrank = 2\nsteps = 50\nresolution = {RES}\n'
        f'max-sequence-length = {SEQ}\nprecision = "float32"\ntrigger = "zz"\n'
    )
    out = tmp_path / "cli.safetensors"
    result = cli(
        "train",
        "--config",
        config,
        "--steps",
        3,
        "--output",
        out,
        "--checkpoint-every",
        1,
        "--keep-checkpoints",
        2,
    )
    assert result.exit_code == 0, result.stderr
    kept = sorted(p.name for p in (tmp_path / "cli.train/checkpoints").iterdir())
    assert kept == ["step-000002.safetensors", "step-000003.safetensors"]
    assert "wrote" in result.output and "s/step" in result.output and "peak memory" in result.output
    meta = SafetensorsFile(out).metadata
    assert meta["mflux.steps"] == "3" and meta["mflux.rank"] == "2" and meta["mflux.trigger"] == "zz"
    image = tmp_path / "x.png"
    args = ["run", "--path", tiny_schnell, "--prompt", "zz red", "--height", 32, "--width", 32, "--steps", 1]
    result = cli(*args, "--lora-paths", out, "--output", image)
    assert result.exit_code == 0 and image.is_file(), result.stderr


def test_imagefolder_metadata_trigger_and_crop(tmp_path):
    from mflux.train.data import load_image, scan
    from mflux.train.trainer import read_config_file

    folder = tmp_path / "hf"
    folder.mkdir()
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 255  # a white middle: the centre crop keeps only it (Lanczos rings a little)
    Image.fromarray(wide).save(folder / "a.png")
    Image.new("RGB", (20, 20)).save(folder / "b.jpg")
    rows = [{"file_name": "a.png", "text": "white"}, {"file_name": "b.jpg", "caption": "black"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = scan(folder, trigger="sks")
    assert [(e.image.name, e.caption) for e in examples] == [("a.png", "sks white"), ("b.jpg", "sks black")]
    assert load_image(folder / "a.png", 16).min() > 200 and load_image(folder / "b.jpg", 16).shape == (
        16,
        16,
        3,
    )
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"rank": 4, "batch-size": 2}))
    assert read_config_file(config) == {"rank": 4, "batch_size": 2}
    config.write_text(json.dumps({"ranks": 4}))
    with pytest.raises(MfluxError, match="unknown option 'ranks'"):
        read_config_file(config)


def test_data_given_as_a_file(data, tmp_path):
    """--data may name the metadata.jsonl itself (as --help says); an image is refused as a file,
    not reported missing."""
    from mflux.train.data import scan

    folder = tmp_path / "hf"
    shutil.copytree(data, folder)
    rows = [{"file_name": "red.png", "text": "red"}, {"file_name": "blue.png", "text": "blue"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert scan(folder / "metadata.jsonl") == scan(folder)
    with pytest.raises(MfluxError, match=rf"red\.png: a file, not a data folder \(.* --data {folder}\)"):
        scan(folder / "red.png")


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    from mflux.train.trainer import read_config_file

    project = tmp_path / "project"
    (project / "photos").mkdir(parents=True)
    config = project / "train.toml"
    config.write_text('model = "schnell"\ndata = "photos"\noutput = "out/me.safetensors"\nwork-dir = "w"\n')
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert read_config_file(config) == {
        "model": "schnell",  # a store name stays a name
        "data": str(project / "photos"),
        "output": str(project / "out/me.safetensors"),
        "work_dir": str(project / "w"),
    }
    # a config written when paths were read from the current folder: one line with the fix
    (tmp_path / "elsewhere").mkdir()
    config.write_text('data = "elsewhere"\n')
    with pytest.raises(MfluxError, match="relative to the config file's folder") as refused:
        read_config_file(config)
    assert f'write data = "{tmp_path / "elsewhere"}"' in str(refused.value)
    config.write_text("batch-sise = 2\n")
    with pytest.raises(MfluxError, match="unknown option 'batch-sise' \\(did you mean 'batch-size'\\?"):
        read_config_file(config)


@pytest.fixture
def bad_data(tmp_path):
    folders = {name: tmp_path / name for name in ("empty", "unreadable", "uncaptioned")}
    for folder in folders.values():
        folder.mkdir()
    (folders["unreadable"] / "a.png").write_bytes(b"\x89PNG not really")
    (folders["unreadable"] / "a.txt").write_text("a")
    Image.new("RGB", (16, 16)).save(folders["uncaptioned"] / "b.png")
    return folders


def test_bad_input_is_one_line_before_any_work(tiny_schnell, tiny_dev, trained, data, bad_data, tmp_path):
    base = ["train", "--model", tiny_schnell, "--output", tmp_path / "o.safetensors", "--steps", 1]
    base += ["--work-dir", tmp_path / "work", "--resolution", RES]
    (tmp_path / "exists.safetensors").write_bytes(b"")
    checkpoint = str(sorted((trained.work_dir / "checkpoints").iterdir())[-1])  # schnell, rank 8
    cases = [
        (["--data", bad_data["empty"]], "no images"),
        (["--data", bad_data["unreadable"]], "a.png: not a readable image"),
        (["--data", bad_data["uncaptioned"]], "b.png: no caption file b.txt"),
        (
            ["--data", data, "--resolution", 100],
            "--resolution must be a positive multiple of 16 (such as 512 or 1024), got 100",
        ),
        (["--data", data, "--rank", 0], "--rank must be a positive integer, got 0"),
        (["--data", data, "--output", tmp_path / "exists.safetensors"], "exists (pass --force"),
        (["--data", data, "--rank", 8, "--resume", checkpoint, "--model", tiny_dev], "trained on"),
        (["--data", data, "--rank", 4, "--resume", checkpoint], "has rank 8, not 4"),
        (["--data", data, "--targets", "attn,convs"], "unknown LoRA target 'convs'"),
    ]
    for args, message in cases:
        one_line_error(cli(*base, *args), message)
        assert not (tmp_path / "work").exists()  # nothing encoded, nothing written


def test_full_disk_leaves_no_half_written_file(tiny_schnell, data, tmp_path, monkeypatch):
    import errno

    from mflux.train import files

    save = files.mx.save_safetensors

    def fill_disk(path, arrays, metadata=None):
        if "cache" in path:  # the cache is written; the first checkpoint fills the disk
            return save(path, arrays, metadata=metadata)
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.mx, "save_safetensors", fill_disk)
    out = tmp_path / "full.safetensors"
    args = [
        "train",
        "--model",
        tiny_schnell,
        "--data",
        data,
        "--output",
        out,
        "--steps",
        1,
        "--resolution",
        RES,
    ]
    one_line_error(cli(*args, "--max-sequence-length", SEQ), "the disk is full")
    assert not out.exists()
    assert not [p for p in tmp_path.rglob("*.safetensors") if p.name != "cache.safetensors"]


def test_checkpointing_keeps_every_gradient_with_a_trained_modulation_layer(tiny_dev):
    """A checkpointed block is given the modulations as an input only when a trainable parameter makes
    them (model._forward): here one modulation layer trains, and every gradient equals the one without
    checkpointing, that layer's too."""
    rank, alpha = 4, 6.0
    flux, _, layers = lora_on(tiny_dev, "attn", rank, alpha)
    rng = np.random.default_rng(1)
    set_random_lora(layers, rng)
    assert not flux.modulations_train()
    flux.double_blocks[0].img_mod.unfreeze()
    assert flux.modulations_train()
    b = batch(rng, flux)
    side = int(np.sqrt(b["x0"].shape[1])) * 16
    pe = flux.positions(sampler.image_ids(side, side), sampler.text_ids(b["txt"].shape[1]))
    m = {k: None if v is None else mx.array(v) for k, v in b.items()}
    loss_and_grad = nn.value_and_grad(flux, flow_loss)
    args = (m["x0"], m["noise"], m["sigma"], m["sigma"], m["txt"], m["pooled"], pe, m["guidance"])
    grads = {c: dict(tree_flatten(loss_and_grad(flux, *args, c)[1])) for c in (True, False)}
    assert grads[True].keys() == grads[False].keys()
    mods = [k for k in grads[True] if k.startswith("double_blocks.0.img_mod")]
    assert mods and all(np.abs(np.array(grads[False][k])).max() > 0 for k in mods)
    for k, want in grads[False].items():
        want, got = np.array(want), np.array(grads[True][k])
        assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1e-12), k


def test_a_fresh_gpu_machines_first_step_says_it_builds_kernels(
    tiny_schnell, trained, data, tmp_path, cuda_paths, monkeypatch, capsys
):
    """Where MLX builds kernels at run time into its cache (CUDA, `Tuning.warm`), the first training
    step on an empty cache takes minutes (H200: 125-178 s): the trainer says so once, before it, and
    marks the cache after it, so that later runs say nothing."""
    from dataclasses import replace

    monkeypatch.setattr(cuda_paths, "TUNING", replace(cuda_paths.TUNING, warm=True))  # CUDA's path here
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "ptx"))
    options = {**LEARN, "steps": 2, "progress": False}
    notices = []
    for run in ("first", "second"):
        (tmp_path / f"{run}.train").mkdir()
        shutil.copy(trained.work_dir / "cache.safetensors", tmp_path / f"{run}.train")
        train(str(tiny_schnell), str(data), str(tmp_path / f"{run}.safetensors"), **options)
        notices.append([line for line in capsys.readouterr().err.splitlines() if "GPU kernels" in line])
    assert len(notices[0]) == 1 and str(tmp_path / "ptx") in notices[0][0]
    assert notices[1] == []
    markers = list((tmp_path / "ptx").glob("mflux-train-*-float.done"))
    assert len(markers) == 1 and markers[0].read_text().startswith("first step: ")


def test_train_off_a_terminal_prints_lines_not_a_bar(tiny_schnell, data, tmp_path):
    out = tmp_path / "me.safetensors"
    args = ["--model", tiny_schnell, "--data", data, "--output", out, "--steps", 40, "--rank", 2]
    args += ["--resolution", RES, "--max-sequence-length", SEQ, "--precision", "float32"]
    args += ["--checkpoint-every", 20]
    command = [sys.executable, "-m", "mflux", "train", *map(str, args)]
    result = subprocess.run(command, capture_output=True, timeout=300)  # bytes: text would turn \r to \n
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert b"\r" not in result.stderr + result.stdout, repr(stderr)
    lines = stderr.splitlines()
    steps = [line.split(",")[0] for line in lines if line.startswith("step ")]
    assert steps == [f"step {n}/40" for n in range(2, 41, 2)], lines  # 40 // 20: a line every 2 steps
    saved = [line for line in lines if line.startswith("checkpoint ")]
    work = tmp_path / "me.train" / "checkpoints"
    assert saved == [
        f"checkpoint {work / 'step-000020.safetensors'}",
        f"checkpoint {work / 'step-000040.safetensors'}",
    ]
