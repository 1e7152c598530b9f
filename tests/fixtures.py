"""Tiny random-weight FLUX.1 pipelines in the real diffusers layout, and diffusers reference images.

The folders have exactly the files of black-forest-labs/FLUX.1-{schnell,dev} (bf16 weights, the same
shard names and counts, index jsons, tokenizer files), with a transformer, T5, CLIP and VAE small
enough to build in seconds and run on a CPU.
"""

import collections
import contextlib
import functools
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mflux.errors import InvalidArgument

VARIANTS = ("schnell", "dev", "kontext", "fill", "krea", "canny", "depth")
# Each variant's diffusers pipeline class (model_index.json's _class_name) and transformer input width.
PIPELINES = {
    "schnell": "FluxPipeline",
    "dev": "FluxPipeline",
    "kontext": "FluxKontextPipeline",
    "fill": "FluxFillPipeline",
    "krea": "FluxPipeline",
    "canny": "FluxControlPipeline",
    "depth": "FluxControlPipeline",
}
# Fill: latents 64 + masked-image latents 64 + the mask packed 8x8 per patch, 256; Control: + control latents
IN_CHANNELS = {"fill": 384, "canny": 128, "depth": 128}

# The files a pull of the real repo needs (FACTS.md), relative to the pipeline folder.
REPO_FILES = sorted(
    [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
)

# The real VAE's architecture (4 blocks, scale factor 8, 16 latent channels), with narrow channels.
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

SCHEDULER = {
    "schnell": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
    "dev": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
}
for _v in ("kontext", "fill", "krea", "canny", "depth"):
    SCHEDULER[_v] = SCHEDULER["dev"]  # their repos carry dev's

# Tokenizer training text: prompt-like sentences, so common prompt words get whole tokens.
CORPUS = [
    "Luxury food photograph",
    "a luxury food photograph of a chocolate cake on a marble table",
    "a photo of a cat sitting on a red sofa",
    "a photo of a dog running on the beach at sunset",
    "a watercolor painting of a mountain lake at sunrise",
    "an oil painting of a stormy sea with a small boat",
    "portrait of an old man with a beard, dramatic lighting",
    "portrait photograph of a young woman, soft light, shallow depth of field",
    "a futuristic city skyline at night, neon lights, rain",
    "a bowl of fresh fruit on a wooden table, studio lighting",
    "a cup of coffee and a croissant, morning light, food photography",
    "an astronaut riding a horse on the moon, digital art",
    "a cozy cabin in a snowy forest, warm light in the windows",
    "a close up photo of a flower with drops of water",
    "a castle on a hill above a green valley, fantasy art",
    "a street market in the old town, people walking, golden hour",
    "a robot reading a book in a library, highly detailed",
    "a vintage car parked in front of a diner, film photograph",
    "a bright kitchen with white cabinets and plants, interior design",
    "a plate of sushi on a black slate, top view, professional photo",
    "a dragon flying over the mountains, epic, cinematic",
    "the word hello written in the sand, beach, blue sky",
    "a cute fox in the grass, wildlife photography, 4k",
    "a glass of red wine on a table with candles, elegant dinner",
    "minimalist logo of a tree, flat design, simple shapes",
    "an abstract painting with bold colors and geometric shapes",
    "a bridge over a river in autumn, orange leaves, reflections",
    "a lighthouse on a rocky coast under a dramatic cloudy sky",
    "a small bakery with bread and pastries in the window",
    "a busy train station, motion blur, long exposure photograph",
    "a hamburger with cheese and fries, commercial food photography",
    "a portrait of a cat wearing a hat, 3d render, pixar style",
    "macro photograph of a bee on a sunflower, sharp focus",
    "a snowy mountain peak above the clouds, aerial view, 8k",
]


def build_tiny_pipeline(
    path: Path, variant: str = "schnell", *, clip_prefixed: bool = True, seed: int = 0, clip_heads: int = 2
) -> Path:
    """Write a tiny random FLUX.1 `variant` pipeline into the new folder `path`, with exactly the real
    repo's files. `clip_prefixed` writes CLIP keys as `text_model.…` (the real repo), else without;
    `clip_heads` 1 gives CLIP-L's 64-wide heads."""
    if variant not in VARIANTS:
        raise InvalidArgument(f"unknown variant {variant!r} (choose one of: {', '.join(VARIANTS)})")
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise InvalidArgument(f"{path} is not empty (pass a new folder)")
    import torch

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        tmp = Path(tmp)
        _write_clip_tokenizer(path / "tokenizer")
        _write_t5_tokenizer(path / "tokenizer_2", tmp)
        torch.manual_seed(seed)
        pipe = _tiny_pipeline(path, variant, clip_heads)
        pipe.save_pretrained(tmp / "saved", safe_serialization=True, max_shard_size="10GB")
        _copy_configs(tmp / "saved", path)
        _reshard(tmp / "saved/transformer", path / "transformer", "diffusion_pytorch_model", 3)
        _reshard(tmp / "saved/text_encoder_2", path / "text_encoder_2", "model", 2)
        _reshard(tmp / "saved/vae", path / "vae", "diffusion_pytorch_model", 1)
        prefix = "text_model." if clip_prefixed else ""
        _reshard(tmp / "saved/text_encoder", path / "text_encoder", "model", 1, rename=lambda k: prefix + k)
    return path


@contextlib.contextmanager
def _quiet():
    # Building warns that casting with to() may skip fp32 modules (there are none here), and saving
    # and loading draw progress bars; none of it says anything about a fixture.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    verbosity = diffusers_logging.get_verbosity()
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()


def _tiny_pipeline(folder: Path, variant: str, clip_heads: int = 2):
    import diffusers
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = T5Tokenizer.from_pretrained(folder / "tokenizer_2")
    clip = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        projection_dim=64,
        num_attention_heads=clip_heads,
        num_hidden_layers=2,
        hidden_act="quick_gelu",
        max_position_embeddings=77,
        # The real config's legacy ids: with eos 2, transformers pools at argmax(input_ids).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    t5 = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=IN_CHANNELS.get(variant, 64),
        out_channels=64 if variant in IN_CHANNELS else None,  # wider in than out: 64 (Fill's real config)
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=variant != "schnell",
        axes_dims_rope=(4, 14, 14),
    )
    vae = AutoencoderKL(**TINY_VAE, sample_size=1024)
    pipe = getattr(diffusers, PIPELINES[variant])(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER[variant]),
        vae=vae,
        text_encoder=CLIPTextModel(clip),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    # The real weights are bf16; the configs then record that dtype as the real ones do.
    return pipe.to(torch.bfloat16)


