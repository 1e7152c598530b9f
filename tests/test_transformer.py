"""The MLX FLUX.1 transformer against diffusers' FluxTransformer2DModel, through the diffusers sanitize."""

import copy
import json
import math

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb, get_timestep_embedding
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from mflux.converters.diffusers import sanitize, sanitize_transformer, transformer_to_diffusers
from mflux.errors import MfluxError
from mflux.runtime.layers import apply_rope, rope, timestep_embedding
from mflux.runtime.loader import check_keys, prepare, read_weights
from mflux.runtime.model import Flux, FluxParams
from mflux.runtime.weights import TensorSource

CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "axes_dims_rope": [4, 14, 14],
}
ROWS, COLS, TXT_LEN, BATCH = 4, 6, 8, 2


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # Every tensor random, including those diffusers initialises to 0 or 1 (norms, modulations),
    # so a swapped half or a lost norm scale changes the output.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_" in name and p.ndim == 1 and "linear" not in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=["schnell", "dev"])
def saved(request, tmp_path_factory):
    """(variant, diffusers model, folder with its 3+ shards)."""
    variant = request.param
    config = {**CONFIG, "guidance_embeds": variant == "dev"}
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config).eval()
    _randomize(model, seed=1 if variant == "dev" else 2)
    folder = tmp_path_factory.mktemp(variant)
    total = sum(p.numel() * 4 for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=total // 3 + 1, safe_serialization=True)
    return variant, model, folder


def _inputs(guidance: bool, seed: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    img_ids = np.zeros((ROWS * COLS, 3), np.float32)
    img_ids[:, 1] = np.repeat(np.arange(ROWS), COLS)  # (0, row, col), as FluxPipeline builds them
    img_ids[:, 2] = np.tile(np.arange(COLS), ROWS)
    return {
        "img": rng.standard_normal((BATCH, ROWS * COLS, 64)).astype(np.float32),
        "img_ids": img_ids,
        "txt": rng.standard_normal((BATCH, TXT_LEN, 64)).astype(np.float32),
        "txt_ids": np.zeros((TXT_LEN, 3), np.float32),
        "timesteps": np.array([0.7305, 0.25], np.float32),  # sigmas, as the pipeline passes them
        "y": rng.standard_normal((BATCH, 64)).astype(np.float32),
        "guidance": np.array([3.5, 4.0], np.float32) if guidance else None,
    }


def _torch_forward(model, x: dict, dtype) -> np.ndarray:
    t = {k: (None if v is None else torch.from_numpy(v)) for k, v in x.items()}
    model = torch.nn.Module.to(copy.deepcopy(model), dtype)  # diffusers' .to() warns here
    with torch.no_grad():
        out = model(
            hidden_states=t["img"].to(dtype),
            encoder_hidden_states=t["txt"].to(dtype),
            pooled_projections=t["y"].to(dtype),
            timestep=t["timesteps"].to(dtype),
            img_ids=t["img_ids"],
            txt_ids=t["txt_ids"],
            guidance=None if t["guidance"] is None else t["guidance"].to(dtype),
            return_dict=False,
        )[0]
    return out.float().numpy()


def _load(folder, dtype) -> Flux:
    config = json.loads((folder / "config.json").read_text())
    flux, weights = prepare(folder, "transformer", "hf", {"transformer": config}, dtype)
    flux.load_weights(list(weights.items()), strict=True)
    return flux


def _raw(folder) -> dict:
    # the checkpoint as mx.load gives it: diffusers' names, nothing read yet
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}


def _mlx_forward(flux: Flux, x: dict) -> np.ndarray:
    def batched_ids(ids):
        return mx.broadcast_to(mx.array(ids), (BATCH, *ids.shape))

    out = flux(
        mx.array(x["img"]),
        batched_ids(x["img_ids"]),
        mx.array(x["txt"]),
        batched_ids(x["txt_ids"]),
        mx.array(x["timesteps"]),
        mx.array(x["y"]),
        None if x["guidance"] is None else mx.array(x["guidance"]),
    )
    return np.array(out.astype(mx.float32))


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_fused_parts_from_different_shards(saved, tmp_path):
    # diffusers never splits a block across shards; deal tensors round-robin so q, k and v do
    variant, _, folder = saved
    source = TensorSource.from_folder(folder)
    assert len(source.files) >= 3
    shards = [{} for _ in range(3)]
    for i, k in enumerate(sorted(source.keys())):
        shards[i % 3][k] = source.load(k)
    for i, tensors in enumerate(shards):
        mx.save_safetensors(str(tmp_path / f"model-{i + 1:05d}-of-00003.safetensors"), tensors)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    dealt = TensorSource.from_folder(tmp_path)
    q = "transformer_blocks.0.attn.to_q.weight"
    assert dealt._where[q].path != dealt._where[q.replace("to_q", "to_k")].path
    x = _inputs(guidance=variant == "dev")
    np.testing.assert_array_equal(
        _mlx_forward(_load(tmp_path, mx.float32), x), _mlx_forward(_load(folder, mx.float32), x)
    )


def test_forward_float32_matches_diffusers(saved):
    variant, model, folder = saved
    x = _inputs(guidance=variant == "dev")
    ref = _torch_forward(model, x, torch.float32)
    ours = _mlx_forward(_load(folder, mx.float32), x)
    assert ours.shape == ref.shape == (BATCH, ROWS * COLS, 64)
    err = _relative_error(ours, ref)
    print(f"{variant} float32: max abs diff {np.abs(ours - ref).max():.2e}, relative {err:.2e}")
    # float32 sinusoids of guidance*1000 = 3500 differ by ~2e-4 between any two exp/sin
    # implementations; that, not the network, sets the dev bound.
    assert err < (1e-4 if variant == "dev" else 2e-5)


def test_blocks_match_diffusers(saved):
    # Block by block with the same vec and rope: float32 rounding only, tight enough to tell the
    # tanh GELU from the exact one.
    _, model, folder = saved
    flux = _load(folder, mx.float32)
    rng = np.random.default_rng(4)
    img = rng.standard_normal((BATCH, ROWS * COLS, 64)).astype(np.float32)
    txt = rng.standard_normal((BATCH, TXT_LEN, 64)).astype(np.float32)
    vec = rng.standard_normal((BATCH, 64)).astype(np.float32)
    x = _inputs(guidance=False)
    ids = np.concatenate([x["txt_ids"], x["img_ids"]])
    pe = rope(mx.array(ids)[None], flux.params.axes_dim)
    with torch.no_grad():
        rotary = model.pos_embed(torch.from_numpy(ids))
        t_txt, t_img = model.transformer_blocks[0](
            torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(vec), rotary
        )
        t_joint = torch.cat(
            model.single_transformer_blocks[0](
                torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(vec), rotary
            ),
            dim=1,
        )
    m_img, m_txt = flux.double_blocks[0](mx.array(img), mx.array(txt), mx.array(vec), pe)
    m_joint = flux.single_blocks[0](mx.concatenate([mx.array(txt), mx.array(img)], axis=1), mx.array(vec), pe)
    for ours, ref in ((m_img, t_img), (m_txt, t_txt), (m_joint, t_joint)):
        err = _relative_error(np.array(ours), ref.numpy())
        print(f"block relative error {err:.1e}")
        assert err < 2e-6


def test_forward_bfloat16_matches_diffusers(saved):
    variant, model, folder = saved
    x = _inputs(guidance=variant == "dev")
    ref = _torch_forward(model, x, torch.bfloat16)
    ref32 = _torch_forward(model, x, torch.float32)
    ours = _mlx_forward(_load(folder, mx.bfloat16), x)
    err = _relative_error(ours, ref)
    # For scale: both round sigma*1000 in bfloat16 (730.5 -> 732), so bf16 runs sit far from float32.
    print(
        f"{variant} bfloat16: relative {err:.2e} (torch bf16 vs its f32: {_relative_error(ref, ref32):.2e})"
    )
    assert err < 3e-2


def test_guidance(saved):
    # dev embeds guidance and needs it; schnell has no embedder and ignores it
    variant, _, folder = saved
    flux = _load(folder, mx.float32)
    x = _inputs(guidance=True)
    a = _mlx_forward(flux, x)
    b = _mlx_forward(flux, {**x, "guidance": np.array([1.0, 1.0], np.float32)})
    if variant == "dev":
        assert np.abs(a - b).max() > 1e-3
        with pytest.raises(MfluxError, match="guidance"):
            _mlx_forward(flux, {**x, "guidance": None})
    else:
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, _mlx_forward(flux, {**x, "guidance": None}))


