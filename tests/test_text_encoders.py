"""T5 and CLIP in MLX against transformers in torch, on tiny random models saved as transformers saves them,
and the tokenizers' ids against those diffusers' FluxPipeline feeds its encoders."""

import copy
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime import clip, t5, textops
from mflux.runtime.loader import cast_and_quantize, check_keys, read_weights
from mflux.runtime.tokenizers import clip_ids, load_tokenizers, t5_ids
from tests.fixtures import CORPUS

T5_VOCAB = 300
CLIP_VOCAB = 300
EOT = CLIP_VOCAB - 1  # end-of-text has the highest id, as in the real CLIP vocab (49407)
F32_ATOL = 1e-4  # outputs are layer-normed, of order 1
# bf16 against transformers' bf16 (sdpa): measured 0.16 for T5 (transformers' own sdpa and eager bf16 outputs
# differ as much) and 0.047 for CLIP, on outputs up to 4.4.
T5_BF16_ATOL = 0.25
CLIP_BF16_ATOL = 0.1


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Norm weights start at 1 and biases at 0; random offsets make every parameter matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _torch_t5(feed_forward_proj: str) -> transformers.T5EncoderModel:
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=T5_VOCAB,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        feed_forward_proj=feed_forward_proj,
    )
    return _perturb(transformers.T5EncoderModel(cfg), 1)


def _torch_clip(hidden_act: str, eos_token_id: int = 2) -> transformers.CLIPTextModel:
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_attention_heads=2,
        num_hidden_layers=2,
        hidden_act=hidden_act,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )
    return _perturb(transformers.CLIPTextModel(cfg), 2)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a saved model folder whose tensors are `edit(dict)`."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(
        edit(load_file(src / "model.safetensors")), dst / "model.safetensors", metadata={"format": "pt"}
    )
    return dst


def _load(module, config_cls, model_cls, folder: Path, dtype=mx.float32):
    cfg = config_cls.from_dict(json.loads((folder / "config.json").read_text()))
    component = "text_encoder_2" if module is t5 else "text_encoder"
    weights = read_weights(folder, component, "hf")
    model = model_cls(cfg)
    check_keys(weights, model, str(folder))
    model.load_weights(list(cast_and_quantize(component, weights, dtype, None).items()), strict=True)
    return model


def _max_diff(a: mx.array, b: torch.Tensor) -> float:
    d = float(np.abs(np.array(a.astype(mx.float32)) - b.float().numpy()).max())
    return d


# ---- T5


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def t5_saved(request, tmp_path_factory):
    model = _torch_t5(request.param)
    folder = tmp_path_factory.mktemp(f"t5-{request.param}")
    model.save_pretrained(folder)
    return model, folder


def _t5_ids(batch: int, length: int, seed: int) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, T5_VOCAB, (batch, length)).astype(np.int32)
    ids[0, length // 2 :] = 0  # FLUX pads with <pad> 0 and passes no mask, so padding is attended
    ids[:, length // 2 - 1] = 1
    return ids


def _t5_diff(ours, theirs, ids: np.ndarray) -> float:
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids).long()).last_hidden_state
    out = ours(mx.array(ids))
    assert out.shape == tuple(ref.shape)
    return _max_diff(out, ref)


def test_t5_float32_matches_transformers(t5_saved):
    model, folder = t5_saved
    ours = _load(t5, t5.T5Config, t5.T5Encoder, folder)
    assert ours.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == mx.float32
    assert _t5_diff(ours, model, _t5_ids(2, 40, 0)) < F32_ATOL


def test_t5_long_sequence_uses_far_buckets(t5_saved):
    # 256 tokens reach distances beyond relative_attention_max_distance (128): the clamped log buckets.
    model, folder = t5_saved
    ours = _load(t5, t5.T5Config, t5.T5Encoder, folder)
    assert _t5_diff(ours, model, _t5_ids(1, 256, 1)) < F32_ATOL


