"""The T5 truncation warning: a prompt longer than the window is cut as diffusers cuts it, and says so."""

import warnings

import numpy as np
import pytest

from mflux.runtime.tokenizers import load_tokenizers, t5_ids


def test_a_long_prompt_is_truncated_with_one_warning_giving_the_count(tiny_schnell):
    _, tok = load_tokenizers(tiny_schnell)
    prompt = " ".join(["a red bicycle"] * 30)
    n = len(tok(prompt)["input_ids"])
    assert n > 64
    with pytest.warns(UserWarning) as caught:
        ids = t5_ids(tok, [prompt], 64)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"is {n} T5 tokens" in message and f"its last {n - 64} tokens were dropped" in message
    # the ids are the truncated ones, ending in </s> as diffusers' FluxPipeline makes them
    want = tok([prompt], padding="max_length", max_length=64, truncation=True, return_tensors="np")
    assert np.array_equal(ids, want["input_ids"]) and ids[0, -1] == tok.eos_token_id


def test_a_prompt_that_fits_gives_no_warning(tiny_schnell):
    _, tok = load_tokenizers(tiny_schnell)
    prompt = " ".join(["a red bicycle"] * 30)
    fits = len(tok(prompt)["input_ids"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5_ids(tok, [prompt], fits)  # exactly the window: nothing dropped
    with pytest.warns(UserWarning, match="its last 1 tokens were dropped"):
        t5_ids(tok, [prompt], fits - 1)