def test_round_trip_to_diffusers(saved):
    _, model, folder = saved
    bfl = read_weights(folder, "transformer", "hf")
    back = transformer_to_diffusers(bfl)
    original = model.state_dict()
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(np.array(back[k]), v.numpy(), err_msg=k)
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.extra"):
        transformer_to_diffusers({**bfl, "double_blocks.0.img_attn.extra": bfl["img_in.bias"]})


def test_key_check_reports_unmapped_and_missing(saved):
    _, _, folder = saved
    raw = _raw(folder)
    module = Flux(FluxParams.from_diffusers_config(json.loads((folder / "config.json").read_text())))
    check_keys(sanitize_transformer(raw), module, "transformer")  # complete: no error
    extra = "transformer_blocks.0.attn.to_qkv.weight"
    with pytest.raises(MfluxError, match="to_qkv"):
        check_keys(sanitize_transformer({**raw, extra: raw["x_embedder.weight"]}), module, "transformer")
    # a part of a fused matrix is named by its diffusers name
    without = {k: v for k, v in raw.items() if k != "transformer_blocks.1.attn.add_k_proj.bias"}
    with pytest.raises(MfluxError, match="add_k_proj.bias"):
        sanitize_transformer(without)
    # a whole tensor missing and one left over: both in one line
    both = {k: v for k, v in raw.items() if k != "proj_out.bias"} | {extra: raw["x_embedder.weight"]}
    with pytest.raises(MfluxError) as e:
        check_keys(sanitize_transformer(both), module, "transformer")
    message = str(e.value)
    assert "\n" not in message and "final_layer.linear.bias" in message and extra in message
    assert "1 tensors match nothing" in message and "1 missing" in message
    # a tensor of the wrong size is named with both shapes, before load_weights sees it
    bias = sanitize_transformer(raw)
    hidden = bias["img_in.bias"].shape[0]
    bias["img_in.bias"] = mx.zeros((hidden + 1,))
    with pytest.raises(
        MfluxError, match=rf"1 of the wrong shape \(img_in.bias \({hidden + 1},\) for \({hidden},\)\)"
    ):
        check_keys(bias, module, "transformer")