def _assert_bf16_close(ours: mx.array, ref16: torch.Tensor, ref32: torch.Tensor, atol: float) -> None:
    assert ours.dtype == mx.bfloat16
    assert _max_diff(ours, ref16) < atol
    # about as accurate as transformers' own bf16: mean error against float32 measured 1.10-1.18x its error
    ours_err = np.abs(np.array(ours.astype(mx.float32)) - ref32.numpy()).mean()
    assert ours_err <= 1.3 * float((ref16.float() - ref32).abs().mean())


def test_t5_bfloat16_matches_transformers(t5_saved):
    model, folder = t5_saved
    ours = _load(t5, t5.T5Config, t5.T5Encoder, folder, mx.bfloat16)
    ids = _t5_ids(2, 40, 2)
    with torch.no_grad():
        ref32 = model(torch.from_numpy(ids).long()).last_hidden_state
        ref16 = copy.deepcopy(model).to(torch.bfloat16)(torch.from_numpy(ids).long()).last_hidden_state
    _assert_bf16_close(ours(mx.array(ids)), ref16, ref32, T5_BF16_ATOL)


def test_relative_position_buckets_equal_transformers():
    rel = torch.arange(-1024, 1025)
    for buckets, distance in [(32, 128), (32, 64), (16, 32)]:
        ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=True, num_buckets=buckets, max_distance=distance
        )
        ours = t5.relative_position_bucket(mx.array(rel.numpy()), buckets, distance)
        np.testing.assert_array_equal(np.array(ours), ref.numpy())


def test_t5_sanitize_accepts_tied_embedding_copies(t5_saved, tmp_path):
    model, folder = t5_saved
    both = _rewrite(
        folder, tmp_path / "both", lambda d: {**d, "encoder.embed_tokens.weight": d["shared.weight"].clone()}
    )
    only_embed = _rewrite(
        folder,
        tmp_path / "embed",
        lambda d: {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in d.items()},
    )
    ids = _t5_ids(1, 16, 3)
    for f in (both, only_embed):
        assert _t5_diff(_load(t5, t5.T5Config, t5.T5Encoder, f), model, ids) < F32_ATOL
    weights = read_weights(both, "text_encoder_2", "hf")
    assert "shared.weight" in weights and "encoder.embed_tokens.weight" not in weights


def test_t5_config_is_tolerant_and_refuses_unknown_activation():
    cfg = t5.T5Config.from_dict(
        {"d_model": 8, "num_heads": 1, "dense_act_fn": "gelu_new", "architectures": ["x"]}
    )
    assert (cfg.d_model, cfg.num_heads, cfg.activation, cfg.is_gated) == (8, 1, "gelu_new", True)
    with pytest.raises(MfluxError, match="feed_forward_proj"):
        t5.T5Encoder(
            t5.T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, feed_forward_proj="gated-swish")
        )


# ---- CLIP


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def clip_saved(request, tmp_path_factory):
    model = _torch_clip(request.param)
    plain = tmp_path_factory.mktemp(f"clip-{request.param}")
    model.save_pretrained(plain)  # transformers 5: no text_model. prefix
    prefixed = _rewrite(
        plain, plain.parent / f"{plain.name}-prefixed", lambda d: {f"text_model.{k}": v for k, v in d.items()}
    )
    return model, plain, prefixed


def _clip_ids(eot_at: list[int], seed: int, eot: int = EOT) -> np.ndarray:
    # bos, random tokens below end-of-text, end-of-text, then end-of-text padding as the tokenizer writes it
    ids = np.random.default_rng(seed).integers(3, CLIP_VOCAB - 2, (len(eot_at), 77)).astype(np.int32)
    ids[:, 0] = CLIP_VOCAB - 2
    for row, i in enumerate(eot_at):
        ids[row, i:] = eot
    return ids


def _clip_diff(ours, theirs, ids: np.ndarray) -> tuple[float, float]:
    with torch.no_grad():
        ref = theirs(torch.from_numpy(ids).long())
    hidden, pooled = ours(mx.array(ids))
    assert hidden.shape == tuple(ref.last_hidden_state.shape) and pooled.shape == tuple(
        ref.pooler_output.shape
    )
    return _max_diff(hidden, ref.last_hidden_state), _max_diff(pooled, ref.pooler_output)


