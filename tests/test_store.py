"""The model store: atomic builds, names, cleanup, manifests, removal, and a read-only disk."""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mflux.catalog import catalog
from mflux.errors import InvalidArgument, MfluxError
from mflux.manifest import (
    FORMAT_VERSION,
    Manifest,
    architecture_from_hf,
    defaults_for,
    hash_files,
    new_manifest,
    read_manifest,
    remake_command,
    write_manifest,
)
from mflux.store import NotStored, Resolved, Store, store_root, validate_name

# The real scheduler configs' shift values (FLUX.1-schnell, FLUX.1-dev).
SCHEDULERS = {
    "schnell": {"shift": 1.0, "use_dynamic_shifting": False},
    "dev": {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}


def write_fake_pipeline(folder: Path, variant: str = "schnell") -> Path:
    """Config files in the diffusers layout plus small random safetensors: enough for the store and
    inspect, which never run a model."""
    rng = np.random.default_rng(0)
    configs = {
        "transformer/config.json": {"_class_name": "FluxTransformer2DModel", "in_channels": 64,
                                    "num_layers": 1, "guidance_embeds": variant == "dev", "out_channels": None},
        "text_encoder/config.json": {"hidden_size": 32, "eos_token_id": 2},
        "text_encoder_2/config.json": {"d_model": 32, "feed_forward_proj": "gated-gelu"},
        "vae/config.json": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        "scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                            "num_train_timesteps": 1000, **SCHEDULERS[variant]},
    }  # fmt: skip
    for rel, config in configs.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(json.dumps(config))
    for component in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        tensors = {f"{component}.w{i}": rng.standard_normal((64, 64)).astype(np.float32) for i in range(2)}
        save_file(tensors, str(folder / component / "model.safetensors"))
    return folder


def make_model(store: Store, name: str, variant: str = "schnell", quantization: dict | None = None) -> Path:
    with store.build(name) as folder:
        write_fake_pipeline(folder, variant)
        source = {"kind": "path", "path": "/nowhere"}
        manifest = new_manifest(folder, name=name, format="hf", dtype="float32", source=source)
        manifest.quantization = quantization
        write_manifest(folder, manifest)
    return store.path(name)


def leftovers(store: Store) -> list[str]:
    tmp = store.root / ".tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def test_store_root_follows_mflux_home(mflux_home, monkeypatch):
    assert store_root() == mflux_home
    assert Store().root == mflux_home
    monkeypatch.delenv("MFLUX_HOME")
    assert store_root() == Path.home() / ".mflux"


def test_build_commits_a_complete_model(mflux_home):
    store = Store()
    path = make_model(store, "schnell", "schnell")
    assert path == mflux_home / "schnell" and (path / "manifest.toml").is_file()
    (model,) = store.list()
    assert model.name == "schnell" and model.manifest.variant == "schnell"
    files = [p for p in path.rglob("*") if p.is_file() and p.name != "manifest.toml"]
    assert model.size_bytes == sum(p.stat().st_size for p in files)
    assert store.get("schnell").manifest == read_manifest(path)
    assert store.last_used() == "schnell"
    assert leftovers(store) == []


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(mflux_home, failure):
    store = Store()
    with pytest.raises(type(failure)):
        with store.build("dev") as folder:
            write_fake_pipeline(folder, "dev")
            write_manifest(folder, new_manifest(folder, name="dev", format="hf", dtype="float32",
                                                source={"kind": "path", "path": "/x"}))  # fmt: skip
            raise failure
    assert store.list() == [] and store.broken() == {}
    assert not (mflux_home / "dev").exists()
    assert leftovers(store) == []
    assert store.last_used() is None


def test_failed_forced_rebuild_keeps_the_old_model(mflux_home):
    store = Store()
    make_model(store, "dev", "dev")
    before = read_manifest(store.path("dev"))
    with pytest.raises(KeyboardInterrupt):
        with store.build("dev", force=True) as folder:
            (folder / "half-written").write_bytes(b"x" * 100)
            raise KeyboardInterrupt
    assert read_manifest(store.path("dev")) == before
    assert not (store.path("dev") / "half-written").exists()
    assert leftovers(store) == []


def test_build_without_manifest_is_not_stored(mflux_home):
    store = Store()
    with pytest.raises(RuntimeError, match="without manifest.toml"):
        with store.build("x") as folder:
            write_fake_pipeline(folder)
    assert store.list() == [] and not store.path("x").exists() and leftovers(store) == []


def test_existing_name_refused_unless_force(mflux_home):
    store = Store()
    make_model(store, "m", "schnell")
    with pytest.raises(MfluxError, match="already exists.*--force"):
        with store.build("m"):
            pytest.fail("the block must not run for an existing name")
    make_model_forced = store.build("m", force=True)
    with make_model_forced as folder:
        write_fake_pipeline(folder, "dev")
        write_manifest(folder, new_manifest(folder, name="m", format="hf", dtype="float32",
                                            source={"kind": "model", "name": "other"}))  # fmt: skip
    assert store.get("m").manifest.variant == "dev"
    assert leftovers(store) == []


def test_disk_full_during_build(mflux_home):
    store = Store()
    with pytest.raises(MfluxError, match=r"disk full while writing model 'big'.*needs about 33.7 GB.*free"):
        with store.build("big", size_hint=33_700_000_000) as folder:
            (folder / "part").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert leftovers(store) == [] and not store.path("big").exists()


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", ".hidden", "", "a..b", "-x", "a b", "x" * 101, "/abs", "..", "é"]
)
def test_bad_names_rejected(mflux_home, name):
    with pytest.raises(InvalidArgument, match="invalid model name"):
        validate_name(name)
    with pytest.raises(InvalidArgument):
        Store().path(name)
    with pytest.raises(InvalidArgument):
        with Store().build(name):
            pass
    assert not mflux_home.exists() or leftovers(Store()) == []


