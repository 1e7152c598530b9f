import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mflux.errors import InvalidArgument
from mflux.runtime.weights import SafetensorsFile
from tests.fixtures import REPO_FILES, SCHEDULER, build_tiny_pipeline, packed_latents, reference_image

PROMPT = "Luxury food photograph"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _image(folder: Path, **kwargs) -> np.ndarray:
    args = dict(height=64, width=64, steps=2, latents=packed_latents(0, 64, 64))
    return reference_image(folder, PROMPT, **{**args, **kwargs})


def test_file_list_is_the_real_repos(tiny_schnell, tiny_dev, tiny_schnell_unprefixed):
    assert len(REPO_FILES) == 23
    for folder in (tiny_schnell, tiny_dev, tiny_schnell_unprefixed):
        assert _files(folder) == REPO_FILES


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
def test_shard_index_matches_shards(tiny_schnell, component):
    folder = tiny_schnell / component
    index = json.loads(next(folder.glob("*.index.json")).read_text())
    found, total = {}, 0
    for path in sorted(folder.glob("*.safetensors")):
        f = SafetensorsFile(path)
        assert f.keys(), f"{path.name} is empty"
        assert f.metadata == {"format": "pt"}
        found.update(dict.fromkeys(f.keys(), path.name))
        total += sum(end - begin for _, _, (begin, end) in f.tensors.values())
    assert index["weight_map"] == found
    assert index["metadata"] == {"total_size": total}


def test_weights_are_bf16_like_the_real_ones(tiny_schnell):
    for component in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        for path in (tiny_schnell / component).glob("*.safetensors"):
            assert {d for d, _, _ in SafetensorsFile(path).tensors.values()} == {"BF16"}, path
        config = json.loads((tiny_schnell / component / "config.json").read_text())
        if component.startswith("text_encoder"):
            assert config["torch_dtype"] == "bfloat16"


def test_clip_key_prefix(tiny_schnell, tiny_schnell_unprefixed):
    prefixed = _tensors(tiny_schnell / "text_encoder")
    plain = _tensors(tiny_schnell_unprefixed / "text_encoder")
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in prefixed
    assert all(k.startswith("text_model.") for k in prefixed)
    assert "encoder.layers.0.self_attn.q_proj.weight" in plain
    assert not any(k.startswith("text_model.") for k in plain)
    # Same seed, same weights: only the names differ.
    assert {k.removeprefix("text_model."): v for k, v in prefixed.items()}.keys() == plain.keys()
    for k, v in plain.items():
        assert torch.equal(prefixed["text_model." + k], v)


def test_clip_tokenizer_endoftext_is_highest_and_pads_to_77(tiny_schnell):
    from transformers import CLIPTokenizer

    vocab = json.loads((tiny_schnell / "tokenizer/vocab.json").read_text())
    config = json.loads((tiny_schnell / "text_encoder/config.json").read_text())
    eos = vocab["<|endoftext|>"]
    assert eos == max(vocab.values()) == len(vocab) - 1 == config["vocab_size"] - 1
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 2, 1)
    assert (tiny_schnell / "tokenizer/merges.txt").read_text().startswith("#version: 0.2\n")

    tokenizer = CLIPTokenizer.from_pretrained(tiny_schnell / "tokenizer")
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77 and len(ids) == 77
    assert ids[0] == vocab["<|startoftext|>"]
    tokens = tokenizer.convert_ids_to_tokens(ids[1:4])
    assert tokens == ["luxury</w>", "food</w>", "photograph</w>"]
    assert ids[4:] == [eos] * 73
    assert int(np.argmax(ids)) == 4  # transformers pools CLIP at the first <|endoftext|>


def test_t5_is_gated_gelu_and_tokenizers_agree(tiny_schnell):
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    config = json.loads((tiny_schnell / "text_encoder_2/config.json").read_text())
    assert config["feed_forward_proj"] == "gated-gelu"
    assert (config["d_model"], config["d_kv"], config["num_heads"], config["d_ff"]) == (64, 32, 2, 128)
    weights = _tensors(tiny_schnell / "text_encoder_2")
    assert "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in weights
    assert "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in weights
    assert "shared.weight" in weights

    sp = spm.SentencePieceProcessor(model_file=str(tiny_schnell / "tokenizer_2/spiece.model"))
    expected = sp.encode(PROMPT + ", a cat on a sofa") + [1]  # T5 appends </s> (id 1)
    for cls in (T5Tokenizer, AutoTokenizer):
        tokenizer = cls.from_pretrained(tiny_schnell / "tokenizer_2")
        assert tokenizer(PROMPT + ", a cat on a sofa").input_ids == expected
        assert len(tokenizer) == config["vocab_size"] == sp.get_piece_size() + 100
        assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == config["vocab_size"] - 1
    assert "▁photograph" in sp.encode(PROMPT, out_type=str)