def _copy_configs(saved: Path, folder: Path) -> None:
    index = json.loads((saved / "model_index.json").read_text())
    # The real repo was saved with transformers 4, whose fast T5 tokenizer had its own class name.
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    _write_json(folder / "model_index.json", index)
    (folder / "scheduler").mkdir()
    shutil.copy(saved / "scheduler/scheduler_config.json", folder / "scheduler/scheduler_config.json")
    for component in ("transformer", "vae"):
        (folder / component).mkdir()
        shutil.copy(saved / component / "config.json", folder / component / "config.json")
    for component in ("text_encoder", "text_encoder_2"):
        (folder / component).mkdir()
        config = json.loads((saved / component / "config.json").read_text())
        # The real configs come from transformers 4: `torch_dtype`, and T5's own untied settings
        # (transformers 5 rewrites them when it builds T5EncoderModel).
        config["torch_dtype"] = config.pop("dtype")
        if component == "text_encoder_2":
            config.update(is_encoder_decoder=True, tie_word_embeddings=False)
            del config["is_decoder"], config["scale_decoder_outputs"]
        _write_json(folder / component / "config.json", dict(sorted(config.items())))


def _reshard(saved: Path, folder: Path, prefix: str, count: int, rename=lambda k: k) -> None:
    # save_pretrained picks shard counts by size; the real repos have fixed names and counts.
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(saved.glob("*.safetensors")):
        tensors.update({rename(k): v.contiguous() for k, v in load_file(f).items()})
    if count == 1:
        _save(tensors, folder / f"{prefix}.safetensors")
        return
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    shards: list[dict] = [{}]
    size = 0
    for i, (name, v) in enumerate(tensors.items()):
        # Fill shards in order up to a third (half) of the bytes, keeping a tensor for each later shard.
        left = len(tensors) - i
        if shards[-1] and len(shards) < count and (size >= total / count or left <= count - len(shards)):
            shards.append({})
            size = 0
        shards[-1][name] = v
        size += v.numel() * v.element_size()
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{prefix}-{i:05d}-of-{count:05d}.safetensors"
        _save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates files 0600; downloaded ones are 0644


def _words(text: str) -> list[str]:
    # CLIP's pre-tokenizer on lowercase ASCII text: letter runs, single digits, punctuation runs.
    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())


def _byte_chars() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the rest map above 255.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _learn_merges(count: int) -> list[tuple[str, str]]:
    words = collections.Counter(w for s in CORPUS for w in _words(s))
    split = {w: (*w[:-1], w[-1] + "</w>") for w in words}
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for w, parts in split.items():
            for pair in zip(parts, parts[1:]):
                pairs[pair] += words[w]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        for w, parts in split.items():
            out, i = [], 0
            while i < len(parts):
                if parts[i : i + 2] == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            split[w] = tuple(out)
    return merges


