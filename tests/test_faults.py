"""Fault injection (issue 14), through the installed command: corrupt and missing files, broken headers
and manifests, unsafe names, planted pickles, malformed LoRAs, read-only and full disks, kills mid-build,
races, and a hostile or failing Hub (the local one of tests/hub_server.py).

Every refused case asserts one clear line on stderr (`error: ...`), a non-zero exit and no traceback;
then that the store is unchanged, or consistent: nothing half-built in `mflux list`, no temp entry left
once the next command has run, and every model that was good still passes `inspect --verify`.
Each test gets its own copy of one store built once per module, so the cases stay fast.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mflux.cli import cli
from mflux.errors import MfluxError
from mflux.inspector import inspect
from mflux.runtime.weights import TensorSource
from mflux.store import TMP, Store
from tests.fixtures import store_hf_folder
from tests.hub_server import GOOD_TOKEN, NO_ACCESS_TOKEN, HubServer

MODELS = ("schnell", "schnell-q8")  # the store every test starts from: an hf model and an mlx one
SHARD = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"


# --- the harness -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden(tiny_schnell, tmp_path_factory) -> Path:
    from mflux.convert import quantize

    root = tmp_path_factory.mktemp("golden") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MFLUX_HOME", str(root))
        store_hf_folder(tiny_schnell, "schnell")
        quantize("schnell", bits=8, progress=False)
    return root


@pytest.fixture
def home(golden, mflux_home) -> Path:
    """This test's store: a fresh copy of the golden one, at $MFLUX_HOME."""
    shutil.copytree(golden, mflux_home, symlinks=True)
    return mflux_home


SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"
VAE = "vae/diffusion_pytorch_model.safetensors"
PWNED = "PWNED.txt"


class _Hub:
    """The local Hub of tests/hub_server.py, with the environment that points a child at it."""

    def __init__(self, server: HubServer, hf_home: Path):
        self.server = server
        self.env = {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home)}

    def resolves(self) -> list[str]:
        return [r["path"] for r in self.server.requests if "/resolve/" in r["path"]]


@pytest.fixture(scope="module")
def hub_server(tiny_schnell, tiny_dev, tmp_path_factory):
    from mflux.catalog import catalog

    pickled = pickle.dumps(_Planted(tmp_path_factory.getbasetemp() / "UNPICKLED-BY-PULL"))
    with HubServer() as server:
        server.add_repo(SCHNELL, tiny_schnell, commit=catalog()["schnell"].revision)
        server.add_repo(DEV, tiny_dev, gated=True, commit=catalog()["dev"].revision)
        server.add_repo("evil/traversal", tiny_schnell, extra={f"tokenizer/../../../../{PWNED}": b"pwned"})
        server.add_repo("evil/absolute", tiny_schnell, extra={f"/tmp/{PWNED}": b"pwned"})
        server.add_repo("evil/deeper", tiny_schnell, extra={f"tokenizer/sub/{PWNED}": b"pwned"})
        server.add_repo(
            "evil/pickled", tiny_schnell, extra={"transformer/diffusion_pytorch_model.bin": pickled}
        )
        # The other MLX port's saved layout (numbered shards, no configs) without its VAE.
        shards = {f"{c}/0.safetensors": b"x" for c in ("transformer", "text_encoder", "text_encoder_2")}
        tokenizers = {"tokenizer/vocab.json": b"{}", "tokenizer_2/spiece.model": b"x"}
        server.add_repo(
            "someone/other-port-no-vae", tmp_path_factory.mktemp("empty"), extra=shards | tokenizers
        )
        yield server


@pytest.fixture
def hub(hub_server, tmp_path):
    hub_server.requests.clear()
    for faults in (hub_server.drop_after, hub_server.stall_after, hub_server.fail, hub_server.redirect):
        faults.clear()
    hub_server.corrupt.clear()
    hub_server.html_api = False
    hub_server.release.clear()
    yield _Hub(hub_server, tmp_path / "hf_home")
    hub_server.release.set()


def child_env(env: dict | None = None) -> dict:
    # Offline and without a token unless the test says otherwise.
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {**environ, "HF_HUB_OFFLINE": "1", **(env or {})}


# The two ways to start the command: both run mflux/__main__.py's main.
ENTRIES = {
    "python-m": [sys.executable, "-m", "mflux"],
    "script": [str(Path(sys.executable).with_name("mflux"))],
}


def mflux(
    *args, env: dict | None = None, cwd=None, timeout: float = 120, entry: str = "python-m"
) -> subprocess.CompletedProcess:
    """The installed command, in a child process, on this test's $MFLUX_HOME."""
    command = [*ENTRIES[entry], *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, env=child_env(env), cwd=cwd, timeout=timeout
    )


def start(*args, env: dict | None = None) -> subprocess.Popen:
    command = [*ENTRIES["python-m"], *map(str, args)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(env)
    )


def finish(child: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = child.communicate(timeout=timeout)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def refused(result: subprocess.CompletedProcess, *words: str, code: int = 1, note: str = "") -> str:
    """The one error line of a refused command, checked: exit code (1, a bad flag's too), no traceback,
    the words in it. `note` allows the one progress line a pull prints before it starts
    downloading ("pulling NAME from REPO@COMMIT: SIZE")."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    if note and len(lines) == 2 and lines[0].startswith(note):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def snapshot(home: Path) -> dict:
    """Every file of the store but its temp area, with size and mtime: what 'unchanged' compares."""
    if not home.is_dir():
        return {}
    files = {}
    for p in home.rglob("*"):
        rel = p.relative_to(home).as_posix()
        if p.is_file() and not rel.startswith((TMP + "/", ".downloads/")):
            st = p.stat()
            files[rel] = (st.st_size, st.st_mtime_ns)
    return files


def consistent(home: Path, listed=MODELS, good=MODELS) -> None:
    """`listed` are exactly the models `mflux list` shows, nothing is broken or half-built, and each of
    `good` passes `inspect --verify`. Temp entries are those of live processes only: after a cleanup
    (which every building command runs first) none is left."""
    store = Store(home)
    assert sorted(m.name for m in store.list()) == sorted(listed)
    assert store.broken() == {}
    store.cleanup()
    assert not (home / TMP).is_dir() or list((home / TMP).iterdir()) == []
    for name in good:
        report = inspect(name, verify=True)
        assert report["verify"]["ok"] and report["verify"]["unlisted"] == [], (name, report["verify"])


def write_header(path: Path, header, data: bytes = b"", raw: bytes | None = None) -> Path:
    """A .safetensors file with exactly this header (JSON, or raw bytes) and data."""
    h = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


class _Planted:
    """Unpickling this creates the marker file: proof that a loader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps(_Planted(marker)))
    return path


# --- damaged files in the store --------------------------------------------------------------------