@pytest.mark.parametrize("name", ["schnell", "dev", "schnell-q8", "dev-q4", "my_model.v2", "x" * 100])
def test_good_names(name):
    assert validate_name(name) == name


HOLD_A_BUILD = """
import sys, time
from mflux.store import Store
with Store().build("held") as folder:
    (folder / "partial").write_bytes(b"x" * 10)
    print(folder, flush=True)
    time.sleep(120)
"""


def test_cleanup_spares_live_processes_and_removes_dead_ones(mflux_home):
    store = Store()
    proc = subprocess.Popen([sys.executable, "-c", HOLD_A_BUILD], stdout=subprocess.PIPE, text=True)
    try:
        live = Path(proc.stdout.readline().strip())
        assert live.is_dir() and live.parent == mflux_home / ".tmp"
        # A dead process's leftovers, and a folder whose pid is gone but whose lock is held (as by a
        # process in another pid namespace sharing the store).
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
        dead_pid = int(dead.stdout)
        stale = mflux_home / ".tmp" / f"stale.{dead_pid}.0123abcd"
        (stale / "sub").mkdir(parents=True)
        (stale.parent / f"{stale.name}.lock").touch()
        stale_rm = mflux_home / ".tmp" / f"old.{dead_pid}.89abcdef.rm"
        stale_rm.mkdir()
        locked = mflux_home / ".tmp" / f"other-ns.{dead_pid}.deadbeef"
        locked.mkdir()
        fd = os.open(f"{locked}.lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            assert store.cleanup() == 3
            assert live.is_dir() and (live / "partial").is_file()
            assert locked.is_dir()
            assert not stale.exists() and not stale_rm.exists()
            assert not Path(f"{stale}.lock").exists()
        finally:
            os.close(fd)
        assert store.cleanup() == 2 and not locked.exists()  # the folder and its lock
        assert live.is_dir()
    finally:
        proc.kill()  # a crash: no cleanup of its own
        proc.wait()
    assert live.is_dir()
    assert store.cleanup() == 2  # its folder and its lock file
    assert leftovers(store) == [] and store.list() == []


def test_corrupt_manifest(mflux_home):
    store = Store()
    path = make_model(store, "good")
    make_model(store, "bad")
    manifest = store.path("bad") / "manifest.toml"
    manifest.write_text(manifest.read_text().replace('variant = "schnell"', 'variant = "shnell"'))
    with pytest.raises(MfluxError, match=r"manifest.toml: bad field 'variant'.*'shnell'.*mflux rm bad") as e:
        store.get("bad")
    assert str(manifest) in str(e.value) and "\n" not in str(e.value)
    assert [m.name for m in store.list()] == ["good"]
    assert "variant" in store.broken()["bad"]
    manifest.write_text("this is [not toml")
    with pytest.raises(MfluxError, match="not valid TOML"):
        read_manifest(manifest.parent)
    text = (path / "manifest.toml").read_text()
    (path / "manifest.toml").write_text(text.replace("\nsize = ", "\nsize = -", 1))
    with pytest.raises(MfluxError, match=r"bad field 'files\[0\].size'"):
        read_manifest(path)
    (path / "manifest.toml").write_text(text.replace('sha256 = "', 'sha256 = "zz', 1))
    with pytest.raises(MfluxError, match=r"files\[0\].sha256"):
        read_manifest(path)
    (path / "manifest.toml").write_text(text.replace("[architecture.vae]", "[architecture.vae_]"))
    with pytest.raises(MfluxError, match=r"'architecture.vae': missing"):
        read_manifest(path)


def test_manifest_format_versions(mflux_home):
    path = make_model(Store(), "m")
    text = (path / "manifest.toml").read_text()
    assert text.startswith(f"format_version = {FORMAT_VERSION}\n")
    (path / "manifest.toml").write_text(text.replace("format_version = 1", "format_version = 99"))
    with pytest.raises(MfluxError, match="newer mflux.*upgrade mflux"):
        read_manifest(path)
    (path / "manifest.toml").write_text(text.replace("format_version = 1", "format_version = 0"))
    with pytest.raises(MfluxError, match="manifest format 0 is not supported"):
        read_manifest(path)


def test_manifest_round_trip_and_quantization(mflux_home, tmp_path):
    folder = write_fake_pipeline(tmp_path / "p", "dev")
    q = {
        "transformer": {"bits": 4, "group_size": 64, "mode": "affine", "layers": {"final_layer.linear": {"bits": 8}}},
        "text_encoder_2": {"bits": 8, "group_size": 64, "mode": "affine"},
    }  # fmt: skip
    m = new_manifest(folder, name="p", format="mlx", dtype="bfloat16", source={"kind": "model", "name": "dev"},
                     quantization=q)  # fmt: skip
    write_manifest(folder, m)
    back = read_manifest(folder)
    assert back == m
    assert back.architecture["transformer"]["guidance_embeds"] is True
    assert "out_channels" not in back.architecture["transformer"]  # null: TOML has none
    assert "_class_name" not in back.architecture["scheduler"]
    assert back.defaults["max_shift"] == 1.15 and back.defaults["steps"] == 25
    bad = Manifest(**{**m.to_dict(), "quantization": {"transformer": {"bits": 7, "group_size": 64}}})
    with pytest.raises(MfluxError, match="bad field 'quantization.transformer'.*bits must be one of"):
        write_manifest(folder, bad)
    assert read_manifest(folder) == m  # the refused write left the old file


def test_hash_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.bin").write_bytes(b"hello")
    (tmp_path / "big").write_bytes(os.urandom(3 * 2**20 + 5))  # over several 1 MiB chunks
    (tmp_path / "manifest.toml").write_text("ignored")
    files = hash_files(tmp_path)
    assert [f["path"] for f in files] == ["a/b/x.bin", "big"]
    for f in files:
        data = (tmp_path / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()


def test_architecture_needs_every_config(tmp_path):
    folder = write_fake_pipeline(tmp_path / "p")
    assert set(architecture_from_hf(folder)) == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "vae",
        "scheduler",
    }
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(MfluxError, match=r"missing vae/config.json"):
        architecture_from_hf(folder)


def test_defaults():
    assert defaults_for("schnell", {}) == {"steps": 4, "guidance": 3.5, "max_sequence_length": 256}
    dev = defaults_for("dev", {"scheduler": SCHEDULERS["dev"]})
    assert dev["steps"] == 25 and dev["max_sequence_length"] == 512 and dev["use_dynamic_shifting"] is True
    assert (dev["base_shift"], dev["max_shift"], dev["base_image_seq_len"], dev["max_image_seq_len"]) == (
        0.5, 1.15, 256, 4096,
    )  # fmt: skip


def test_remove_frees_what_it_reports(mflux_home):
    store = Store()
    a, b = make_model(store, "a"), make_model(store, "b")
    sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (a, b)}
    assert store.last_used() == "b"
    assert store.remove(["a", "b"]) == sizes[a] + sizes[b]
    assert not a.exists() and not b.exists() and store.list() == [] and leftovers(store) == []
    assert store.last_used() is None