def test_configs_are_the_real_ones(tiny_schnell, tiny_dev):
    for folder, variant in ((tiny_schnell, "schnell"), (tiny_dev, "dev")):
        scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert "_diffusers_version" in scheduler
        assert {k: scheduler[k] for k in SCHEDULER[variant]} == SCHEDULER[variant]
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "FluxPipeline"
        assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
        assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
        transformer = json.loads((folder / "transformer/config.json").read_text())
        assert transformer["guidance_embeds"] == (variant == "dev")
        vae = json.loads((folder / "vae/config.json").read_text())
        assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"]) == (0.3611, 0.1159, 16)
    assert SCHEDULER["schnell"]["shift"] == 1.0 and not SCHEDULER["schnell"]["use_dynamic_shifting"]
    assert SCHEDULER["dev"]["shift"] == 3.0 and SCHEDULER["dev"]["use_dynamic_shifting"]


@pytest.mark.parametrize("name", ["tiny_schnell", "tiny_dev", "tiny_schnell_unprefixed"])
def test_diffusers_loads_every_weight_from_the_files(request, name):
    from tests.fixtures import _pipeline

    folder = request.getfixturevalue(name)
    pipe = _pipeline(str(folder.resolve()), "float32")
    for component in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        files = {k.removeprefix("text_model."): v for k, v in _tensors(folder / component).items()}
        state = getattr(pipe, component).state_dict()
        if component == "text_encoder_2":
            files["encoder.embed_tokens.weight"] = files["shared.weight"]  # tied, stored once
        assert state.keys() == files.keys(), component
        for k, v in files.items():
            assert torch.equal(state[k], v.float()), f"{component}: {k}"


@pytest.mark.parametrize("name", ["tiny_schnell", "tiny_dev"])
def test_pipeline_makes_a_non_constant_image(request, name):
    folder = request.getfixturevalue(name)
    image = _image(folder)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 10, "image is (nearly) constant"
    assert np.isin(image, [0, 255]).mean() < 0.2, "image is mostly saturated"
    assert len(np.unique(image)) > 100


def test_reference_image_rounds_like_pil(tiny_schnell):
    from tests.fixtures import _pipeline

    pipe = _pipeline(str(tiny_schnell.resolve()), "float32")
    pil = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        latents=torch.from_numpy(packed_latents(0, 64, 64)),
        max_sequence_length=256,
    ).images[0]
    assert np.array_equal(np.asarray(pil), _image(tiny_schnell))


def test_guidance_reaches_dev_only(tiny_schnell, tiny_dev):
    assert np.array_equal(_image(tiny_schnell, guidance=1.0), _image(tiny_schnell, guidance=7.0))
    assert not np.array_equal(_image(tiny_dev, guidance=1.0), _image(tiny_dev, guidance=7.0))


def test_clip_prefix_does_not_change_the_image(tiny_schnell, tiny_schnell_unprefixed):
    assert np.array_equal(_image(tiny_schnell), _image(tiny_schnell_unprefixed))


def test_latents_change_the_image(tiny_schnell):
    other = _image(tiny_schnell, latents=packed_latents(1, 64, 64))
    assert np.abs(other.astype(int) - _image(tiny_schnell)).mean() > 5


def test_packed_latents():
    a = packed_latents(3, 64, 128)
    assert a.shape == (1, 4 * 8, 64) and a.dtype == np.float32
    assert np.array_equal(a, packed_latents(3, 64, 128))
    assert not np.array_equal(a, packed_latents(4, 64, 128))
    assert abs(a.std() - 1) < 0.2
    with pytest.raises(InvalidArgument):
        packed_latents(0, 60, 64)


def test_build_is_fast_and_deterministic(tmp_path, tiny_schnell):
    start = time.perf_counter()
    folder = build_tiny_pipeline(tmp_path / "again", "schnell")
    print(f"\nbuild_tiny_pipeline: {time.perf_counter() - start:.2f} s")
    for component in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        for path in (folder / component).glob("*"):
            assert path.read_bytes() == (tiny_schnell / component / path.name).read_bytes(), path
    other = build_tiny_pipeline(tmp_path / "seed1", "schnell", seed=1)
    a, b = _tensors(folder / "transformer"), _tensors(other / "transformer")
    assert not torch.equal(a["proj_out.weight"], b["proj_out.weight"])


def test_build_refuses_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgument, match="unknown variant"):
        build_tiny_pipeline(tmp_path / "x", "shnell")
    (tmp_path / "full").mkdir()
    (tmp_path / "full/file").write_text("")
    with pytest.raises(InvalidArgument, match="not empty"):
        build_tiny_pipeline(tmp_path / "full")