def flip(p: Path):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "flipped-byte": flip,
    "truncated": truncate,
    "zero-bytes": lambda p: p.write_bytes(b""),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_file_in_the_store(home, damage):
    DAMAGE[damage](home / "schnell" / SHARD)
    line = refused(mflux("inspect", "schnell", "--verify"), "do not match the manifest", SHARD)
    assert "make it again: mflux convert" in line and "--name schnell --force" in line, line
    if damage != "flipped-byte":  # a same-size change shows only to --verify, which hashes
        refused(mflux("inspect", "schnell"), "schnell is damaged", SHARD, "mflux inspect schnell --verify")
        listing = mflux("list")
        assert listing.returncode == 0 and "schnell " in listing.stdout
        warning = listing.stderr.strip().splitlines()
        assert len(warning) == 1 and warning[0].startswith("warning: schnell is damaged"), listing.stderr
        assert SHARD in warning[0] and "mflux inspect schnell --verify" in warning[0]
        before = snapshot(home)
        refused(mflux("quantize", "schnell", "--bits", "4"), "schnell is damaged", SHARD)
        refused(mflux("convert", "schnell"), "schnell is damaged")
        assert snapshot(home) == before
    consistent(home, good=["schnell-q8"])


def test_a_component_without_weights_names_the_fix(home):
    for shard in (home / "schnell" / "vae").glob("*.safetensors"):
        shard.unlink()
    with pytest.raises(MfluxError) as e:
        TensorSource.from_folder(home / "schnell" / "vae")
    assert f"mflux inspect {home / 'schnell'} --verify" in str(e.value) and "again" in str(e.value)


# --- broken safetensors headers, through inspect and convert ---------------------------------------

