"""The two FLUX.1 tokenizers, built with the `tokenizers` library as transformers 5 builds CLIPTokenizer and
T5TokenizerFast, and called as diffusers' FluxPipeline calls them, so no PyTorch and no transformers load.

transformers rebuilds both from their vocabularies even when tokenizer.json is there (it keeps only the
vocabulary, merges and T5's normalisation table from it); this module does the same, so the ids are equal
whichever files a folder has."""

import base64
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

from mflux.errors import InvalidArgument, MfluxError

# CLIP-L has 77 positions; FluxPipeline pads and truncates to the tokenizer's model_max_length, which is 77.
CLIP_LENGTH = 77
MAX_T5_LENGTH = 512
# each folder needs all files of one group
_CLIP_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
_T5_FILES = (("tokenizer.json",), ("spiece.model",))
# CLIPTokenizer's pre-tokenizer: its specials, English contractions, letter runs, single digits, other runs
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


@dataclass(frozen=True)
class Tokenizer:
    """One text encoder's tokenizer: `backend` adds the special tokens and neither pads nor truncates."""

    backend: tokenizers.Tokenizer
    pad_id: int
    eos_id: int

    def count(self, prompt: str) -> int:
        """The prompt's length in tokens, special tokens included, before any truncation."""
        return len(self.backend.encode(prompt).ids)


def load_tokenizers(folder: Path) -> tuple[Tokenizer, Tokenizer]:
    """(CLIP tokenizer, T5 tokenizer) from a checkpoint's `tokenizer/` and `tokenizer_2/` folders."""
    folder = Path(folder)
    clip_dir, t5_dir = folder / "tokenizer", folder / "tokenizer_2"
    _require(clip_dir, _CLIP_FILES)
    _require(t5_dir, _T5_FILES)
    return load_clip(clip_dir), load_t5(t5_dir)


def _require(folder: Path, groups: tuple[tuple[str, ...], ...]) -> None:
    if any(all((folder / f).is_file() for f in group) for group in groups):
        return
    missing = [f for f in groups[0] if not (folder / f).is_file()]
    raise MfluxError(
        f"{folder}: missing tokenizer file {missing[0]} (the checkpoint is incomplete; fetch it again)"
    )


def load_clip(folder: Path) -> Tokenizer:
    """CLIP's byte-level BPE from tokenizer.json, else from vocab.json + merges.txt."""
    config = _config(folder)
    unk = _token(config, "unk_token", "<|endoftext|>")
    options = dict(dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False)
    if (folder / "tokenizer.json").is_file():
        model = _read_json(folder / "tokenizer.json")["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        bpe = BPE(vocab=model["vocab"], merges=merges, unk_token=unk, **options)
    else:
        bpe = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=unk, **options)
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bos, eos = _token(config, "bos_token", "<|startoftext|>"), _token(config, "eos_token", "<|endoftext|>")
    pad = _token(config, "pad_token", "<|endoftext|>")
    _add_specials(tok, config, [bos, eos, unk, pad])
    tok.post_processor = processors.RobertaProcessing(
        (eos, _id(tok, eos, folder)), (bos, _id(tok, bos, folder)), trim_offsets=False, add_prefix_space=False
    )
    return Tokenizer(tok, pad_id=_id(tok, pad, folder), eos_id=_id(tok, eos, folder))


def load_t5(folder: Path) -> Tokenizer:
    """T5's unigram model from tokenizer.json, else from spiece.model (read as a protobuf, never unpickled)."""
    config = _config(folder)
    if (folder / "tokenizer.json").is_file():
        vocab, unk_id, charsmap = _t5_from_json(folder / "tokenizer.json")
    else:
        vocab, unk_id, charsmap = _t5_from_spiece(folder / "spiece.model", config.get("extra_ids", 100))
    tok = tokenizers.Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    if charsmap:
        tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    pad, eos = _token(config, "pad_token", "<pad>"), _token(config, "eos_token", "</s>")
    unk = _token(config, "unk_token", "<unk>")
    extra = [piece for piece, _ in vocab if piece.startswith("<extra_id_")]
    _add_specials(tok, config, [pad, eos, unk, *extra])
    eos_id = _id(tok, eos, folder)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", eos], pair=["$A", eos, "$B", eos], special_tokens=[(eos, eos_id)]
    )
    return Tokenizer(tok, pad_id=_id(tok, pad, folder), eos_id=eos_id)