def test_remove_checks_every_name_first(mflux_home):
    store = Store()
    make_model(store, "a")
    with pytest.raises(MfluxError, match="unknown model 'nope'"):
        store.remove(["a", "nope"])
    assert store.exists("a")
    (mflux_home / "junk").mkdir()  # not a model: shown by broken(), removable
    assert "junk" in store.broken()
    store.remove("junk")
    assert store.broken() == {}


def test_unknown_model_suggests_names(mflux_home):
    store = Store()
    make_model(store, "my-dev-q4", "dev")
    with pytest.raises(MfluxError, match=r"unknown model 'shnell' \(did you mean 'schnell'\?"):
        store.get("shnell")
    with pytest.raises(MfluxError, match="did you mean 'my-dev-q4'"):
        store.get("my-dev-q8")
    with pytest.raises(MfluxError, match=r"'dev' is not in the store \(get it with: mflux pull dev\)"):
        store.get("dev")


def test_resolve_names_a_stored_model_or_its_load_time_bits(mflux_home):
    store = Store()
    make_model(store, "my-dev", "dev")
    make_model(store, "my-dev-q8", "dev")  # stored under a -q name: taken as it is
    assert store.resolve("my-dev") == Resolved("my-dev", store.path("my-dev"))
    assert store.resolve("my-dev-q8") == Resolved("my-dev-q8", store.path("my-dev-q8"))
    assert store.resolve("my-dev-q4") == Resolved("my-dev", store.path("my-dev"), 4)
    with pytest.raises(InvalidArgument, match="7-bit is not a quantization mflux makes"):
        store.resolve("dev-q7")  # before the hint to pull dev
    with pytest.raises(NotStored, match=r"'dev-q4' is not in the store \(get it with: mflux pull dev\)") as e:
        store.resolve("dev-q4")
    assert (e.value.pull, e.value.bits) == ("dev", 4)
    with pytest.raises(NotStored, match="did you mean 'my-dev-q8' or 'my-dev'") as e:
        store.resolve("my-dex-q4")
    assert e.value.pull is None
    with pytest.raises(InvalidArgument, match="invalid model name"):
        store.resolve("a/b")


