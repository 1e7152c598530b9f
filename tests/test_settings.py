"""mflux.settings: the checks of one generation's settings, prompt files, batching and `--from`; no model."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mflux import settings as st
from mflux.errors import InvalidArgument
from mflux.metadata import save_png
from mflux.settings import Settings, check
from tests import lora_files

PROMPT = "Luxury food photograph"


def ok(**kw) -> Settings:
    return check(Settings(prompt=PROMPT, **kw), explicit=kw)


def refused(match: str, **kw) -> str:
    with pytest.raises(InvalidArgument, match=match) as e:
        check(Settings(**{"prompt": PROMPT, **kw}), explicit=kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def png(path: Path, size=(64, 48), color=(200, 30, 30), info: dict | None = None) -> str:
    pnginfo = PngImagePlugin.PngInfo()
    for k, v in (info or {}).items():
        pnginfo.add_text(k, v)
    Image.new("RGB", size, color).save(path, pnginfo=pnginfo)
    return str(path)


def test_defaults():
    s = ok()
    assert (s.width, s.height, s.steps, s.guidance, s.true_cfg, s.strength) == (
        1024,
        1024,
        None,
        None,
        None,
        None,
    )
    assert s.negative_prompt is None and s.seeds == []


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_seed_out_of_range(seed):
    assert "0 to 2**64-1" in refused("out of range", seeds=[seed])


def test_seed_range_ends_are_accepted():
    assert ok(seeds=[0, 2**64 - 1]).seeds == [0, 2**64 - 1]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"width": 30}, "--width must be a positive multiple of 16"),
        ({"height": 0}, "--height must be a positive multiple of 16"),
        ({"width": 4112, "height": 512}, "--width 4112 is above the limit of 4096"),
        ({"width": 4096, "height": 2048}, "above the limit of 4,194,304"),
        ({"width": 2048, "height": 2064}, "above the limit of 4,194,304"),
        ({"steps": 0}, "--steps must be a whole number of at least 1"),
        ({"steps": 2.5}, "--steps must be a whole number"),
        ({"guidance": math.nan}, "--guidance must be a finite number"),
        ({"guidance": math.inf}, "--guidance must be a finite number"),
        ({"negative_prompt": "blurry", "true_cfg": -math.inf}, "--true-cfg must be a finite number"),
        ({"prompt": None}, "no prompt .give --prompt"),
        ({"prompt": "x" * 100_000}, "100,000 characters; the limit is 10,000"),
        ({"negative_prompt": "x" * 10_001}, "--negative-prompt is 10,001 characters"),
    ],
)
def test_bad_values_get_one_line(kw, match):
    refused(match, **kw)


def test_largest_sizes_are_accepted():
    assert (ok(width=2048, height=2048).width, ok(width=1024, height=4096).height) == (2048, 4096)


def test_negative_prompt_alone_takes_the_default_true_cfg():
    assert ok(negative_prompt="blurry").true_cfg == st.DEFAULT_TRUE_CFG == 4.0
    assert ok(negative_prompt="blurry", true_cfg=6).true_cfg == 6.0
    assert ok(negative_prompt="  ").negative_prompt is None  # blank is no negative prompt


@pytest.mark.parametrize("scale", [1, 0.5, 0, -2])
def test_explicit_true_cfg_of_1_or_less_with_a_negative_prompt_says_why(scale):
    message = refused("--true-cfg", negative_prompt="blurry", true_cfg=scale)
    assert "does nothing" in message and "diffusers would ignore the negative prompt" in message


def test_true_cfg_without_negative_prompt_is_refused():
    refused("--true-cfg needs --negative-prompt", true_cfg=4.0)


def test_recalled_true_cfg_never_errors():
    # settings that did not come from a flag (an A1111 request, --from) are dropped with a note instead
    s = check(Settings(prompt=PROMPT, true_cfg=7.0), explicit=())
    assert s.true_cfg is None and "true CFG 7 ignored" in s.notes[0]


def test_init_image_sets_the_size_and_its_hash(tmp_path):
    path = png(tmp_path / "init.png", size=(100, 70))
    s = ok(image=path)
    assert (s.width, s.height) == (96, 64)  # rounded down to multiples of 16
    assert s.strength == st.DEFAULT_STRENGTH == 0.6
    assert s.image_sha256 == __import__("hashlib").sha256(Path(path).read_bytes()).hexdigest()
    assert "from the image (100x70)" in s.notes[0]
    # one side given: the other keeps the aspect ratio
    assert ok(image=path, width=192).height == 128
    assert ok(image=path, height=32, width=64).width == 64


def test_a_large_init_image_is_fitted_within_the_limits(tmp_path):
    s = ok(image=png(tmp_path / "big.png", size=(4000, 3000)))
    assert (s.width, s.height) == (2352, 1760)
    assert s.width <= st.MAX_SIDE and s.width * s.height <= st.MAX_PIXELS
    assert s.width % 16 == 0 and s.height % 16 == 0 and abs(s.width / s.height - 4 / 3) < 0.02


def test_image_and_mask_errors(tmp_path):
    image = png(tmp_path / "init.png")
    (tmp_path / "notes.png").write_text("not an image")
    refused("--image .*missing.png: no such file", image=str(tmp_path / "missing.png"))
    refused("--image .*notes.png: not an image", image=str(tmp_path / "notes.png"))
    refused("--mask .*notes.png: not an image", image=image, mask=str(tmp_path / "notes.png"))
    refused("--mask needs --image", mask=image)
    (tmp_path / "cut.png").write_bytes(Path(image).read_bytes()[:-40])  # a truncated download
    refused("--image .*cut.png: not an image", image=str(tmp_path / "cut.png"))
    mask = png(tmp_path / "mask.png", size=(32, 32))
    refused("the mask .* is 32x32 but the image .* is 64x48", image=image, mask=mask)
    good = ok(image=image, mask=png(tmp_path / "m2.png", size=(64, 48), color=(255, 255, 255)))
    assert good.mask_sha256 and good.mask_sha256 != good.image_sha256


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, math.nan])
def test_strength_outside_0_1_is_refused(strength, tmp_path):
    refused("--strength", image=png(tmp_path / "init.png"), strength=strength)


def test_strength_bounds_and_needs_an_image(tmp_path):
    assert ok(image=png(tmp_path / "init.png"), strength=1).strength == 1.0
    refused("--strength needs --image", strength=0.5)


def test_lora_checks(tmp_path):
    rng = np.random.default_rng(0)
    good = lora_files.save(
        tmp_path / "style.safetensors",
        lora_files.peft({"transformer.transformer_blocks.0.attn.to_q": lora_files.pair(rng, 4, 64, 64)}),
    )
    assert ok(loras=[(str(good), 0.5)]).loras == [(str(good), 0.5)]
    other = lora_files.save(
        tmp_path / "vae.safetensors", {"decoder.conv_in.weight": np.zeros((2, 2), np.float32)}
    )
    refused("is not a LoRA", loras=[(str(other), 1.0)])
    refused("LoRA .*nope.safetensors: no such file", loras=[(str(tmp_path / "nope.safetensors"), 1.0)])
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04pickle")
    refused("pickle-based weights are refused", loras=[(str(tmp_path / "old.ckpt"), 1.0)])
    (tmp_path / "junk.safetensors").write_bytes(b"\x01")
    refused("not a valid safetensors file", loras=[(str(tmp_path / "junk.safetensors"), 1.0)])
    refused("lora scale must be a finite number", loras=[(str(good), math.nan)])
    with pytest.raises(InvalidArgument, match="2 LoRA paths but 1 scales"):
        st.loras(["a", "b"], [1.0])
    assert st.loras(["a", "b"], None) == [("a", 1.0), ("b", 1.0)]


def test_output_checks(tmp_path):
    assert st.check_output(tmp_path / "x.png") == tmp_path / "x.png"
    with pytest.raises(InvalidArgument, match="no such folder .*new.deeper .create it first"):
        st.check_output(tmp_path / "new" / "deeper" / "x.png")
    assert not (tmp_path / "new").exists()
    with pytest.raises(InvalidArgument, match="use a name ending in .png"):
        st.check_output(tmp_path / "x.jpg")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(InvalidArgument, match="is a folder"):
        st.check_output(tmp_path / "dir.png")
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidArgument, match="is a file, not a folder"):
        st.check_output(tmp_path / "file" / "x.png")


def test_random_seeds():
    seeds = st.random_seeds(50)
    assert len(seeds) == 50 and len(set(seeds)) > 45 and all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(InvalidArgument, match="-n must be at least 1"):
        st.random_seeds(0)


# --- prompt files ---


def test_plain_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red bicycle\n\n# a comment\n  a lighthouse at dusk  \n")
    base = Settings(seeds=[3], steps=2, width=64, height=64)
    got = st.read_prompt_file(f, base, explicit={"steps"})
    assert [(s.prompt, s.source, s.seeds, s.steps, s.width) for s in got] == [
        ("a red bicycle", "prompts.txt:1", [3], 2, 64),
        ("a lighthouse at dusk", "prompts.txt:4", [3], 2, 64),
    ]


def test_jsonl_prompt_file_with_per_line_settings(tmp_path):
    rng = np.random.default_rng(0)
    lora_files.save(
        tmp_path / "style.safetensors",
        lora_files.peft({"transformer.transformer_blocks.0.attn.to_q": lora_files.pair(rng, 4, 64, 64)}),
    )
    png(tmp_path / "init.png", size=(64, 64))
    lines = [
        {"prompt": "a cat", "seed": 5, "steps": 3, "width": 128, "height": 64, "guidance": 4.5},
        {"prompt": "a dog", "seeds": [1, 2], "negative_prompt": "blurry", "true_cfg": 5},
        {
            "prompt": "a fox",
            "image": "init.png",
            "strength": 0.8,
            "loras": [{"path": "style.safetensors", "scale": 0.7}],
        },
        {"prompt": "an owl", "loras": ["style.safetensors", ["style.safetensors", 0.2]]},
    ]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cat, dog, fox, owl = st.read_prompt_file(f, Settings(seeds=[9], steps=2))
    assert (cat.seeds, cat.steps, cat.width, cat.height, cat.guidance) == ([5], 3, 128, 64, 4.5)
    assert (dog.seeds, dog.steps, dog.negative_prompt, dog.true_cfg) == ([1, 2], 2, "blurry", 5.0)
    assert (fox.image, fox.strength, fox.width) == (str(tmp_path / "init.png"), 0.8, 64)
    assert fox.loras == [(str(tmp_path / "style.safetensors"), 0.7)]
    assert [scale for _, scale in owl.loras] == [1.0, 0.2]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "a", "seed": -1}', "p.jsonl line 3: seed -1 is out of range"),
        ('{"prompt": "a", "true_cfg": 3}', "p.jsonl line 3: true_cfg needs negative_prompt"),
        (
            '{"prompt": "a", "negative_prompt": "b", "true_cfg": 1}',
            "p.jsonl line 3: true_cfg 1 with a negative",
        ),
        ('{"prompt": "a", "width": 100}', "p.jsonl line 3: width must be a positive multiple of 16"),
        ('{"prompt": "a", "colour": "red"}', "p.jsonl line 3: unknown key 'colour'"),
        ('{"prompt": "a", "seed": 1, "seeds": [2]}', "p.jsonl line 3: give seed or seeds"),
        ('{"prompt": "a", "image": "missing.png"}', "p.jsonl line 3: image .*missing.png: no such file"),
        ('{"prompt": "a", "strength": 0.5}', "p.jsonl line 3: strength needs image"),
        ('{"prompt": "a", "loras": [3]}', "p.jsonl line 3: bad LoRA entry 3"),
        ('{"prompt": "a",', "p.jsonl line 3: not valid JSON"),
        ('{"negative_prompt": "b"}', "p.jsonl line 3: no prompt"),
    ],
)
def test_a_bad_line_is_named_by_its_number(line, match, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(f'{{"prompt": "fine"}}\n# two\n{line}\n{{"prompt": "never read"}}\n')
    with pytest.raises(InvalidArgument, match=match):
        st.read_prompt_file(f, Settings())


def test_empty_or_missing_prompt_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(InvalidArgument, match="holds no prompts"):
        st.read_prompt_file(tmp_path / "empty.txt", Settings())
    with pytest.raises(InvalidArgument, match="no such file"):
        st.read_prompt_file(tmp_path / "nope.txt", Settings())


def test_jobs_and_groups_of_compatible_settings_in_order(tmp_path):
    a = ok(seeds=[1, 2, 3], width=64, height=64)
    b = ok(seeds=[4], width=128, height=64)
    c = check(Settings(prompt="other", seeds=[5, 6], width=64, height=64))
    d = ok(seeds=[7], width=64, height=64, negative_prompt="blurry")
    init = png(tmp_path / "init.png", size=(64, 64))
    e = ok(seeds=[8], image=init)
    f = ok(seeds=[9], image=png(tmp_path / "other.png", size=(64, 64)))
    g = check(Settings(prompt="again", seeds=[10], image=init))
    jobs = st.jobs([a, b, c, d, e, f, g])
    assert [(j.seed, j.index) for j in jobs] == [(s, i) for i, s in enumerate(range(1, 11))]
    assert [[j.seed for j in group] for group in st.groups(jobs)] == [[1, 2, 3, 5, 6], [4], [7], [8, 10], [9]]


# --- the CFG table and A1111 text ---


def test_a1111_cfg_table():
    assert st.a1111_cfg(7, 3.5, "blurry") == st.Cfg(3.5, 7.0)
    ignored = st.a1111_cfg(7, None, "")
    assert (ignored.guidance, ignored.true_cfg) == (None, None) and "needs a negative prompt" in ignored.note
    no_cfg = st.a1111_cfg(1, 3.5, "blurry")
    assert (no_cfg.guidance, no_cfg.true_cfg) == (3.5, None) and "1 or less is no CFG" in no_cfg.note
    assert st.a1111_cfg(None, 2.0, None) == st.Cfg(2.0, None)
    with pytest.raises(InvalidArgument, match="CFG scale must be a finite number"):
        st.a1111_cfg(math.nan, None, "x")


FORGE = (
    "a cat in a hat, <lora:style:0.8>\nwearing boots\nNegative prompt: blurry, low quality\n"
    "Steps: 20, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 1234, "
    'Size: 896x1152, Model hash: 275ef623d3, Model: flux1-dev-bnb-nf4-v2, Lora hashes: "style: abc123", '
    "Version: f2.0.1v1.10.1"
)


def test_parse_a1111_forge_text():
    a = st.parse_a1111(FORGE)
    assert a["prompt"] == "a cat in a hat, <lora:style:0.8>\nwearing boots"
    assert a["negative_prompt"] == "blurry, low quality"
    assert (a["Steps"], a["Seed"], a["Size"], a["CFG scale"], a["Distilled CFG Scale"]) == (
        "20",
        "1234",
        "896x1152",
        "1",
        "3.5",
    )
    assert a["Lora hashes"] == "style: abc123"
    assert st.parse_a1111("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


def test_read_settings_from_an_a1111_image(tmp_path):
    r = st.read_image_settings(png(tmp_path / "forge.png", info={"parameters": FORGE}))
    assert r.source == "A1111 parameters" and r.model == "flux1-dev-bnb-nf4-v2"
    v = r.values
    assert (v["seeds"], v["steps"], v["width"], v["height"], v["guidance"]) == ([1234], 20, 896, 1152, 3.5)
    assert v["negative_prompt"] == "blurry, low quality" and "true_cfg" not in v
    assert "CFG scale 1 ignored" in r.notes[0]
    text = FORGE.replace("CFG scale: 1", "CFG scale: 5").replace(
        "Steps: 20, ", "Steps: 20, Denoising strength: 0.4, "
    )
    v = st.read_image_settings(png(tmp_path / "img2img.png", info={"parameters": text})).values
    assert (v["true_cfg"], v["strength"]) == (5.0, 0.4)


def test_a1111_text_without_size_takes_the_pixels(tmp_path):
    r = st.read_image_settings(
        png(tmp_path / "x.png", size=(64, 32), info={"parameters": "a\nSteps: 3, Sampler: Euler, Seed: 1"})
    )
    assert (r.values["width"], r.values["height"]) == (64, 32) and "from the image's pixels" in r.notes[0]


def test_an_a1111_size_is_rounded_down_to_multiples_of_16(tmp_path):
    text = "a\nSteps: 3, Sampler: Euler, Seed: 1, Size: 1000x770"
    r = st.read_image_settings(png(tmp_path / "x.png", info={"parameters": text}))
    assert (r.values["width"], r.values["height"]) == (992, 768) and "1000x770 rounded down" in r.notes[0]


def test_bad_or_no_metadata(tmp_path):
    with pytest.raises(InvalidArgument, match="no generation settings found"):
        st.read_image_settings(png(tmp_path / "plain.png"))
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(InvalidArgument, match="not an image or a JSON sidecar"):
        st.read_image_settings(tmp_path / "x.png")
    with pytest.raises(InvalidArgument, match="no such file"):
        st.read_image_settings(tmp_path / "nope.png")
    bad = png(tmp_path / "bad.png", info={"parameters": "a\nSteps: many, Sampler: Euler, Seed: 1"})
    with pytest.raises(InvalidArgument, match="Steps 'many' in its A1111 parameters is not a number"):
        st.read_image_settings(bad)
    (tmp_path / "s.json").write_text("[1, 2]")
    with pytest.raises(InvalidArgument, match="not an mflux JSON sidecar"):
        st.read_image_settings(tmp_path / "s.json")


# --- mflux's own metadata and recall ---

META = {
    "prompt": PROMPT,
    "negative_prompt": "blurry",
    "true_cfg_scale": 5.0,
    "model": "dev",
    "variant": "dev",
    "seed": 42,
    "steps": 3,
    "guidance": 4.5,
    "height": 32,
    "width": 48,
    "precision": "float32",
    "lora_paths": [],
    "lora_scales": [],
    "timings": {"denoising": 1.0},
}


def saved(tmp_path: Path, name="made.png", export_json=False, **extra) -> Path:
    image = Image.new("RGB", (48, 32), (10, 20, 30))
    return save_png(image, tmp_path / name, {**META, **extra}, export_json, overwrite=False)


def test_recall_an_mflux_image_and_override_with_flags(tmp_path):
    path = saved(tmp_path)
    s, r, notes = st.recall(path, {}, ())
    assert r.source == "mflux metadata" and r.model == "dev"
    assert (s.prompt, s.negative_prompt, s.true_cfg, s.seeds, s.steps, s.guidance) == (
        PROMPT,
        "blurry",
        5.0,
        [42],
        3,
        4.5,
    )
    assert (s.width, s.height) == (48, 32) and not any("lacks" in n for n in notes)
    s, _, _ = st.recall(path, {"seeds": [7], "steps": 5, "prompt": "a fox"}, {"seeds", "steps", "prompt"})
    assert (s.prompt, s.seeds, s.steps, s.guidance) == ("a fox", [7], 5, 4.5)
    # explicit flags keep their usage errors
    with pytest.raises(InvalidArgument, match="--true-cfg 1 with a negative prompt"):
        st.recall(path, {"true_cfg": 1.0}, {"true_cfg"})


def test_recall_from_the_json_sidecar(tmp_path):
    path = saved(tmp_path, export_json=True)
    s, r, _ = st.recall(path.with_suffix(".json"), {}, ())
    assert r.source == "JSON sidecar" and (s.seeds, s.steps) == ([42], 3)
    # a PNG whose text chunks were stripped still finds the sidecar beside it
    Image.open(path).save(tmp_path / "stripped.png")
    (tmp_path / "stripped.json").write_text(path.with_suffix(".json").read_text())
    assert st.read_image_settings(tmp_path / "stripped.png").source == "JSON sidecar"


def test_recall_says_which_settings_came_from_the_defaults(tmp_path):
    path = png(
        tmp_path / "a.png",
        info={"parameters": "a lighthouse\nSampler: Euler, CFG scale: 7, Schedule type: x"},
    )
    s, _, notes = st.recall(path, {}, ())
    assert any(n.endswith("lacks --seed, --steps, --guidance: using the defaults") for n in notes), notes
    assert any("CFG scale 7 ignored (true CFG needs a negative prompt)" in n for n in notes)
    assert s.true_cfg is None and s.prompt == "a lighthouse"


def test_recall_needs_the_init_image_and_mask_unchanged(tmp_path):
    init = Path(png(tmp_path / "init.png", size=(48, 32)))
    mask = Path(png(tmp_path / "mask.png", size=(48, 32), color=(255, 255, 255)))
    recorded = check(
        Settings(prompt=PROMPT, image=str(init.resolve()), mask=str(mask.resolve()), strength=0.7)
    )
    path = saved(
        tmp_path,
        image_path=recorded.image,
        image_sha256=recorded.image_sha256,
        mask_path=recorded.mask,
        mask_sha256=recorded.mask_sha256,
        strength=0.7,
    )
    s, _, _ = st.recall(path, {}, ())
    assert (s.image, s.mask, s.strength) == (recorded.image, recorded.mask, 0.7)
    png(mask, size=(48, 32), color=(0, 0, 0))
    with pytest.raises(InvalidArgument, match="its mask .*mask.png has changed since"):
        st.recall(path, {}, ())
    mask.unlink()
    with pytest.raises(InvalidArgument, match="its mask .*mask.png is missing .*--mask PATH"):
        st.recall(path, {}, ())
    init.unlink()
    with pytest.raises(InvalidArgument, match="its init image .*init.png is missing .*--image PATH"):
        st.recall(path, {}, ())
    # a new init image replaces the recorded image and its mask
    other = png(tmp_path / "other.png", size=(48, 32))
    s, _, _ = st.recall(path, {"image": other}, {"image"})
    assert (s.image, s.mask, s.strength) == (other, None, 0.7)


def test_recalled_strength_without_an_image_is_dropped_with_a_note(tmp_path):
    path = png(
        tmp_path / "a.png",
        info={"parameters": "a\nSteps: 3, Sampler: Euler, Seed: 1, Denoising strength: 0.5"},
    )
    s, _, notes = st.recall(path, {}, ())
    assert s.strength is None and any("strength 0.5 ignored" in n for n in notes)