def test_clip_float32_matches_transformers_in_both_key_styles(clip_saved):
    model, plain, prefixed = clip_saved
    ids = _clip_ids([5, 30, 76], 0)
    for folder in (plain, prefixed):
        ours = _load(clip, clip.CLIPTextConfig, clip.CLIPTextModel, folder)
        assert max(_clip_diff(ours, model, ids)) < F32_ATOL


def test_clip_legacy_pooling_is_at_first_end_of_text(clip_saved):
    model, _, prefixed = clip_saved
    ours = _load(clip, clip.CLIPTextConfig, clip.CLIPTextModel, prefixed)
    ids = _clip_ids([7, 20], 1)
    hidden, pooled = ours(mx.array(ids))
    np.testing.assert_array_equal(np.array(pooled), np.array(hidden[mx.arange(2), mx.array([7, 20])]))
    # The causal mask makes the pooled output independent of what follows end-of-text.
    ids2 = ids.copy()
    ids2[0, 8:] = 3
    ids2[0, 8] = EOT
    np.testing.assert_allclose(np.array(ours(mx.array(ids2))[1][0]), np.array(pooled[0]), atol=1e-6)


def test_clip_new_eos_id_pools_at_first_eos(clip_saved, tmp_path):
    # With a non-legacy eos_token_id transformers pools at its first occurrence, not at argmax(ids).
    model, plain, _ = clip_saved
    eos = 5
    new = _torch_clip(model.config.hidden_act, eos_token_id=eos)
    new.load_state_dict(model.state_dict())
    new.save_pretrained(tmp_path)
    ours = _load(clip, clip.CLIPTextConfig, clip.CLIPTextModel, tmp_path)
    ids = _clip_ids([9, 40], 2, eot=eos)
    ids[:, 60] = EOT  # the highest id, after eos: argmax would pick it
    assert max(_clip_diff(ours, new, ids)) < F32_ATOL


def test_clip_bfloat16_matches_transformers(clip_saved):
    model, _, prefixed = clip_saved
    ours = _load(clip, clip.CLIPTextConfig, clip.CLIPTextModel, prefixed, mx.bfloat16)
    ids = _clip_ids([4, 50], 3)
    with torch.no_grad():
        ref32 = model(torch.from_numpy(ids).long())
        ref16 = copy.deepcopy(model).to(torch.bfloat16)(torch.from_numpy(ids).long())
    hidden, pooled = ours(mx.array(ids))
    _assert_bf16_close(hidden, ref16.last_hidden_state, ref32.last_hidden_state, CLIP_BF16_ATOL)
    _assert_bf16_close(pooled, ref16.pooler_output, ref32.pooler_output, CLIP_BF16_ATOL)


def test_clip_sanitize_drops_position_ids_and_strays_are_reported(clip_saved, tmp_path):
    _, _, prefixed = clip_saved
    extra = {
        "text_model.embeddings.position_ids": torch.arange(77)[None],
        "text_projection.weight": torch.zeros(4, 4),
    }
    folder = _rewrite(prefixed, tmp_path / "x", lambda d: {**d, **extra})
    weights = read_weights(folder, "text_encoder", "hf")
    cfg = clip.CLIPTextConfig.from_dict(json.loads((folder / "config.json").read_text()))
    with pytest.raises(MfluxError, match="text_projection.weight") as e:
        check_keys(weights, clip.CLIPTextModel(cfg), "clip")
    assert "1 tensors match nothing in FLUX.1 (text_projection.weight)" in str(e.value)
    assert "position_ids" not in str(e.value) and "missing" not in str(e.value)


# ---- tokenizers, against what diffusers' FluxPipeline feeds its encoders

PROMPTS = [
    "a photo of a cat sitting on a red sofa",
    "",
    "Ünïcödé ☃ 123, MIXED case!!  spaces ",
    " ".join(CORPUS),  # beyond 77 CLIP tokens and 256 T5 tokens: truncated
]