def test_read_only_store_is_one_clear_error(mflux_home, monkeypatch):
    store = Store()
    make_model(store, "m")
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(mflux_home)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(
        MfluxError, match=r"the model store .* is not writable \(Read-only file system\).*MFLUX_HOME"
    ):
        with store.build("new"):
            pytest.fail("the block must not run")
    with pytest.raises(MfluxError, match="not writable"):
        store.remove("m")
    monkeypatch.undo()
    assert store.exists("m") and not store.path("new").exists()


READ_ONLY_BUILD = """
from mflux.errors import MfluxError
from mflux.store import Store
try:
    with Store().build("new") as folder:
        pass
except MfluxError as e:
    print(e)
"""


def run_on_read_only_store(root: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Run argv with `root` really read-only: chmod for a normal user, a read-only bind mount in a user
    namespace for root (whom permissions don't stop)."""
    env = {**os.environ, "MFLUX_HOME": str(root)}
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
    if shutil.which("unshare") is None:
        pytest.skip("no way to make a read-only store here (running as root without unshare)")
    mount = f'mount --bind -o ro {root} {root} && exec "$@"'
    cmd = ["unshare", "-rm", "sh", "-c", mount, "sh", *argv]
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces unavailable: {probe.stderr.decode().strip()}")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)


def test_really_read_only_store(mflux_home):
    store = Store()
    make_model(store, "m")
    store.cleanup()
    result = run_on_read_only_store(mflux_home, [sys.executable, "-c", READ_ONLY_BUILD])
    assert result.returncode == 0, result.stderr
    assert "is not writable" in result.stdout and "MFLUX_HOME" in result.stdout
    assert not store.path("new").exists() and store.exists("m")


def test_catalog():
    entries = dict(catalog())  # a copy: catalog() is cached
    models = {"schnell", "dev", "kontext", "fill", "krea", "canny", "depth"}
    assert set(entries) == models | {"redux", "canny-lora", "depth-lora"}
    redux = entries.pop("redux")  # not a pipeline: an image encoder and embedder used with one
    assert redux.repo == "black-forest-labs/FLUX.1-Redux-dev" and redux.gated and redux.defaults == {}
    assert redux.allow_patterns == (
        "model_index.json",
        "image_encoder/*",
        "image_embedder/*",
        "feature_extractor/*",
    )
    schnell, dev = entries["schnell"], entries["dev"]
    kontext, fill, krea = entries["kontext"], entries["fill"], entries["krea"]
    assert kontext.repo == "black-forest-labs/FLUX.1-Kontext-dev" and kontext.gated
    assert fill.repo == "black-forest-labs/FLUX.1-Fill-dev" and fill.gated
    assert krea.repo == "black-forest-labs/FLUX.1-Krea-dev" and krea.gated
    # FluxFillPipeline's defaults; Kontext: BFL's guidance 2.5 with FluxKontextPipeline's 28 steps
    assert (fill.defaults["steps"], fill.defaults["guidance"]) == (50, 30.0)
    assert (kontext.defaults["steps"], kontext.defaults["guidance"]) == (28, 2.5)
    assert krea.defaults == dev.defaults
    # diffusers' documented examples: Canny in FluxControlPipeline's, Depth in FluxControlInpaintPipeline's
    assert (entries["canny"].defaults["steps"], entries["canny"].defaults["guidance"]) == (50, 30.0)
    assert (entries["depth"].defaults["steps"], entries["depth"].defaults["guidance"]) == (30, 10.0)
    assert schnell.repo == "black-forest-labs/FLUX.1-schnell" and not schnell.gated
    assert schnell.revision == "741f7c3ce8b383c54771c7003378a50191e9efe9"
    assert dev.repo == "black-forest-labs/FLUX.1-dev" and dev.gated
    assert dev.revision == "3de623fc3c33e44ffbe2bad470d0f45bccf2eb21"
    assert (
        schnell.license == "apache-2.0"
        and "non-commercial" in dev.license
        and dev.license_url.startswith("https://")
    )
    assert schnell.defaults == {"steps": 4, "guidance": 3.5, "max_sequence_length": 256}
    assert dev.defaults == defaults_for("dev", {"scheduler": SCHEDULERS["dev"]})
    for e in entries.values():
        if e.name in models:
            assert e.kind == "model" and 33e9 < e.download_size_bytes < 35e9
    for control in ("canny", "depth"):  # a Control LoRA: one file of its gated repo
        e = entries[f"{control}-lora"]
        assert (e.kind, e.gated, e.defaults) == ("lora", True, {})
        assert e.repo == f"black-forest-labs/FLUX.1-{control.title()}-dev-lora"
        assert e.allow_patterns == (f"flux1-{control}-dev-lora.safetensors",)
    repo = [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json", "tokenizer/vocab.json", "tokenizer_2/spiece.model",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors", "vae/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    never = [
        "flux1-schnell.safetensors",
        "flux1-dev.safetensors",
        "ae.safetensors",
        "README.md",
        "schnell_grid.jpeg",
    ]
    for e in entries.values():
        wanted = repo if e.kind == "model" else []  # a LoRA entry takes its one file only
        assert [f for f in repo if any(fnmatch(f, p) for p in e.allow_patterns)] == wanted
        assert [f for f in never if any(fnmatch(f, p) for p in e.allow_patterns)] == []


def test_catalog_ships_inside_the_package():
    import mflux.manifests

    shipped = Path(mflux.manifests.__file__).parent
    names = ["canny-lora.toml", "canny.toml", "depth-lora.toml", "depth.toml", "dev.toml", "fill.toml"]
    names += ["kontext.toml", "krea.toml", "redux.toml", "schnell.toml"]
    assert sorted(p.name for p in shipped.glob("*.toml")) == names


def test_store_never_touched_at_import(tmp_path):
    home = tmp_path / "never"
    code = "import mflux.store, mflux.manifest, mflux.catalog, mflux.inspector, mflux.cli"
    env = {**os.environ, "MFLUX_HOME": str(home)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    assert not home.exists()


def test_manifest_file_reads_like_a_card(mflux_home):
    text = (make_model(Store(), "m") / "manifest.toml").read_text()
    head = textwrap.dedent(text).splitlines()[:8]
    assert [line.split(" = ")[0] for line in head] == [
        "format_version", "name", "family", "variant", "format", "dtype", "created", "mflux_version",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name, source, dtype, quantization, command",
    [
        ("schnell", {"kind": "hub", "repo": "black-forest-labs/FLUX.1-schnell"}, "bfloat16", None,
         "mflux pull schnell --force"),
        ("ft", {"kind": "hub", "repo": "org/ft"}, "bfloat16", None, "mflux pull org/ft --name ft --force"),
        ("s-mlx", {"kind": "model", "name": "schnell"}, "float32", None,
         "mflux convert schnell --dtype float32 --name s-mlx --force"),
        ("my", {"kind": "path", "path": "/m/a b.safetensors", "base": "dev"}, "bfloat16", None,
         "mflux convert '/m/a b.safetensors' --base dev --name my --force"),
        ("d4", {"kind": "model", "name": "dev"}, "bfloat16",
         {"transformer": {"bits": 4, "group_size": 32, "mode": "affine"}},
         "mflux quantize dev --bits 4 --group-size 32 --components transformer --name d4 --force"),
        ("fp", {"kind": "path", "path": "/m/dev"}, "bfloat16",
         dict.fromkeys(("transformer", "text_encoder", "text_encoder_2"), {"bits": 4, "group_size": 32, "mode": "mxfp4"}),
         "mflux quantize /m/dev --mode mxfp4 --name fp --force"),
    ],
)  # fmt: skip
def test_remake_command_follows_the_recorded_source(name, source, dtype, quantization, command):
    m = Manifest(name, "schnell", "mlx", dtype, source, [], {}, {}, quantization=quantization)
    assert remake_command(m) == command