def test_params_from_shapes_equal_config(saved):
    variant, model, folder = saved
    shapes = {name: tuple(a.shape) for name, a in read_weights(folder, "transformer", "hf").items()}
    config = json.loads((folder / "config.json").read_text())
    params = FluxParams.from_diffusers_config(config)
    assert FluxParams.from_shapes(shapes) == params
    assert params.guidance_embed == (variant == "dev")
    assert FluxParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params


def test_params_real_sizes():
    real = {
        "in_channels": 64,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    }
    p = FluxParams.from_diffusers_config(real)
    assert (p.hidden_size, p.depth, p.depth_single_blocks, p.axes_dim) == (3072, 19, 38, (16, 56, 56))
    shapes = {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "vector_in.in_layer.weight": (3072, 768),
        "guidance_in.in_layer.weight": (3072, 256),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.0.img_mlp.0.weight": (12288, 3072),
        "double_blocks.0.img_attn.qkv.bias": (9216,),
        "final_layer.linear.weight": (64, 3072),
        **{f"double_blocks.{i}.img_mod.lin.weight": (18432, 3072) for i in range(19)},
        **{f"single_blocks.{i}.linear1.weight": (21504, 3072) for i in range(38)},
    }
    assert FluxParams.from_shapes(shapes) == p
    with pytest.raises(MfluxError, match="img_in.weight"):
        FluxParams.from_shapes({})
    with pytest.raises(MfluxError, match="rope axes"):
        FluxParams.from_diffusers_config({**real, "axes_dims_rope": [16, 56, 50]})


def test_timestep_embedding_matches_diffusers():
    t = np.array([0.0, 1.0, 250.0, 730.5, 999.0, 1000.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    ours = np.array(timestep_embedding(mx.array(t), 256))
    assert np.abs(ours - ref.numpy()).max() < 1e-4


def test_rope_matches_diffusers_at_real_size():
    # real axes and 2048 px worth of positions (128 x 128 patches), where float32 angles matter most
    axes = (16, 56, 56)
    rng = np.random.default_rng(0)
    ids = np.zeros((40, 3), np.float32)
    ids[8:, 1] = rng.integers(0, 128, 32)
    ids[8:, 2] = rng.integers(0, 128, 32)
    x = rng.standard_normal((1, 40, 2, 128)).astype(np.float32)  # (B, L, H, D), diffusers' layout
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(torch.from_numpy(ids))
    ref = apply_rotary_emb(torch.from_numpy(x), (cos, sin), sequence_dim=1).numpy()
    pe = rope(mx.array(ids)[None], axes)
    ours = np.array(apply_rope(mx.array(x).transpose(0, 2, 1, 3), pe).transpose(0, 2, 1, 3))
    assert np.abs(ours - ref).max() < 1e-4


def test_sanitize_dispatch(saved):
    _, _, folder = saved
    raw = _raw(folder)
    assert set(sanitize("transformer", raw)) == set(sanitize_transformer(raw))
    with pytest.raises(ValueError, match="unknown component"):
        sanitize("unet", raw)


def test_loading_reads_nothing_until_evaluated(saved):
    # mx.load and the sanitize (renames, q/k/v concatenation, half swap) stay lazy: no buffer exists
    # until evaluation, which is what lets the loader and convert bound their memory.
    _, _, folder = saved
    before = mx.get_active_memory()
    weights = read_weights(folder, "transformer", "hf")
    assert "double_blocks.0.img_attn.qkv.weight" in weights
    assert mx.get_active_memory() - before == 0
    total = sum(v.nbytes for v in weights.values())
    mx.eval(list(weights.values()))
    assert mx.get_active_memory() - before >= total > 0