def _special(content: str, normalized: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_tokenizers(
    folder: Path, corpus: list[str] | None = None, *, merges: int = 300, pieces: int = 400
) -> Path:
    """`tokenizer/` (CLIP's BPE) and `tokenizer_2/` (T5's unigram) in the real files under the new `folder`:
    the tiny pipelines' by default, or ones learned from `corpus` (about `merges` merges, `pieces` pieces)."""
    folder = Path(folder)
    learned = _learn_merges(merges) if corpus is None else _train_merges(corpus, merges)
    _write_clip_tokenizer(folder / "tokenizer", learned)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        _write_t5_tokenizer(folder / "tokenizer_2", Path(tmp), corpus or CORPUS, pieces)
    return folder


def _train_merges(corpus: list[str], count: int) -> list[tuple[str, str]]:
    # The `tokenizers` trainer on CLIP's pre-tokenizer: thousands of merges in a second.
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = BpeTrainer(
        vocab_size=2 * 256 + count, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator((s.lower() for s in corpus), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _write_clip_tokenizer(folder: Path, merges: list[tuple[str, str]] | None = None) -> None:
    # CLIP's layout: 256 bytes, the same with </w>, the merges in order, then the two specials,
    # so <|endoftext|> has the highest id (CLIP pools at argmax(input_ids)).
    folder.mkdir(parents=True)
    chars = _byte_chars()
    merges = _learn_merges(300) if merges is None else merges
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    _write_json(folder / "vocab.json", {t: i for i, t in enumerate(tokens)})
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    bos, eos = len(tokens) - 2, len(tokens) - 1
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": _special("<|startoftext|>", True),
            "eos_token": _special("<|endoftext|>", True),
            "pad_token": "<|endoftext|>",
            "unk_token": _special("<|endoftext|>", True),
        },
    )
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(bos): {**_special("<|startoftext|>", True), "special": True},
                str(eos): {**_special("<|endoftext|>", True), "special": True},
            },
            "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": "<|endoftext|>",
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": "<|endoftext|>",
        },
    )


def _write_t5_tokenizer(folder: Path, tmp: Path, corpus: list[str] = CORPUS, pieces: int = 400) -> None:
    # T5's layout: <pad> 0, </s> 1, <unk> 2, the unigram pieces, then <extra_id_99> .. <extra_id_0>.
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="unigram",
        vocab_size=pieces,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    extra = [f"<extra_id_{i}>" for i in range(100)]
    _write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": extra,
            "eos_token": _special("</s>", False),
            "pad_token": _special("<pad>", False),
            "unk_token": _special("<unk>", False),
        },
    )
    decoder = {
        str(i): {**_special(t, False), "special": True} for i, t in enumerate(["<pad>", "</s>", "<unk>"])
    }
    decoder.update({str(size + 99 - i): {**_special(t, False), "special": True} for i, t in enumerate(extra)})
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": True,
            "added_tokens_decoder": dict(sorted(decoder.items(), key=lambda kv: int(kv[0]))),
            "additional_special_tokens": extra,
            "clean_up_tokenization_spaces": True,
            "eos_token": "</s>",
            "extra_ids": 100,
            "legacy": True,
            "model_max_length": 512,
            "pad_token": "<pad>",
            "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer",
            "unk_token": "<unk>",
        },
    )
    # tokenizer.json is the fast tokenizer transformers converts from spiece.model.
    T5Tokenizer.from_pretrained(folder).save_pretrained(tmp / "t5")
    shutil.copy(tmp / "t5/tokenizer.json", folder / "tokenizer.json")


# FLUX.1-Redux-dev's files (diffusers' FluxPriorReduxPipeline), relative to its folder.
REDUX_FILES = [
    "feature_extractor/preprocessor_config.json",
    "image_embedder/config.json",
    "image_embedder/diffusion_pytorch_model.safetensors",
    "image_encoder/config.json",
    "image_encoder/model.safetensors",
    "model_index.json",
]
# SigLIP so400m's shapes in small: patch 14, 4x4 patches; the embedder maps into the tiny T5's width.
TINY_SIGLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=14,
    image_size=56,
)
TINY_REDUX = dict(redux_dim=32, txt_in_features=64)