def _t5_from_json(path: Path) -> tuple[list, int, bytes | None]:
    data = _read_json(path)
    model, norm = data["model"], data.get("normalizer") or {}
    # the normalisation table is the Precompiled step, alone or inside a Sequence
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    tables = [s["precompiled_charsmap"] for s in steps if s.get("type") == "Precompiled"]
    charsmap = base64.b64decode(tables[0]) if tables and tables[0] else None
    return [tuple(v) for v in model["vocab"]], model.get("unk_id", 2), charsmap


def _t5_from_spiece(path: Path, extra_ids: int) -> tuple[list, int, bytes | None]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError, or a truncated file
        raise MfluxError(f"{path}: not a SentencePiece model ({e}; fetch the checkpoint again)") from e
    # T5's layout: the pieces, then <extra_id_99> .. <extra_id_0>
    vocab = [(p.piece, p.score) for p in proto.pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    return vocab, proto.trainer_spec.unk_id, proto.normalizer_spec.precompiled_charsmap or None


def _add_specials(tok: tokenizers.Tokenizer, config: dict, defaults: list[str]) -> None:
    # tokenizer_config.json's added tokens with their flags, as transformers adds them; else the specials
    declared = config.get("added_tokens_decoder") or {}
    if declared:
        tokens = [declared[k] for k in sorted(declared, key=int)]
        tok.add_special_tokens([AddedToken(**{**t, "special": t.get("special", True)}) for t in tokens])
    else:
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(defaults)]
        )


def _config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MfluxError(f"{path}: unreadable ({e}; fetch the checkpoint again)") from e


def _token(config: dict, key: str, default: str) -> str:
    value = config.get(key) or default
    return value["content"] if isinstance(value, dict) else value


def _id(tok: tokenizers.Tokenizer, token: str, folder: Path) -> int:
    found = tok.token_to_id(token)
    if found is None:
        raise MfluxError(
            f"{folder}: the tokenizer has no {token!r} token (the checkpoint is damaged; fetch it again)"
        )
    return found


def clip_ids(tok: Tokenizer, prompts: list[str]) -> np.ndarray:
    """(B, 77) int32 ids, as FluxPipeline._get_clip_prompt_embeds makes them."""
    return _ids(tok, prompts, CLIP_LENGTH)[0]


def t5_ids(tok: Tokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """(B, max_length) int32 ids, as FluxPipeline._get_t5_prompt_embeds makes them."""
    if not 1 <= max_length <= MAX_T5_LENGTH:
        raise InvalidArgument(f"max sequence length must be between 1 and {MAX_T5_LENGTH}, got {max_length}")
    ids, counts = _ids(tok, prompts, max_length)
    for prompt, n in zip(prompts, counts):
        _warn_truncated(prompt, n, max_length)
    return ids


def _warn_truncated(prompt: str, n: int, max_length: int) -> None:
    # the count includes the closing </s>, which truncation keeps: the difference is what T5 never sees
    if n > max_length:
        start = prompt if len(prompt) <= 40 else prompt[:40] + "..."
        warnings.warn(
            f"the prompt {start!r} is {n} T5 tokens, longer than the window of {max_length}: "
            f"its last {n - max_length} tokens were dropped",
            stacklevel=3,
        )


def _ids(tok: Tokenizer, prompts: list[str], max_length: int) -> tuple[np.ndarray, list[int]]:
    """The ids padded and truncated to `max_length` as transformers does it (the text is cut, then the
    special tokens are added), and each prompt's untruncated length."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgument(f"prompts must be a non-empty list of strings, got {prompts!r}")
    specials = tok.backend.num_special_tokens_to_add(False)
    out = np.full((len(prompts), max_length), tok.pad_id, np.int32)  # (B, max_length)
    counts = []
    for row, enc in zip(out, tok.backend.encode_batch(prompts, add_special_tokens=False)):
        counts.append(len(enc.ids) + specials)
        enc.truncate(max(max_length - specials, 0))
        ids = tok.backend.post_process(enc).ids
        row[: len(ids)] = ids
    return out, counts