_OK = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
HEADERS = {
    "length-past-the-end": lambda p: p.write_bytes(struct.pack("<Q", 10**9) + b"{}"),
    "garbage-json": lambda p: write_header(p, None, raw=b"{not json"),
    "offsets-past-the-end": lambda p: write_header(
        p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
    ),
    "unknown-dtype": lambda p: write_header(
        p, {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "shorter-than-its-length": lambda p: p.write_bytes(b"\x01\x00"),
    "not-an-object": lambda p: write_header(p, [1, 2]),
    "string-offsets": lambda p: write_header(
        p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, b"\0" * 8
    ),
    "list-dtype": lambda p: write_header(
        p, {"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "metadata-not-a-table": lambda p: write_header(p, {"__metadata__": [1]}),
    "deep-nesting": lambda p: write_header(p, None, raw=b"[" * 100_000 + b"]" * 100_000),
    "negative-offsets": lambda p: write_header(
        p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, b"\0" * 8
    ),
    "overflowing-shape": lambda p: write_header(
        p, {"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}
    ),
}


@pytest.mark.parametrize("fault", HEADERS)
def test_broken_safetensors_header(home, tmp_path, fault):
    bad = tmp_path / "flux1-schnell.safetensors"
    HEADERS[fault](bad)
    before = snapshot(home)
    refused(mflux("inspect", bad), str(bad))
    refused(mflux("convert", bad, "--base", "schnell"), str(bad))
    assert snapshot(home) == before
    consistent(home)


def _sd3_gguf(path: Path) -> Path:
    from tests.test_gguf import small_gguf

    return small_gguf(path, "sd3")


def _cut_gguf(path: Path) -> Path:
    from tests.test_gguf import small_gguf

    whole = small_gguf(path).read_bytes()
    path.write_bytes(whole[: len(whole) - 1000])
    return path


def _odd_type_gguf(path: Path) -> Path:
    import gguf

    from tests.test_gguf import small_gguf

    reader = gguf.GGUFReader(small_gguf(path), "r+")
    reader.tensors[0].field.parts[4][0] = 250  # a type number ggml never used
    reader.data.flush()
    return path


GGUFS = {  # issue 36: each refused in one line before anything is written
    "sd3": (_sd3_gguf, "architecture 'sd3'"),
    "truncated": (_cut_gguf, "truncated or damaged GGUF file"),
    "unknown-type": (_odd_type_gguf, "unknown GGUF quantization type (number 250)"),
}


@pytest.mark.parametrize("fault", GGUFS)
def test_broken_gguf(home, tmp_path, fault):
    make, words = GGUFS[fault]
    bad = make(tmp_path / "flux1-dev-Q4_K_S.gguf")
    before = snapshot(home)
    refused(mflux("convert", bad, "--base", "schnell"), words)
    assert snapshot(home) == before
    consistent(home)


# float8 files convert reads, whose keys fit no FLUX.1 layout: (the file, what the refusal names)
FLOAT8 = {
    "not-flux": (
        lambda p: write_header(
            p, {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2
        ),
        "not a FLUX.1 transformer checkpoint",
    ),
    "stray-keys": (
        lambda p: write_header(
            p,
            {
                f"{prefix}w": {"dtype": "F8_E5M2", "shape": [2], "data_offsets": [2 * i, 2 * i + 2]}
                for i, prefix in enumerate(("model.diffusion_model.", "vae.", "cond_stage_model."))
            },
            b"\0" * 6,
        ),
        "cond_stage_model.w",
    ),
}


@pytest.mark.parametrize("fault", FLOAT8)
def test_float8_file_of_no_known_layout(home, tmp_path, fault):
    bad = tmp_path / "flux1-schnell-fp8.safetensors"
    write, words = FLOAT8[fault]
    write(bad)
    before = snapshot(home)
    refused(mflux("convert", bad, "--base", "schnell"), str(bad), words)
    assert snapshot(home) == before
    consistent(home)


# --- malformed manifests ---------------------------------------------------------------------------


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


MANIFESTS = {
    "syntax-error": (lambda t: t + "\n[[[not toml\n", "not valid TOML"),
    "missing-field": (lambda t: _edit(t, 'variant = "schnell"\n', ""), "'variant': missing"),
    "wrong-type": (lambda t: _edit(t, "format_version = 1", 'format_version = "1"'), "format_version"),
    "files-not-a-list": (lambda t: t.replace("[[files]]", "[[filez]]") + '\nfiles = "x"\n', "'files'"),
    "parent-path": (
        lambda t: _edit(t, 'path = "model_index.json"', 'path = "../model_index.json"'),
        "files[",
    ),
    "absolute-path": (lambda t: _edit(t, 'path = "model_index.json"', 'path = "/etc/passwd"'), "files["),
    "architecture-string": (lambda t: _edit(t, "num_layers = ", 'num_layers = "two" #'), "architecture."),
    "architecture-list": (lambda t: _edit(t, "patch_size = 1", "patch_size = [1]"), "architecture."),
    "newer-format": (lambda t: _edit(t, "format_version = 1", "format_version = 99"), "newer mflux"),
}


@pytest.mark.parametrize("fault", MANIFESTS)
def test_malformed_manifest(home, fault):
    edit, words = MANIFESTS[fault]
    manifest = home / "schnell" / "manifest.toml"
    manifest.write_text(edit(manifest.read_text()))
    before = snapshot(home)
    line = refused(mflux("inspect", "schnell"), str(manifest), words)
    if fault == "newer-format":
        assert "git pull" in line and "not `pip install -U mflux`" in line
    refused(mflux("quantize", "schnell", "--bits", "4"), str(manifest), words)
    listing = mflux("list")
    assert listing.returncode == 0 and "schnell-q8" in listing.stdout
    assert listing.stderr.startswith("warning: schnell is not a usable model")
    assert snapshot(home) == before
    assert mflux("rm", "schnell", "-y").returncode == 0  # a broken model can always be removed
    consistent(home, listed=["schnell-q8"], good=["schnell-q8"])


# --- unsafe names ----------------------------------------------------------------------------------

UNSAFE = ["../evil", "a/b", "/abs", "x" * 300, "schnéll", "-dash", ".hidden", ""]


@pytest.mark.parametrize(
    "name", UNSAFE, ids=["parent", "slash", "absolute", "long", "unicode", "dash", "dot", "empty"]
)
def test_unsafe_names(home, tmp_path, name):
    before = snapshot(home)
    for args in (
        ["quantize", "schnell", "--bits", "8", "--name", name],
        ["convert", "schnell", "--name", name],
        ["pull", "schnell", "--name", name],
    ):
        refused(mflux(*args), "--name: invalid model name")
    refused(mflux("rm", "-y", "--", name), "invalid model name")
    refused(mflux("inspect", "--", name))  # taken as a path, which does not exist
    assert snapshot(home) == before and list(tmp_path.parent.glob("evil*")) == []
    consistent(home)


def test_nul_in_a_name(home):
    # A NUL can't reach a child process's argv, so this one goes through the command in process.
    before = snapshot(home)
    for args in (
        ["rm", "a\0b", "-y"],
        ["quantize", "schnell", "--bits", "8", "--name", "a\0b"],
        ["inspect", "a\0b"],
    ):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert snapshot(home) == before


# --- planted pickles -------------------------------------------------------------------------------

PICKLES = ["evil.bin", "evil.pt", "evil.ckpt", "evil.pth", "renamed.safetensors"]


@pytest.mark.parametrize("filename", PICKLES)
def test_planted_pickle_is_never_unpickled(home, tmp_path, filename):
    marker = tmp_path / "UNPICKLED"
    evil = plant_pickle(tmp_path / filename, marker)
    words = "not a valid safetensors file" if filename.endswith(".safetensors") else "pickle-based"
    before = snapshot(home)
    refused(mflux("inspect", evil), words)
    refused(mflux("convert", evil, "--base", "schnell"), words)
    refused(mflux("quantize", evil, "--bits", "4"), words)
    assert not marker.exists() and snapshot(home) == before
    consistent(home)


def test_planted_pickle_in_a_model_folder(home, tmp_path, tiny_schnell):
    marker = tmp_path / "UNPICKLED"
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_schnell, folder)
    for shard in (folder / "transformer").glob("*.safetensors"):
        shard.unlink()
    plant_pickle(folder / "transformer" / "diffusion_pytorch_model.bin", marker)
    before = snapshot(home)
    refused(mflux("convert", folder, "--name", "pickled"), "pickle-based")
    refused(mflux("quantize", folder, "--bits", "4", "--name", "pickled"), "pickle-based")
    run = ["run", "--path", folder, "--prompt", "a cat", "--width", "32", "--height", "32", "--steps", "1"]
    refused(mflux(*run, "--seed", "1", cwd=tmp_path), "pickle-based")
    assert not marker.exists() and snapshot(home) == before
    consistent(home)


@pytest.mark.parametrize("filename", ["evil.pt", "renamed.safetensors"])
def test_planted_pickle_as_a_lora(home, tmp_path, filename):
    marker = tmp_path / "UNPICKLED"
    evil = plant_pickle(tmp_path / filename, marker)
    run = ["run", "-m", "schnell", "--no-pull", "--prompt", "a cat", "--width", "32", "--height", "32"]
    refused(mflux(*run, "--steps", "1", "--seed", "1", "--lora-paths", evil, cwd=tmp_path))
    refused(mflux("inspect", evil))
    assert not marker.exists() and not (tmp_path / "image.png").exists()
    consistent(home)


# --- malformed LoRA files --------------------------------------------------------------------------

LORA_MODULE = "transformer.single_transformer_blocks.0.attn.to_q"


def _lora(path: Path, alpha=None, metadata=None) -> Path:
    from tests.lora_files import peft, save

    down = np.zeros((4, 64), np.float32)
    tensors = peft({LORA_MODULE: (down, down.T.copy())})
    if alpha is not None:
        tensors[f"{LORA_MODULE}.alpha"] = alpha
    return save(path, tensors, metadata)


LORAS = {
    "alpha-not-a-scalar": (dict(alpha=np.ones(3, np.float32)), "not a number"),
    "metadata-a-list": (dict(metadata={"lora_adapter_metadata": "[1, 2]"}), "not a JSON object"),
    "metadata-alpha-a-string": (
        dict(metadata={"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "eight"})}),
        "not a number",
    ),
    "metadata-pattern-a-list": (
        dict(metadata={"lora_adapter_metadata": json.dumps({"transformer.alpha_pattern": [1]})}),
        "alpha_pattern",
    ),
    "metadata-not-json": (dict(metadata={"lora_adapter_metadata": "{"}), "not valid json"),
}


@pytest.mark.parametrize("fault", LORAS)
def test_malformed_lora(home, tmp_path, fault):
    kwargs, words = LORAS[fault]
    lora = _lora(tmp_path / "lora.safetensors", **kwargs)
    refused(mflux("inspect", lora), str(lora), words)


def test_control_lora_on_schnell(home, tmp_path, tiny_schnell):
    import tests.lora_files as lf

    hidden, _ = lf.transformer_shapes(tiny_schnell)["x_embedder"]
    pair = lf.pair(np.random.default_rng(0), 4, 128, hidden)  # x_embedder 128 inputs wide: a Control LoRA
    control = lf.save(tmp_path / "control.safetensors", lf.peft({"transformer.x_embedder": pair}))
    run = ["run", "-m", "schnell", "--no-pull", "--prompt", "a cat", "--width", "32", "--height", "32"]
    refused(
        mflux(*run, "--lora-paths", control, cwd=tmp_path), "is a Control LoRA for FLUX.1 dev", "(use dev"
    )
    assert not (tmp_path / "image.png").exists()


# --- paths that are not models ---------------------------------------------------------------------


def test_inspect_refuses_what_is_not_a_model(home, tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    write_header(tmp_path / "deep" / "er" / "x.safetensors", _OK, b"\0" * 8)
    refused(mflux("inspect", tmp_path), "does not look like a model folder")
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    refused(mflux("inspect", fifo, timeout=30), "not a regular file")
    long = tmp_path / ("a" * 300 + ".safetensors")
    refused(mflux("inspect", long), "File name too long")
    refused(mflux("convert", long, "--base", "schnell"), "File name too long")


def test_import_refuses_what_is_not_a_whole_model_folder(home, tiny_schnell, tmp_path):
    before = snapshot(home)
    refused(mflux("import", tmp_path / "nowhere"), "no such folder")
    refused(mflux("import", tiny_schnell / "vae"), "not a FLUX.1 checkpoint")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_schnell, broken)
    (broken / "tokenizer/vocab.json").unlink()
    (broken / "tokenizer/vocab.json").symlink_to("../../blobs/gone")
    refused(mflux("import", broken), "vocab.json: a broken symlink")
    refused(mflux("import", home / "schnell"), "the store's own 'schnell'")
    assert snapshot(home) == before
    consistent(home)


def test_convert_refuses_a_variant_the_model_is_not(home, tiny_fill):
    before = snapshot(home)
    refused(mflux("convert", tiny_fill, "--variant", "dev"), "does not fit variant 'dev'", "in_channels=384")
    refused(mflux("convert", "schnell", "--variant", "dev"), "schnell is a schnell model; drop --variant dev")
    assert snapshot(home) == before
    consistent(home)


def test_canny_and_redux_misuse_is_refused_before_any_pull(home, tmp_path):
    # depth and redux are not in this store: refused before they would be pulled (issue 34)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "photo.png")
    (tmp_path / "notes.png").write_text("not an image")
    before = snapshot(home)
    refused(
        mflux("run", "-m", "depth", "--control-from", tmp_path / "photo.png", "--canny", "--prompt", "a"),
        "depth follows a depth map, which mflux does not compute",
    )
    refused(mflux("run", "--redux", tmp_path / "notes.png"), "--redux", "not an image PIL can read")
    refused(
        mflux("run", "--redux", tmp_path / "photo.png", "--negative-prompt", "blur"),
        "--redux with --negative-prompt (true CFG with Redux) is not supported yet",
    )
    assert snapshot(home) == before
    consistent(home)


def test_mflux_home_is_a_file(tmp_path):
    store = tmp_path / "not-a-folder"
    store.write_text("x")
    env = {"MFLUX_HOME": str(store)}
    for args in (
        ["list"],
        ["pull", "schnell"],
        ["convert", "schnell"],
        ["quantize", "schnell", "--bits", "8"],
        ["rm", "schnell", "-y"],
    ):
        refused(mflux(*args, env=env), f"MFLUX_HOME {store} is not a folder")
    assert store.read_text() == "x"


def test_empty_store_says_how_to_begin(mflux_home):
    result = mflux("list")
    assert result.returncode == 0 and result.stdout.split() == ["NAME", "FORMAT", "QUANT", "SIZE", "MODIFIED"]
    assert result.stderr.strip() == f"the store {mflux_home} is empty (get a model with: mflux pull schnell)"


def test_serve_refuses_bad_worker_flags_before_anything(mflux_home):
    # the model is missing too: the flags are what is named, checked before the store or MLX
    for flags, code, words in (
        (["--workers", "0"], 1, "--workers must be at least 1, got 0"),
        (["--devices", "0,x"], 1, "--devices: '0,x' is not a list of GPU numbers"),
        (["--devices", "-1"], 1, "not a list of GPU numbers"),
        (["--devices", "0,99"], 1, "--devices 0,99"),  # no CUDA here; on a CUDA host, no GPU 99
    ):
        refused(mflux("serve", "--model", "nope", *flags), words, code=code)


# --- kills and interrupts mid-build ----------------------------------------------------------------


def _building(home: Path, name: str, child: subprocess.Popen, timeout: float = 60) -> bool:
    """Wait until `child` writes weights into its build folder for `name`; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        with contextlib.suppress(OSError):  # the folder appears and vanishes under us
            for entry in (home / TMP).iterdir():
                if entry.name.startswith(f"{name}.") and any(entry.glob("*/*.safetensors")):
                    return True
        time.sleep(0.002)
    return False


def _interrupt_build(home: Path, args: list, name: str, sig: int) -> subprocess.CompletedProcess:
    """Run `mflux *args` and send `sig` while it writes weights. Retried, since a tiny model can be
    stored before the signal lands; a run counts only if the model was not stored."""
    for _ in range(8):
        child = start(*args)
        caught = _building(home, name, child)
        if caught:
            child.send_signal(sig)
        result = finish(child)
        if caught and not Store(home).exists(name):
            return result
        if Store(home).exists(name):
            Store(home).remove(name)
    raise AssertionError(f"never caught `mflux {' '.join(args)}` mid-build")


BUILDS = {
    "convert": (["convert", "schnell", "--dtype", "float32"], "schnell-mlx"),
    "quantize": (["quantize", "schnell", "--bits", "4"], "schnell-q4"),
}


@pytest.mark.parametrize("command", BUILDS)
def test_kill_9_mid_build_then_the_next_command_cleans_up(home, command):
    args, name = BUILDS[command]
    killed = _interrupt_build(home, args, name, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in (home / TMP).iterdir() if p.is_dir()]  # the dead build is still there
    listing = mflux("list")
    assert listing.returncode == 0 and name not in listing.stdout and listing.stderr == ""
    again = mflux(*args)
    assert again.returncode == 0, again.stderr
    assert list((home / TMP).iterdir()) == []  # the re-run removed the dead build first
    consistent(home, listed=[*MODELS, name], good=[*MODELS, name])


@pytest.mark.parametrize("command", BUILDS)
def test_ctrl_c_mid_build_leaves_nothing(home, command):
    args, name = BUILDS[command]
    before = snapshot(home)
    refused(_interrupt_build(home, args, name, signal.SIGINT), "interrupted", code=130)
    assert not (home / TMP).exists() or list((home / TMP).iterdir()) == []
    assert snapshot(home) == before
    assert mflux(*args).returncode == 0
    consistent(home, listed=[*MODELS, name], good=[*MODELS, name])


# Where CI once caught a Ctrl-C mid-build: inside string-compiled code (the methods a dataclass makes at
# a lazy import), which CPython then took for an unhandled KeyboardInterrupt, exiting -2 after the one
# line. A sitecustomize (run by `python -m mflux` at start) makes `mflux list` press Ctrl-C at such a
# spot every time: the exec'd loop stands for that code. "twice": a second press while the first is
# reported.
CTRL_C = {
    "in-string-code": """
def pressed(self):
    exec("os.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass", {"os": os, "signal": signal})
""",
    "twice": """
class Twice(Interrupted):
    def __str__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        return "listing interrupted"

def pressed(self):
    try:
        os.kill(os.getpid(), signal.SIGINT)
        while True:
            pass
    except KeyboardInterrupt:
        raise Twice() from None
""",
}


def with_site(tmp_path: Path, code: str) -> dict:
    """The environment of a child that runs `code` as its sitecustomize, at start-up."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("how", CTRL_C)
def test_ctrl_c_exits_130_wherever_it_lands(home, tmp_path, how):
    code = f"import os, signal, time\nfrom mflux.errors import Interrupted\nfrom mflux.store import Store\n{CTRL_C[how]}"
    result = mflux("list", env=with_site(tmp_path, code + "Store.list = pressed\n"))
    refused(result, "listing interrupted" if how == "twice" else "interrupted", code=130)


# Ctrl-C right after typing a command lands while Python imports the CLI's modules (about 0.15 s), before
# any command runs: the sitecustomize presses it as the named module is imported. The first and last
# modules cli.py imports, and cli.py itself.
PRESS_AT_IMPORT = """
import os, signal, sys

class Press:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Press())
"""


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("module", ["click", "mflux.cli", "mflux.runtime.quantization"])
def test_ctrl_c_while_the_command_starts(mflux_home, tmp_path, module, entry):
    result = mflux("list", env=with_site(tmp_path, PRESS_AT_IMPORT.format(module=module)), entry=entry)
    assert refused(result, code=130) == "error: interrupted"


# Ctrl-C after the command printed its result, while the interpreter shuts down: in an atexit callback
# (Python code, where a handler would raise), and as the modules are torn down (after Py_Finalize has
# put back SIGINT's default action). The command's work is done: it exits 0, and prints what it would
# have printed anyway.
PRESS_AT_EXIT = {
    "atexit": """
import atexit, os, signal, time

@atexit.register
def press():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
""",
    "teardown": """
import os, signal

class Press:
    def __del__(self, kill=os.kill, pid=os.getpid(), sig=signal.SIGINT):
        kill(pid, sig)

press = Press()
""",
}


@pytest.mark.parametrize("when", PRESS_AT_EXIT)
def test_ctrl_c_after_the_command_finished(mflux_home, tmp_path, when):
    pressed, plain = mflux("list", env=with_site(tmp_path, PRESS_AT_EXIT[when])), mflux("list")
    assert plain.returncode == 0 and "Traceback" not in plain.stderr, plain.stderr
    assert (pressed.returncode, pressed.stdout, pressed.stderr) == (0, plain.stdout, plain.stderr)


def test_two_quantize_runs_to_one_name(home):
    children = [start("quantize", "schnell", "--bits", "4", "--name", "twin") for _ in range(2)]
    results = [finish(c) for c in children]
    assert sorted(r.returncode for r in results) == [0, 1], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 1)
    line = refused(loser)
    assert "'twin' already exists" in line or "'twin' was created by another command meanwhile" in line
    consistent(home, listed=[*MODELS, "twin"], good=[*MODELS, "twin"])


# --- a read-only store and a full disk (a tmpfs: needs root, as CI has) ----------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs; the test gets a function (size, read_only) -> mount point."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (CI runs as root); not run, so not counted as passing")
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); not counted as passing")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def _remount_read_only(point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)


def test_read_only_store(golden, tmpfs, monkeypatch, hub):
    point = tmpfs("32m")
    store = point / "store"
    shutil.copytree(golden, store)
    _remount_read_only(point)
    monkeypatch.setenv("MFLUX_HOME", str(store))
    before = snapshot(store)
    for args in (
        ["pull", "schnell", "--name", "other"],
        ["convert", "schnell"],
        ["quantize", "schnell", "--bits", "4"],
        ["rm", "schnell-q8", "-y"],
    ):
        refused(mflux(*args, env=hub.env), "not writable")
    assert mflux("list").returncode == 0
    assert snapshot(store) == before
    for name in MODELS:
        assert inspect(name, verify=True)["verify"]["ok"]


def test_a_run_that_cannot_fit_is_refused_before_the_pull(home, hub, tmp_path):
    """dev is not in this store: a batch whose expected peak is twice what this machine can use is
    refused in one line (mflux.fit) before the Hub is asked or the store written."""
    from mflux import fit

    def plan(batch):
        return fit.plan_for(
            fit.catalog_architecture("dev"), None, "float32", None, height=2048, width=2048, batch=batch
        )

    batch = next(b for b in range(1, 1000) if fit.peak(plan(b)) > 2 * fit.usable_memory().usable)
    before = snapshot(home)
    args = ["run", "-m", "dev", "--prompt", "x", "--precision", "float32", "--width", "2048"]
    args += ["--height", "2048", "-n", batch, "--batch-size", batch]
    refused(mflux(*args, env=hub.env, cwd=tmp_path), "dev needs about", "--ignore-memory")
    assert hub.server.requests == [] and snapshot(home) == before


def test_full_disk_is_checked_before_any_work(golden, tmpfs, monkeypatch, hub):
    point = tmpfs("12m")  # the store takes 9.4 MB: a float32 copy of schnell (9.9 MB) can't fit
    store = point / "store"
    shutil.copytree(golden, store)
    monkeypatch.setenv("MFLUX_HOME", str(store))
    before = snapshot(store)
    refused(mflux("convert", "schnell", "--dtype", "float32"), "not enough disk space", "needs about")
    refused(mflux("pull", "schnell", "--name", "other", env=hub.env), "not enough disk space")
    assert snapshot(store) == before
    consistent(store)


@pytest.mark.parametrize("what", ["convert", "quantize", "tokenizers"])
def test_disk_full_while_writing(golden, tmpfs, monkeypatch, what):
    """The write itself fills the disk (the free-space check is bypassed): mx.save_safetensors raises
    RuntimeError("[write] ..."), copying the tokenizers a shutil.Error with errno None."""
    import mflux.convert as convert

    point = tmpfs("11m")
    store = point / "store"
    shutil.copytree(golden, store)
    monkeypatch.setenv("MFLUX_HOME", str(store))
    monkeypatch.setattr(convert, "_check_space", lambda *a: None)
    if what == "tokenizers":  # weights written as nothing, and a disk with room for no tokenizer
        monkeypatch.setattr(
            convert, "save_shards", lambda tensors, folder, **kw: [folder.mkdir(parents=True), *tensors][:0]
        )
        ballast = point / "ballast"
        free = shutil.disk_usage(point).free
        ballast.write_bytes(b"\0" * (free - 8192))
    before = snapshot(store)
    with pytest.raises(MfluxError) as e:
        if what == "quantize":
            convert.quantize("schnell", bits=8, dtype="float32", name="big", progress=False)
        else:
            convert.convert("schnell", dtype="float32", name="big", progress=False)
    assert str(e.value).startswith("disk full while writing model 'big'") and "\n" not in str(e.value)
    assert snapshot(store) == before
    consistent(store)


# --- a failing or hostile Hub ----------------------------------------------------------------------


def _pull(hub: _Hub, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return mflux("pull", *args, env={**hub.env, **(env or {})})


def _pulled(result: subprocess.CompletedProcess, home: Path, *names: str) -> None:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    consistent(home, listed=[*MODELS, *names], good=[*MODELS, *names])


HUB_REFUSALS = {
    # name: (set the fault, pull arguments, extra environment, words in the error)
    "500": (lambda s: s.fail.update({VAE: 500}), ["schnell", "--name", "x"], {}, ["answered 500"]),
    "404-file": (lambda s: s.fail.update({VAE: 404}), ["schnell", "--name", "x"], {}, ["404"]),
    "404-repo": (None, ["someone/nothing"], {"HF_TOKEN": GOOD_TOKEN}, ["'someone/nothing' not found"]),
    "401-gated": (None, ["dev"], {}, [f"{DEV} is gated", "HF_TOKEN"]),
    "403-no-access": (None, ["dev"], {"HF_TOKEN": NO_ACCESS_TOKEN}, ["no access to the gated"]),
    "401-bad-token": (None, ["schnell", "--name", "x"], {"HF_TOKEN": "hf_expired"}, ["refused your token"]),
    "wrong-content": (lambda s: s.corrupt.add(VAE), ["schnell", "--name", "x"], {}, [f"{VAE} is corrupt"]),
    "captive-portal": (lambda s: setattr(s, "html_api", True), ["schnell", "--name", "x"], {}, ["not JSON"]),
    "offline": (None, ["schnell", "--name", "x"], {"HF_HUB_OFFLINE": "1"}, ["HF_HUB_OFFLINE is set"]),
    "offline-dry-run": (
        None,
        ["schnell", "--name", "x", "--dry-run"],
        {"HF_HUB_OFFLINE": "1"},
        ["--dry-run", "needs the network"],
    ),
    "traversal": (None, ["evil/traversal"], {}, ["unsafe file path", "nothing was downloaded"]),
    "absolute-path": (None, ["evil/absolute"], {}, ["unsafe file path"]),
    "other-port-incomplete": (
        None,
        ["someone/other-port-no-vae"],
        {},
        ["other MLX port", "lacks vae/0.safetensors"],
    ),
}


@pytest.mark.parametrize("fault", HUB_REFUSALS)
def test_hub_fault_is_one_line(home, hub, tmp_path, fault):
    inject, args, env, words = HUB_REFUSALS[fault]
    if inject:
        inject(hub.server)
    before = snapshot(home)
    refused(_pull(hub, *args, env=env), *words, note="pulling ")
    assert snapshot(home) == before
    if fault.startswith(("offline", "traversal", "absolute", "other-port")):
        assert hub.resolves() == []  # refused before any download
    assert list(tmp_path.parent.rglob(PWNED)) == [] and not Path(f"/tmp/{PWNED}").exists()
    consistent(home)
    if fault == "wrong-content":  # the corrupt file was deleted, not kept to be resumed
        assert list(home.glob(f".downloads/*/{VAE}*")) == []


def test_hub_faults_that_a_pull_survives(home, hub):
    # A dropped connection and a stall mid-file: the pull resumes with a Range and completes.
    hub.server.drop_after[VAE] = 1_000_000
    hub.server.stall_after["transformer/diffusion_pytorch_model-00001-of-00003.safetensors"] = 100_000
    result = _pull(hub, "schnell", "--name", "x", env={"HF_HUB_DOWNLOAD_TIMEOUT": "1"})
    _pulled(result, home, "x")
    assert hub.server.ranges(VAE) == ["", "bytes=1000000-"]


def test_corrupt_download_then_a_clean_one(home, hub):
    hub.server.corrupt.add(VAE)
    refused(_pull(hub, "schnell", "--name", "x"), "is corrupt", "deleted it", note="pulling ")
    hub.server.corrupt.clear()
    _pulled(_pull(hub, "schnell", "--name", "x"), home, "x")


def test_listed_files_outside_the_patterns_are_never_fetched(home, hub, tmp_path):
    # `tokenizer/*` matches one path segment, and pickles are never taken, even inside the patterns.
    _pulled(_pull(hub, "evil/deeper"), home, "deeper")
    _pulled(_pull(hub, "evil/pickled"), home, "deeper", "pickled")
    assert not any(p.endswith((PWNED, ".bin")) for p in hub.resolves())
    assert not (home / "deeper" / "tokenizer" / "sub").exists()
    assert not (tmp_path.parent.parent / "UNPICKLED-BY-PULL").exists()


def test_redirect_to_a_dead_host_names_that_host(home, hub):
    dead = HubServer()  # never started: its port refuses connections
    hub.server.redirect[VAE] = f"{dead.url}/cdn/{VAE}"
    line = refused(
        _pull(hub, "schnell", "--name", "x"), f"cannot reach 127.0.0.1:{dead.port}", note="pulling "
    )
    assert "redirected the download" in line
    consistent(home)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_pull_resumes(home, hub, sig):
    hub.server.stall_after[VAE] = 1_000_000
    child = start("pull", "schnell", "--name", "x", env=hub.env)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size >= 1_000_000 for p in home.glob(f".downloads/*/{VAE}.part")):
        assert time.monotonic() < deadline and child.poll() is None, "the pull never reached the stall"
        time.sleep(0.02)
    child.send_signal(sig)
    result = finish(child)
    hub.server.release.set()
    if sig == signal.SIGINT:
        refused(result, "pull interrupted; the partial", "again to resume", code=130, note="pulling ")
    else:
        assert result.returncode == -signal.SIGKILL
    consistent(home)  # nothing half-built; the partial download waits in .downloads
    _pulled(_pull(hub, "schnell", "--name", "x"), home, "x")
    assert hub.server.ranges(VAE)[-1] == "bytes=1000000-"


# --- the store and the command line (issue 33) ----------------------------------------------------

Q8_SHARD = "transformer/model-00001-of-00001.safetensors"


def copy_made_long_ago(golden: Path, home: Path) -> None:
    """The golden store copied as `cp -r` copies (no times kept) long after it was made: every file is
    newer than its manifest's `created`."""
    shutil.copytree(golden, home, copy_function=shutil.copyfile)
    for manifest in home.glob("*/manifest.toml"):
        st = manifest.stat()
        text = re.sub(r'(?m)^created = ".*"$', 'created = "2020-01-01T00:00:00+00:00"', manifest.read_text())
        manifest.write_text(text)
        os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_copied_store_is_hashed_once_then_trusted(golden, mflux_home, tmp_path):
    # It refused every run ("changed after the model was stored"), and --verify was not remembered
    copy_made_long_ago(golden, mflux_home)
    modified = {m.name: m.modified for m in Store(mflux_home).list()}
    run = ["run", "--no-pull", "-p", "a cat", *TINY_RUN]
    first = mflux(*run, "-m", "schnell-q8", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    files = len(Store(mflux_home).get("schnell-q8").manifest.files)
    assert f"note: schnell-q8: {files} files are newer than its manifest" in first.stderr, first.stderr
    again = mflux(*run, "-m", "schnell-q8", cwd=tmp_path)
    assert again.returncode == 0 and "sha256" not in again.stderr, again.stderr
    verified = mflux("inspect", "schnell", "--verify")
    assert verified.returncode == 0 and "verify: OK" in verified.stdout, verified.stderr
    after = mflux(*run, "-m", "schnell", cwd=tmp_path)
    assert after.returncode == 0 and "sha256" not in after.stderr, after.stderr
    assert {m.name: m.modified for m in Store(mflux_home).list()} == modified  # `list` shows when made
    assert "newer files matched their sha256" in mflux("inspect", "schnell").stdout
    consistent(mflux_home)


def test_a_copied_store_with_an_edited_file_is_refused_every_time(golden, mflux_home, tmp_path):
    copy_made_long_ago(golden, mflux_home)
    flip(mflux_home / "schnell-q8" / Q8_SHARD)  # same size: only its sha256 tells
    for _ in range(2):  # nothing was stamped by the failed check
        result = mflux("run", "--no-pull", "-p", "a cat", *TINY_RUN, "-m", "schnell-q8", cwd=tmp_path)
        refused(result, f"schnell-q8 is damaged: {Q8_SHARD} does not match its sha256", note="note: ")
    assert "checked" not in (mflux_home / "schnell-q8" / "manifest.toml").read_text()


def test_a_damaged_quantized_model_names_the_quantize_that_remakes_it(home, tmp_path):
    # schnell-q8 was made by `quantize schnell --bits 8`: "pull or convert it again" was the wrong fix
    remake = "mflux quantize schnell --bits 8 --name schnell-q8 --force"
    truncate(home / "schnell-q8" / Q8_SHARD)
    for args in (["inspect", "schnell-q8"], ["run", "-m", "schnell-q8", "--no-pull", "-p", "a", *TINY_RUN]):
        line = refused(mflux(*args, cwd=tmp_path), "schnell-q8 is damaged", Q8_SHARD)
        assert f"make it again: {remake}" in line, line
    assert remake in mflux("list").stderr
    made = mflux(*remake.split()[1:])
    assert made.returncode == 0, made.stderr
    consistent(home)


def test_convert_refuses_a_quantized_model_naming_what_to_run(home):
    before = snapshot(home)
    line = refused(mflux("convert", "schnell-q8"), "schnell-q8 is already quantized (q8)")
    assert "mflux run -m schnell-q8" in line and "mflux quantize schnell --bits N" in line, line
    assert snapshot(home) == before


def test_from_an_image_made_with_path_runs_that_folder_or_refuses(mflux_home, tiny_schnell, tmp_path):
    # It fell back to schnell, a 34 GB pull; now the image records the folder
    folder = tmp_path / "my-flux"
    shutil.copytree(tiny_schnell, folder)
    made = mflux("run", "--path", folder, "-p", "a cat", *TINY_RUN, "-o", "a.png", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    again = mflux("run", "--from", "a.png", "-o", "b.png", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"note: model folder {folder}, from the image" in again.stderr
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    )
    folder.rename(tmp_path / "moved")
    gone = mflux("run", "--from", "a.png", cwd=tmp_path)
    refused(gone, f"folder {folder}, which is gone (give -m or --path)", note="note: settings from")
    record = json.loads(Image.open(tmp_path / "a.png").text["mflux"])
    del record["model_path"]  # as the image was written before the fix
    (tmp_path / "old.json").write_text(json.dumps(record))
    old = mflux("run", "--from", "old.json", cwd=tmp_path)
    refused(old, "'my-flux', which is not in the store", "(give -m or --path)", note="note: settings from")
    assert not mflux_home.exists()  # nothing pulled, nothing stored


# --- run's flags (issue 33) ------------------------------------------------------------------------

TINY_RUN = ["--width", "32", "--height", "32", "--steps", "1", "--seed", "1"]


def test_stepwise_every_without_stepwise_names_the_missing_flag(mflux_home):
    line = refused(mflux("run", "--prompt", "a cat", "--stepwise-every", "2"))
    assert line == "error: --stepwise-every needs --stepwise DIR", line
    refused(
        mflux("run", "--prompt", "a cat", "--stepwise", "s", "--stepwise-every", "0"), "at least 1, got 0"
    )


def test_a_path_name_too_long_is_one_line(mflux_home, tmp_path):
    long = tmp_path / ("a" * 300)
    refused(mflux("run", "--path", long, "--prompt", "a cat", *TINY_RUN, cwd=tmp_path), "File name too long")


def test_output_in_a_missing_folder_is_refused(mflux_home, tmp_path):
    missing = tmp_path / "no" / "such"
    line = refused(
        mflux("run", "--prompt", "a cat", "-o", missing / "a.png"), str(missing), "create it first"
    )
    assert not (tmp_path / "no").exists(), line


def test_an_empty_prompt_is_a_prompt(home, tmp_path):
    result = mflux(
        "run", "-m", "schnell", "--no-pull", "--prompt", "", *TINY_RUN, "-o", "e.png", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "e.png").is_file()
    refused(mflux("run", "-m", "schnell", "--no-pull", *TINY_RUN, cwd=tmp_path), "give --prompt")


# --- the command line (issue 33) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["run", "--steps", "abc"],
            "error: --steps must be a whole number, got 'abc' (see: mflux run --help)",
        ),
        (["run", "--image", "."], "error: --image '.' is a folder; give a file (see: mflux run --help)"),
        (
            ["run", "-q", "7"],
            "error: -q/--quantize must be one of 3, 4, 5, 6, 8, got '7' (see: mflux run --help)",
        ),
        (
            ["pull", "schnell", "--name", "bad name"],
            "error: --name: invalid model name 'bad name': use letters",
        ),
        (["serve", "--port", "0"], "error: --port must be from 1 to 65535, got 0 (see: mflux serve --help)"),
        (
            ["run", "--stepz", "2"],
            "error: no such option --stepz (did you mean --steps, --stepwise or --seed?) (see: mflux run --help)",
        ),
        (["inspect"], "error: missing NAME|PATH (see: mflux inspect --help)"),
        (["nope"], "error: no such command 'nope' (see: mflux --help)"),
    ],
)
def test_a_bad_flag_is_an_error_line_and_exit_1(mflux_home, args, line):
    # click's own usage errors read as every other refusal does, and exit 1 as the README promises
    said = refused(mflux(*args))
    assert said.startswith(line), said


def test_help_still_exits_0(mflux_home):
    for args in (["--help"], ["run", "--help"], []):
        result = mflux(*args)
        assert result.returncode == 0 and result.stdout.startswith("Usage: mflux"), result.stderr


def test_a_model_name_in_the_wrong_case_gets_a_suggestion(home):
    refused(mflux("run", "-m", "SCHNELL-Q8", "--no-pull", "--prompt", "a cat"), "did you mean 'schnell-q8'")
    refused(mflux("pull", "SCHNELL", "--dry-run"), "did you mean 'schnell'")


def test_negative_guidance_is_refused(mflux_home):
    line = refused(mflux("run", "-m", "dev", "--prompt", "a cat", "--guidance", "-5"))
    assert line.startswith("error: --guidance must be 0 or more, got -5 ("), line
    assert not mflux_home.exists()  # refused before any pull


def test_run_notes_a_repeated_seed_and_a_lora_of_the_other_variant(home, tmp_path, tiny_schnell):
    import tests.lora_files as lf

    module, (out, inner) = next(iter(lf.transformer_shapes(tiny_schnell).items()))
    pair = lf.pair(np.random.default_rng(0), 4, inner, out)
    dev_lora = lf.save(
        tmp_path / "me.safetensors", lf.peft({f"transformer.{module}": pair}), {"mflux.variant": "dev"}
    )
    result = mflux(
        "run", "-m", "schnell", "--no-pull", "--prompt", "a cat", "--lora-paths", dev_lora,
        "--width", "32", "--height", "32", "--steps", "1", "--seed", "1", "1", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "note: seed 1 given more than once: those images will be identical" in result.stderr
    assert (
        f"note: the LoRA {dev_lora} was trained on dev (its mflux.variant), this model is schnell"
        in result.stderr
    )


def on_a_terminal(*args, cwd) -> str:
    """The command's stderr as a user at a terminal sees it: a pseudo-terminal, read to the end."""
    import pty

    leader, follower = pty.openpty()
    command = [*ENTRIES["python-m"], *map(str, args)]
    child = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
        env=child_env(),
        cwd=cwd,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child has closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert child.wait(timeout=120) == 0, b"".join(chunks).decode()
    return b"".join(chunks).decode()


def test_run_draws_its_bar_only_on_a_terminal(home, tmp_path):
    args = ["run", "-m", "schnell", "--no-pull", "--prompt", "a cat", "--width", "32", "--height", "32"]
    args += ["--steps", "2", "--seed", "1", "2"]
    (tmp_path / "piped").mkdir()
    # bytes, not text: universal newlines would turn each \r into a \n
    piped = subprocess.run(
        [*ENTRIES["python-m"], *args],
        capture_output=True,
        env=child_env(),
        cwd=tmp_path / "piped",
        timeout=120,
    )
    stderr = piped.stderr.decode()
    assert piped.returncode == 0, stderr
    assert b"\r" not in piped.stderr + piped.stdout, repr(stderr)
    wrote = [line for line in stderr.splitlines() if line.startswith("wrote ")]
    assert wrote == ["wrote image_seed_1.png", "wrote image_seed_2.png"], stderr
    (tmp_path / "tty").mkdir()
    seen = on_a_terminal(*args, cwd=tmp_path / "tty")
    assert "\rseed 1 [" in seen and "] 2/2" in seen, repr(seen)


# --- train's command line (issue 33) -------------------------------------------------------------


def test_train_data_file_and_config_mistakes_are_one_line(mflux_home, tiny_schnell, tmp_path):
    from tests.fixtures import write_dataset

    photos = write_dataset(tmp_path / "photos")
    base = ["train", "--model", tiny_schnell, "--output", tmp_path / "me.safetensors"]
    refused(mflux(*base, "--data", photos / "red.png"), "a file, not a data folder", f"--data {photos}")
    config = tmp_path / "configs" / "train.toml"
    config.parent.mkdir()
    config.write_text('data = "photos"\n')  # relative to the current folder, as configs were once read
    refused(
        mflux(*base, "--config", config, cwd=tmp_path), "relative to the config file's folder", str(photos)
    )
    config.write_text("rnak = 4\n")
    refused(mflux(*base, "--config", config), "unknown option 'rnak' (did you mean 'rank'?")


def _checkpoint(path: Path, settings: dict, **meta) -> Path:
    """A training checkpoint's header as `mflux train` writes it (format 1), over one array."""
    import mlx.core as mx

    header = {"kind": "mflux-train-checkpoint", "format_version": "1", "step": "2", "rank": "2"}
    header |= {
        "base_model": "FLUX.1-schnell",
        "alpha": "2.0",
        "targets": "[]",
        "config": json.dumps(settings),
    }
    header = {k: v for k, v in (header | meta).items() if v is not None}
    mx.save_safetensors(str(path), {"random.key": mx.array([0, 1], dtype=mx.uint32)}, metadata=header)
    return path


def test_train_resume_refusals_are_one_line(mflux_home, tiny_schnell, tmp_path):
    from tests.fixtures import write_dataset

    run = {"model": str(tiny_schnell), "data": str(write_dataset(tmp_path / "photos"))}
    run |= {"output": str(tmp_path / "me.safetensors"), "steps": 10, "rank": 2, "lr": 1e-4}
    checkpoint = _checkpoint(tmp_path / "step-000002.safetensors", run)
    refused(mflux("train", "--resume", checkpoint, "--lr", "0.5"), "trained with --lr 0.0001, not 0.5")
    newer = _checkpoint(tmp_path / "newer.safetensors", run, format_version="2")
    refused(mflux("train", "--resume", newer), "checkpoint format 2, newer than this mflux reads (1)")
    bare = _checkpoint(tmp_path / "bare.safetensors", {}, format_version=None)  # unversioned, unrecorded
    refused(mflux("train", "--resume", bare), "does not record its run's --model, --data and --output")


def test_train_ctrl_c_is_the_saved_line_alone(mflux_home, tiny_schnell, tmp_path):
    """A real SIGINT through the installed command mid-training: the checkpoint's line, exit 130, and no
    `error: interrupted` after it; the line's command then continues the run."""
    from tests.fixtures import write_dataset

    write_dataset(tmp_path / "photos")
    args = ["train", "--model", tiny_schnell, "--data", "photos", "-o", "me.safetensors", "--steps", "500"]
    args += ["--rank", "2", "--resolution", "32", "--max-sequence-length", "16", "--precision", "float32"]
    child = subprocess.Popen(
        [*ENTRIES["python-m"], *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=tmp_path,
    )
    log, deadline = tmp_path / "me.train/loss.jsonl", time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline and not (log.is_file() and log.read_text()):
        time.sleep(0.05)  # until a step is done
    child.send_signal(signal.SIGINT)
    result = finish(child, timeout=60)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no "error: interrupted" after it
    pattern = r"interrupted at step (\d+): saved \S+ \(continue with: (mflux train --resume \S+)\)"
    step = re.fullmatch(pattern, lines[0])
    assert step, lines[0]
    resumed = mflux(*step[2].split()[1:], "--steps", int(step[1]) + 1, cwd=tmp_path)
    assert resumed.returncode == 0 and f"resuming from step {step[1]}" in resumed.stderr, resumed.stderr