def build_tiny_redux(path: Path, *, siglip_prefixed: bool = True, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1-Redux-dev folder into the new folder `path`, with the real repo's files
    (REDUX_FILES). `siglip_prefixed` writes SigLIP keys as `vision_model.…` (the real repo, saved by
    transformers 4), else without (transformers 5)."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise InvalidArgument(f"{path} is not empty (pass a new folder)")
    path.mkdir(parents=True, exist_ok=True)
    import torch
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        saved = Path(tmp)
        torch.manual_seed(seed)
        size = TINY_SIGLIP["image_size"]
        pipe = FluxPriorReduxPipeline(
            # the real tower keeps its pooling head: its keys are in the file, unused by Redux
            image_encoder=SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP, vision_use_head=True)),
            feature_extractor=SiglipImageProcessor(
                size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
            ),
            image_embedder=ReduxImageEncoder(**TINY_REDUX),
        )
        pipe.to(torch.bfloat16).save_pretrained(saved)  # the real weights are bf16
        index = json.loads((saved / "model_index.json").read_text())
        # transformers 4's class name (transformers 5 without torchvision names its PIL fallback)
        index["feature_extractor"] = ["transformers", "SiglipImageProcessor"]
        _write_json(path / "model_index.json", index)
        for rel in ("feature_extractor/preprocessor_config.json", "image_embedder/config.json"):
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(saved / rel, path / rel)
        config = json.loads((saved / "image_encoder/config.json").read_text())
        config["torch_dtype"] = config.pop("dtype")  # transformers 4's name, as the real config
        (path / "image_encoder").mkdir()
        _write_json(path / "image_encoder/config.json", dict(sorted(config.items())))
        _reshard(saved / "image_embedder", path / "image_embedder", "diffusion_pytorch_model", 1)
        prefix = "vision_model." if siglip_prefixed else ""
        _reshard(saved / "image_encoder", path / "image_encoder", "model", 1, rename=lambda k: prefix + k)
    return path


def packed_latents(seed: int, height: int, width: int) -> np.ndarray:
    """Float32 normal noise in FluxPipeline's packed layout: (1, (H/16)*(W/16), 64)."""
    if height % 16 or width % 16:
        raise InvalidArgument(f"height and width must be multiples of 16, got {height}x{width}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, (height // 16) * (width // 16), 64), dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _pipeline(folder: str, dtype: str):
    import torch
    from diffusers import FluxPipeline

    with _quiet():
        pipe = FluxPipeline.from_pretrained(folder, dtype=getattr(torch, dtype), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(
    folder: Path,
    prompt: str,
    *,
    height: int,
    width: int,
    steps: int,
    guidance: float = 3.5,
    latents: np.ndarray,
    max_sequence_length: int | None = None,
    dtype: str = "float32",
) -> np.ndarray:
    """diffusers' FluxPipeline image for these packed `latents`, as uint8 (H, W, 3), rounded as diffusers
    makes PIL images. `max_sequence_length` None means the variant's: 256 for schnell, 512 for dev."""
    pipe = _pipeline(str(Path(folder).resolve()), dtype)
    return run_pipeline(
        pipe,
        prompt,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        latents=latents,
        max_sequence_length=max_sequence_length,
    )


def run_pipeline(
    pipe,
    prompt: str,
    *,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    latents: np.ndarray,
    max_sequence_length: int | None = None,
) -> np.ndarray:
    """One image from a loaded diffusers FluxPipeline, as uint8 (H, W, 3)."""
    import torch

    if max_sequence_length is None:
        max_sequence_length = 512 if pipe.transformer.config.guidance_embeds else 256
    with torch.no_grad():
        out = pipe(
            prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.from_numpy(np.asarray(latents, dtype=np.float32)),
            max_sequence_length=max_sequence_length,
            output_type="np",
        )
    return (out.images[0] * 255).round().astype(np.uint8)


def store_hf_folder(folder: Path, name: str, variant: str | None = None) -> Path:
    """Put a diffusers-layout folder into the store as format `hf`, as a pull would (a pull of the
    catalog's krea passes `variant`, which krea's files can't tell)."""
    from mflux.manifest import new_manifest, write_manifest
    from mflux.store import Store

    with Store().build(name) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        source = {"kind": "path", "path": str(folder)}
        manifest = new_manifest(tmp, name=name, format="hf", dtype="bfloat16", source=source, variant=variant)
        write_manifest(tmp, manifest)
    return Store().path(name)


COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (40, 190, 60), "yellow": (230, 210, 40)}


def write_dataset(folder: Path, size=(80, 64)) -> Path:
    """A training set for `mflux train`: solid colours and stripes, with captions; wider than tall, so
    the centre crop runs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a solid {name} square")
    stripes = np.zeros((size[1], size[0], 3), np.uint8)
    stripes[::8] = 255
    stripes[1::8] = 255
    Image.fromarray(stripes).save(folder / "stripes.png")
    (folder / "stripes.txt").write_text("white stripes on black")
    return folder
