"""The two FLUX.1 tokenizers, loaded and called exactly as diffusers' FluxPipeline does."""

import warnings
from pathlib import Path

import numpy as np

from mflux.errors import InvalidArgument, MfluxError

# CLIP-L has 77 positions; FluxPipeline pads and truncates to the tokenizer's model_max_length, which is 77.
CLIP_LENGTH = 77
MAX_T5_LENGTH = 512
# each folder needs all files of one group
_CLIP_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
_T5_FILES = (("tokenizer.json",), ("spiece.model",))


def load_tokenizers(folder: Path) -> tuple:
    """(CLIP tokenizer, T5 tokenizer) from a checkpoint's `tokenizer/` and `tokenizer_2/` folders."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = Path(folder)
    clip_dir, t5_dir = folder / "tokenizer", folder / "tokenizer_2"
    _require(clip_dir, _CLIP_FILES)
    _require(t5_dir, _T5_FILES)
    return (
        CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True),
        T5TokenizerFast.from_pretrained(t5_dir, local_files_only=True),
    )


def _require(folder: Path, groups: tuple[tuple[str, ...], ...]) -> None:
    if any(all((folder / f).is_file() for f in group) for group in groups):
        return
    missing = [f for f in groups[0] if not (folder / f).is_file()]
    raise MfluxError(
        f"{folder}: missing tokenizer file {missing[0]} (the checkpoint is incomplete; fetch it again)"
    )


def clip_ids(tok, prompts: list[str]) -> np.ndarray:
    """(B, 77) int32 ids, as FluxPipeline._get_clip_prompt_embeds makes them."""
    return _ids(tok, prompts, CLIP_LENGTH)


def t5_ids(tok, prompts: list[str], max_length: int) -> np.ndarray:
    """(B, max_length) int32 ids, as FluxPipeline._get_t5_prompt_embeds makes them."""
    if not 1 <= max_length <= MAX_T5_LENGTH:
        raise InvalidArgument(f"max sequence length must be between 1 and {MAX_T5_LENGTH}, got {max_length}")
    ids = _ids(tok, prompts, max_length)
    for prompt in prompts:
        _warn_truncated(tok, prompt, max_length)
    return ids


def _warn_truncated(tok, prompt: str, max_length: int) -> None:
    # the count includes the closing </s>, which truncation keeps: the difference is what T5 never sees
    n = len(tok(prompt, truncation=False, verbose=False)["input_ids"])
    if n > max_length:
        start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
        warnings.warn(
            f"the prompt {start!r} is {n} T5 tokens, longer than the window of {max_length}: "
            f"its last {n - max_length} tokens were dropped",
            stacklevel=3,
        )


def _ids(tok, prompts: list[str], max_length: int) -> np.ndarray:
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgument(f"prompts must be a non-empty list of strings, got {prompts!r}")
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int32)  # (B, max_length)
