"""The tokenizers: ids equal to transformers' on a corpus of odd prompts, with the tiny pipelines' tokenizers and
larger ones; the T5 truncation warning (a prompt longer than the window is cut as diffusers cuts it, and
says so)."""

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from mflux.runtime.tokenizers import clip_ids, load_tokenizers, t5_ids
from tests.fixtures import CORPUS, write_tokenizers


def test_a_long_prompt_is_truncated_with_one_warning_giving_the_count(tiny_schnell):
    _, tok = load_tokenizers(tiny_schnell)
    prompt = " ".join(["a red bicycle"] * 30)
    n = tok.count(prompt)
    assert n > 64
    with pytest.warns(UserWarning) as caught:
        ids = t5_ids(tok, [prompt], 64)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"is {n} T5 tokens" in message and f"its last {n - 64} tokens were dropped" in message
    # the ids are the truncated ones, ending in </s> as diffusers' FluxPipeline makes them
    want = tok.backend.encode(prompt).ids[:63] + [tok.eos_id]
    assert ids.tolist() == [want] and ids[0, -1] == tok.eos_id


def test_a_prompt_that_fits_gives_no_warning(tiny_schnell):
    _, tok = load_tokenizers(tiny_schnell)
    prompt = " ".join(["a red bicycle"] * 30)
    fits = tok.count(prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5_ids(tok, [prompt], fits)  # exactly the window: nothing dropped
    with pytest.warns(UserWarning, match="its last 1 tokens were dropped"):
        t5_ids(tok, [prompt], fits - 1)


# ---- equality with transformers' CLIPTokenizer and T5TokenizerFast, as FluxPipeline calls them

WORDS = "a photo of cat dog red blue masterpiece best quality portrait city night neon rain forest".split()
ODD = [
    "",
    " ",
    "     ",
    "\t\n\r",
    "a  cat\t\ton\n\nthe   mat",
    " leading and trailing ",
    "UPPER Case MiXeD",
    "café naïve résumé e\u0301 ＡＢＣ ﬁ ① ½ ™ ß Ω",
    "日本語のテキスト、東京の夜景",
    "一只猫坐在红色的沙发上，高清",
    "한국어 프롬프트 고양이",
    "кошка на диване, арабский: قطة",
    "emoji 🐱🎨🔥 👩‍👩‍👧‍👦 👍🏽 🇯🇵",
    "(masterpiece:1.2), ((best quality)), [blurry], {detailed}, (cat:0.8) <lora:style:0.7> BREAK night",
    "(red hair:1.35) AND (blue eyes:1.1)",
    "<|startoftext|>a cat<|endoftext|> <|ENDOFTEXT|>",
    "</s> <pad> <unk> <extra_id_0> <extra_id_99>text",
    "it's they'll we'd I'm you're we've don't",
    "1234567890 3.14159 1,000,000 #1 50% $20 @user",
    "x" * 400,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\u200b\u200dzero width\u00a0nbsp\u3000ideographic space",
    "!!!??? ... --- *** /// \\\\ ||| ~~~",
]


def _prompts(count: int = 520) -> list[str]:
    """ODD's cases, then random mixtures of words, ODD's fragments and separators, some past 512 tokens."""
    rng = np.random.default_rng(0)
    pieces = sorted({w for text in WORDS + ODD + CORPUS for w in text.split() if len(w) < 100})
    separators = [" ", "  ", ", ", "\t", "\n", "", " (", ":1.2) ", "   "]
    out = list(ODD)
    while len(out) < count:
        n = int(rng.choice([1, 3, 10, 40, 120, 450], p=[0.25, 0.25, 0.2, 0.15, 0.1, 0.05]))
        words, seps = rng.choice(pieces, n), rng.choice(separators, n)
        out.append("".join(f"{w}{s}" for w, s in zip(words, seps)))
    return out


def _big_corpus() -> list[str]:
    # English enough to learn thousands of merges and pieces from: some of the standard library's source,
    # plus the prompts' own unicode, so the long merges and the rare characters are both exercised.
    lib = Path(os.__file__).parent
    lines = []
    for path in sorted(lib.glob("*.py"))[:25]:
        lines += [line.strip() for line in path.read_text(encoding="utf-8", errors="ignore").splitlines()]
    return [line for line in lines if line] + ODD * 5 + CORPUS * 5


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders in the real layouts: the tiny pipelines', and larger ones learned from a bigger
    corpus; then the other files transformers reads (CLIP's tokenizer.json alone, T5's spiece.model
    alone, T5's tokenizer.json as transformers 4 wrote it, as the FLUX.1 repos ship it)."""
    root = tmp_path_factory.mktemp("tokenizers")
    tiny = write_tokenizers(root / "tiny")
    big = write_tokenizers(root / "big", _big_corpus(), merges=6000, pieces=4000)
    assert len((big / "tokenizer/merges.txt").read_text().splitlines()) > 5000
    assert len(json.loads((big / "tokenizer_2/tokenizer.json").read_text())["model"]["vocab"]) > 3000
    other = root / "other"
    shutil.copytree(big, other)
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(big / "tokenizer").save_pretrained(root / "saved")
    shutil.copy(root / "saved/tokenizer.json", other / "tokenizer/tokenizer.json")
    for f in ("vocab.json", "merges.txt"):
        (other / "tokenizer" / f).unlink()
    (other / "tokenizer_2/tokenizer.json").unlink()
    legacy = root / "legacy"
    shutil.copytree(big, legacy)
    _as_transformers_4(legacy / "tokenizer_2/tokenizer.json")
    bare = root / "bare"  # older configs, without added_tokens_decoder: the special tokens by name alone
    shutil.copytree(tiny, bare)
    for sub in ("tokenizer", "tokenizer_2"):
        config = json.loads((bare / sub / "tokenizer_config.json").read_text())
        del config["added_tokens_decoder"]
        (bare / sub / "tokenizer_config.json").write_text(json.dumps(config))
    return {
        "tiny": tiny,
        "big": big,
        "other files": other,
        "transformers 4 json": legacy,
        "no added tokens": bare,
    }


def _as_transformers_4(path: Path) -> None:
    data = json.loads(path.read_text())
    table = data["normalizer"]
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [table, {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
    }
    data["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "always",
        "split": True,
    }
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("layout", ["tiny", "big", "other files", "transformers 4 json", "no added tokens"])
def test_ids_equal_transformers_on_500_prompts(tokenizer_folders, layout):
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = tokenizer_folders[layout]
    prompts = _prompts()
    assert len(prompts) >= 500
    clip_tok, t5_tok = load_tokenizers(folder)
    ref_clip = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ref_t5 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")

    def ref(tok, length):
        return tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")[
            "input_ids"
        ]

    np.testing.assert_array_equal(clip_ids(clip_tok, prompts), ref(ref_clip, 77))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompts' truncation warnings
        for length in (512, 256, 77):
            np.testing.assert_array_equal(t5_ids(t5_tok, prompts, length), ref(ref_t5, length))
    counts = [len(ids) for ids in ref_t5(prompts)["input_ids"]]
    assert [t5_tok.count(p) for p in prompts] == counts
    # the corpus does reach past both windows, and uses the larger vocabularies' long pieces
    assert max(counts) > 512 and max(clip_tok.count(p) for p in prompts) > 77
    assert (ref(ref_clip, 77) > 2 * 256 + 1000).any() == (layout not in ("tiny", "no added tokens"))