@pytest.fixture(scope="module")
def flux_pipe(tiny_schnell):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_schnell, dtype=torch.float32, local_files_only=True)


def _fed_ids(pipe, prompts: list[str], max_length: int):
    """The ids FluxPipeline.encode_prompt passes to CLIP and T5, and the embeddings it returns."""
    seen = {}

    def hook(name):
        def record(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["input_ids"]).numpy()

        return record

    handles = [
        pipe.text_encoder.register_forward_pre_hook(hook("clip"), with_kwargs=True),
        pipe.text_encoder_2.register_forward_pre_hook(hook("t5"), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            t5_embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=max_length)
    finally:
        for h in handles:
            h.remove()
    return seen["clip"], seen["t5"], t5_embeds, pooled


@pytest.mark.parametrize("max_length", [256, 512])
def test_token_ids_equal_flux_pipeline(tiny_schnell, flux_pipe, max_length):
    clip_tok, t5_tok = load_tokenizers(tiny_schnell)
    prompts = PROMPTS + [" ".join(CORPUS * 2)]
    ref_clip, ref_t5, _, _ = _fed_ids(flux_pipe, prompts, max_length)
    ours_clip, ours_t5 = clip_ids(clip_tok, prompts), t5_ids(t5_tok, prompts, max_length)
    assert ours_clip.dtype == ours_t5.dtype == np.int32
    assert ours_clip.shape == (len(prompts), 77) and ours_t5.shape == (len(prompts), max_length)
    np.testing.assert_array_equal(ours_clip, ref_clip)
    np.testing.assert_array_equal(ours_t5, ref_t5)
    # the long prompts really truncate, and short ones really pad
    assert ours_clip[3, -1] == ours_clip[1, -1] == clip_tok.eos_id
    assert ours_t5[-1, -1] == t5_tok.eos_id and (ours_t5[-1] != t5_tok.pad_id).all()
    assert ours_t5[0, -1] == t5_tok.pad_id


def test_encoders_from_the_pipeline_folder_equal_flux_pipeline(tiny_schnell, flux_pipe):
    # The real layout: bf16 weights, T5 in two shards, CLIP keys with the text_model. prefix.
    clip_tok, t5_tok = load_tokenizers(tiny_schnell)
    _, _, ref_t5, ref_pooled = _fed_ids(flux_pipe, PROMPTS, 256)
    ours_clip = _load(clip, clip.CLIPTextConfig, clip.CLIPTextModel, tiny_schnell / "text_encoder")
    ours_t5 = _load(t5, t5.T5Config, t5.T5Encoder, tiny_schnell / "text_encoder_2")
    assert _max_diff(ours_t5(mx.array(t5_ids(t5_tok, PROMPTS, 256))), ref_t5) < F32_ATOL
    assert _max_diff(ours_clip(mx.array(clip_ids(clip_tok, PROMPTS)))[1], ref_pooled) < F32_ATOL


def test_missing_tokenizer_file_is_named(tiny_schnell, tmp_path):
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_schnell / sub, tmp_path / sub)
    (tmp_path / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(MfluxError, match="tokenizer: missing tokenizer file merges.txt"):
        load_tokenizers(tmp_path)
    shutil.copytree(tiny_schnell / "tokenizer", tmp_path / "tokenizer", dirs_exist_ok=True)
    for f in ("tokenizer.json", "spiece.model"):
        (tmp_path / "tokenizer_2" / f).unlink()
    with pytest.raises(MfluxError, match="tokenizer_2: missing tokenizer file tokenizer.json"):
        load_tokenizers(tmp_path)


def test_token_id_arguments_are_checked(tiny_schnell):
    clip_tok, t5_tok = load_tokenizers(tiny_schnell)
    with pytest.raises(InvalidArgument, match="between 1 and 512"):
        t5_ids(t5_tok, ["a cat"], 513)
    with pytest.raises(InvalidArgument, match="list of strings"):
        clip_ids(clip_tok, "a cat")


# ---- the encoders' CUDA path (mflux.runtime.cuda.jitfree): no gathers and no compiled graphs


def test_lookups_are_exact_as_one_hot_matmuls(cuda_paths):
    jitfree = cuda_paths.jitfree
    rng = np.random.default_rng(0)
    table = mx.array(rng.standard_normal((300, 64)).astype(np.float32) * 40).astype(mx.bfloat16)
    ids = mx.array(rng.integers(0, 300, (3, 17)).astype(np.int32))
    x = mx.array(rng.standard_normal((3, 17, 64)).astype(np.float32)).astype(mx.bfloat16)
    pos = mx.argmax(ids, axis=-1)  # uint32, as CLIP's pooling positions
    plain = table[ids], x[mx.arange(3), pos]
    # a quantized table: the same rows as nn.QuantizedEmbedding's gather
    layer = nn_quantized_embedding(table)
    gathered = layer(ids)
    with cuda_paths.tuned(avoid_jit=True):
        np.testing.assert_array_equal(_f32(jitfree.lookup(table, ids)), _f32(plain[0]))
        np.testing.assert_array_equal(_f32(jitfree.pick(x, pos)), _f32(plain[1]))
        # a float32 table keeps the gather (a float32 matmul may round through TF32 on a GPU)
        t32 = table.astype(mx.float32) + 1e-3
        np.testing.assert_array_equal(np.array(jitfree.lookup(t32, ids)), np.array(t32[ids]))
        np.testing.assert_array_equal(_f32(jitfree.embed(layer, ids)), _f32(gathered))
        # the encoders reach them through textops
        np.testing.assert_array_equal(_f32(textops.pick(x, pos)), _f32(plain[1]))
        np.testing.assert_array_equal(_f32(textops.embed(layer, ids)), _f32(gathered))


def nn_quantized_embedding(table: mx.array):
    import mlx.nn as nn

    layer = nn.Embedding(*table.shape)
    layer.weight = table
    return nn.QuantizedEmbedding.from_embedding(layer, group_size=32, bits=4)


def test_gelu_in_plain_ops_equals_mlx_compiled_gelu(cuda_paths):
    import mlx.nn as nn

    x = mx.array(np.linspace(-8, 8, 4001, dtype=np.float32))
    with cuda_paths.tuned(avoid_jit=True):
        for dtype, atol in ((mx.float32, 1e-6), (mx.bfloat16, 2**-7)):
            ours, theirs = cuda_paths.jitfree.gelu_approx(x.astype(dtype)), nn.gelu_approx(x.astype(dtype))
            assert ours.dtype == dtype
            np.testing.assert_allclose(
                np.array(ours.astype(mx.float32)), np.array(theirs.astype(mx.float32)), atol=atol
            )


def test_encoders_on_the_cuda_path_equal_the_plain_path_in_bfloat16(t5_saved, clip_saved, cuda_paths):
    t5_model = _load(t5, t5.T5Config, t5.T5Encoder, t5_saved[1], mx.bfloat16)
    clip_model = _load(clip, clip.CLIPTextConfig, clip.CLIPTextModel, clip_saved[2], mx.bfloat16)
    t5_in, clip_in = mx.array(_t5_ids(2, 40, 4)), mx.array(_clip_ids([6, 33], 5))
    plain = t5_model(t5_in), *clip_model(clip_in)
    with cuda_paths.tuned(avoid_jit=True):
        free = t5_model(t5_in), *clip_model(clip_in)
    # CLIP has no gelu_approx: its lookups are exact, so all of it is equal; T5's gelu in plain ops
    # rounds between ops where the compiled one may not
    np.testing.assert_array_equal(_f32(free[1]), _f32(plain[1]))
    np.testing.assert_array_equal(_f32(free[2]), _f32(plain[2]))
    assert float(np.abs(_f32(free[0]) - _f32(plain[0])).max()) <= T5_BF16_ATOL


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))
