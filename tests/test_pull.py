"""`mflux pull` through the real huggingface_hub client, against the local Hub of tests/hub_server.py."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants, snapshot_download

from mflux import hub
from mflux.catalog import catalog
from mflux.errors import MfluxError
from mflux.manifest import read_manifest, write_manifest
from mflux.store import Store
from tests.hub_server import COMMIT, GOOD_TOKEN, NO_ACCESS_TOKEN, HubServer, point_client_at

SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"
FINETUNE = "someone/My-Flux-Finetune"
COMMIT_2 = "fedcba9876543210fedcba9876543210fedcba98"
VAE = "vae/diffusion_pytorch_model.safetensors"
# The real repos' root files, which a pull must never take.
ROOT_FILES = {
    "ae.safetensors": b"a" * 4096,
    "flux1-schnell.safetensors": b"f" * 8192,
    "README.md": b"# FLUX\n",
}


@pytest.fixture(scope="module")
def server(tiny_schnell, tiny_dev, tmp_path_factory):
    no_transformer = tmp_path_factory.mktemp("broken")
    (no_transformer / "model_index.json").write_text("{}")
    with HubServer() as s:
        s.add_repo(SCHNELL, tiny_schnell, commit=catalog()["schnell"].revision, extra=ROOT_FILES)
        s.add_repo(DEV, tiny_dev, gated=True, commit=catalog()["dev"].revision)
        s.add_repo(FINETUNE, tiny_schnell)
        s.add_repo(FINETUNE, tiny_dev, commit=COMMIT_2, refs=("v2",))
        s.add_repo("someone/not-a-pipeline", no_transformer)
        yield s


@pytest.fixture(autouse=True)
def hub_env(server, monkeypatch, tmp_path):
    """Point the client at the local Hub, online, with no token unless a test sets one."""
    point_client_at(server, monkeypatch, tmp_path)
    server.requests.clear()
    server.served.clear()
    server.corrupt.clear()
    server.release.clear()
    yield
    server.release.set()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def repo_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def resolves(server: HubServer) -> list[dict]:
    return [r for r in server.requests if "/resolve/" in r["path"]]


def test_full_pull(server, tiny_schnell, mflux_home, tmp_path):
    model = hub.pull("schnell", progress=False)

    source = repo_files(tiny_schnell)
    stored = repo_files(model.path)
    stored.pop("manifest.toml")
    assert stored == source  # every diffusers file, byte for byte, and none of the root files
    manifest = read_manifest(model.path)
    assert manifest.source == {"kind": "hub", "repo": SCHNELL, "revision": catalog()["schnell"].revision,
                               "commit": catalog()["schnell"].revision}  # fmt: skip
    assert manifest.format == "hf" and manifest.variant == "schnell"
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest.files} == {
        p: (len(data), sha256(data)) for p, data in source.items()
    }
    assert [m.name for m in Store().list()] == ["schnell"]
    assert not (mflux_home / ".downloads").exists()
    assert {r["token"] for r in server.requests} == {None}
    # Stored once: `mflux rm` frees what the files take.
    assert all(p.stat().st_nlink == 1 for p in model.path.rglob("*") if p.is_file())

    # The same patterns through the client's own snapshot_download select the same files.
    reference = snapshot_download(
        SCHNELL,
        revision=catalog()["schnell"].revision,
        allow_patterns=list(catalog()["schnell"].allow_patterns),
        cache_dir=tmp_path / "hf_cache",
        endpoint=server.url,
        token=False,
    )
    assert repo_files(Path(reference)) == source


def test_dry_run_writes_nothing(server, tiny_schnell, mflux_home):
    plan = hub.pull("schnell", dry_run=True)

    source = repo_files(tiny_schnell)
    assert isinstance(plan, hub.PullPlan)
    assert {f.path: f.size for f in plan.files} == {p: len(d) for p, d in source.items()}
    assert plan.total_bytes == sum(len(d) for d in source.values())
    text = plan.describe()
    assert VAE in text and "23 files" in text and "ae.safetensors" not in text
    assert not mflux_home.exists()
    assert resolves(server) == []


def test_dropped_connection_resumes_with_a_range(server, tiny_schnell):
    size = (tiny_schnell / VAE).stat().st_size
    server.drop_after[VAE] = 1_000_000

    hub.pull("schnell", progress=False)

    assert server.ranges(VAE) == ["", "bytes=1000000-"]
    assert server.served[VAE] == size  # nothing was sent twice
    assert (Store().path("schnell") / VAE).read_bytes() == (tiny_schnell / VAE).read_bytes()


def test_ctrl_c_then_a_new_process_resumes(server, tiny_schnell, mflux_home):
    size = (tiny_schnell / VAE).stat().st_size
    server.stall_after[VAE] = 1_000_000
    command = [sys.executable, "-m", "mflux", "pull", "schnell"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    part = next_part(mflux_home, VAE, 1_000_000, child)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=30)
    server.release.set()

    assert child.returncode != 0
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: pull interrupted") and "again to resume" in lines[-1]
    assert "Traceback" not in stderr
    assert part.stat().st_size == 1_000_000
    assert Store().list() == []

    hub.pull("schnell", progress=False)
    assert server.ranges(VAE) == ["", "bytes=1000000-"]
    assert server.served[VAE] == size
    assert server.ranges("model_index.json") == [""]  # completed files are kept, not fetched again
    assert (Store().path("schnell") / VAE).read_bytes() == (tiny_schnell / VAE).read_bytes()


def next_part(home: Path, path: str, size: int, child: subprocess.Popen) -> Path:
    """The partial file of `path`, once it holds `size` bytes."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        for part in home.glob(f".downloads/*/{path}.part"):
            if part.stat().st_size >= size:
                return part
        time.sleep(0.05)
    raise AssertionError(f"no partial {path} of {size} bytes (child exit: {child.poll()})")


def test_corrupted_byte_is_caught_and_deleted(server, tiny_schnell, mflux_home):
    server.corrupt.add(VAE)
    with pytest.raises(MfluxError, match=f"downloaded {VAE} is corrupt: its sha256 is") as e:
        hub.pull("schnell", progress=False)
    assert "deleted it" in str(e.value) and "\n" not in str(e.value)
    assert list(mflux_home.glob(f".downloads/*/{VAE}*")) == []
    assert Store().list() == []

    server.corrupt.clear()
    model = hub.pull("schnell", progress=False)
    assert (model.path / VAE).read_bytes() == (tiny_schnell / VAE).read_bytes()
    assert server.ranges("model_index.json") == [""]


def test_corrupted_small_file_is_caught_by_its_blob_id(server):
    server.corrupt.add("model_index.json")
    with pytest.raises(MfluxError, match="model_index.json is corrupt: its git blob sha1 is"):
        hub.pull("schnell", progress=False)


def test_gated_without_a_token(server, mflux_home):
    with pytest.raises(MfluxError) as e:
        hub.pull("dev", progress=False)
    message = str(e.value)
    assert f"{DEV} is gated" in message
    assert f"https://huggingface.co/{DEV}" in message
    assert "hf auth login" in message and "HF_TOKEN" in message
    assert [r["token"] for r in resolves(server)] == [None]
    assert Store().list() == [] and not (mflux_home / ".downloads").exists()


def test_gated_with_a_token_without_access(server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", NO_ACCESS_TOKEN)
    with pytest.raises(
        MfluxError, match=f"token has no access to the gated {DEV}: accept its license at https"
    ):
        hub.pull("dev", progress=False)
    assert [r["token"] for r in resolves(server)] == [NO_ACCESS_TOKEN]
    assert Store().list() == []


def test_gated_with_a_good_token(server, tiny_dev, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    model = hub.pull("dev", progress=False)
    assert model.manifest.variant == "dev"
    assert model.manifest.defaults["steps"] == 25
    assert {r["token"] for r in resolves(server)} == {GOOD_TOKEN}


def test_token_saved_by_hf_auth_login(server, tmp_path):
    Path(constants.HF_TOKEN_PATH).write_text(GOOD_TOKEN)
    assert hub.pull("dev", progress=False).name == "dev"


def test_server_down(monkeypatch):
    down = HubServer()  # never started: its port refuses connections
    monkeypatch.setenv("HF_ENDPOINT", down.url)
    start = time.monotonic()
    with pytest.raises(MfluxError, match=f"cannot reach the Hugging Face Hub at {down.url}") as e:
        hub.pull("schnell", progress=False)
    assert time.monotonic() - start < 5
    assert "\n" not in str(e.value)


def test_offline_mode(server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MfluxError, match="pulling needs the network, and HF_HUB_OFFLINE is set"):
        hub.pull("schnell", progress=False)
    assert server.requests == []


def test_up_to_date_pull_does_nothing(server, capsys):
    first = hub.pull("schnell", progress=False)
    before = len(server.requests)

    again = hub.pull("schnell")
    assert again.path == first.path
    assert len(server.requests) == before  # a pinned commit already here needs no request at all
    assert "schnell is up to date" in capsys.readouterr().err

    # A branch is resolved with one request, and nothing is downloaded.
    hub.pull(FINETUNE, progress=False)
    before = len(server.requests)
    hub.pull(FINETUNE, progress=False)
    assert [r["path"] for r in server.requests[before:]] == [f"/api/models/{FINETUNE}/revision/main"]


def test_damaged_model_is_pulled_again(server, tiny_schnell):
    model = hub.pull("schnell", progress=False)
    (model.path / VAE).unlink()
    hub.pull("schnell", progress=False)
    assert (model.path / VAE).read_bytes() == (tiny_schnell / VAE).read_bytes()
    assert len(server.ranges(VAE)) == 2


def test_any_repo_in_diffusers_layout(server, tiny_dev):
    model = hub.pull(FINETUNE, progress=False)
    assert model.name == "my-flux-finetune"
    assert model.manifest.source["commit"] == COMMIT

    # Another revision into another name.
    other = hub.pull(FINETUNE, name="finetune-v2", revision="v2", progress=False)
    assert other.manifest.source == {"kind": "hub", "repo": FINETUNE, "revision": "v2", "commit": COMMIT_2}
    assert other.manifest.variant == "dev"
    assert sorted(m.name for m in Store().list()) == ["finetune-v2", "my-flux-finetune"]


def test_layout_is_checked_before_downloading(server):
    with pytest.raises(MfluxError, match="not a FLUX.1 pipeline in diffusers layout: it lacks scheduler"):
        hub.pull("someone/not-a-pipeline", progress=False)
    assert resolves(server) == []


def test_name_taken_by_another_repo(server):
    hub.pull(FINETUNE, name="mine", progress=False)
    with pytest.raises(MfluxError, match="a model named 'mine' is already in the store"):
        hub.pull("schnell", name="mine", progress=False)
    replaced = hub.pull("schnell", name="mine", force=True, progress=False)
    assert replaced.manifest.source["repo"] == SCHNELL


def test_unknown_repo(server):
    with pytest.raises(MfluxError, match="repo 'someone/nothing' not found"):
        hub.pull("someone/nothing", progress=False)
    assert Store().list() == []


def test_unknown_revision(server):
    with pytest.raises(MfluxError, match=f"revision 'v9' not found in {SCHNELL}"):
        hub.pull("schnell", revision="v9", progress=False)


def test_unknown_model_name():
    with pytest.raises(MfluxError, match="unknown model 'shnell' \\(did you mean 'schnell'\\?"):
        hub.pull("shnell")


def test_not_enough_disk_space(server, monkeypatch, mflux_home):
    import shutil

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    with pytest.raises(
        MfluxError, match=r"not enough disk space to pull schnell: it needs 5\.0 MB in .*1.0 KB is free"
    ):
        hub.pull("schnell", progress=False)
    assert resolves(server) == []
    assert not (mflux_home / ".downloads").exists()


def test_disk_full_while_writing(server, monkeypatch, mflux_home):
    class FullDisk:
        def __new__(cls, path, mode):
            return super().__new__(cls) if str(path).endswith(VAE + ".part") else open(path, mode)

        def __init__(self, path, mode):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(hub, "open", FullDisk, raising=False)
    with pytest.raises(
        MfluxError, match="the disk is full .* free some space, then run `mflux pull schnell` again"
    ):
        hub.pull("schnell", progress=False)
    assert Store().list() == []


def test_cli_error_is_one_line(server):
    env = {**os.environ, "HF_ENDPOINT": server.url}
    result = subprocess.run(
        [sys.executable, "-m", "mflux", "pull", "someone/nothing"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: repo 'someone/nothing' not found on {server.url} "
                                                  "(check the name; a private repo needs a token: "
                                                  "`hf auth login` or HF_TOKEN)"]  # fmt: skip


def test_one_pull_at_a_time(server, mflux_home):
    import fcntl

    lock = mflux_home / ".downloads" / f"{SCHNELL.replace('/', '--')}@{catalog()['schnell'].revision}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(MfluxError, match=f"another mflux pull is downloading {SCHNELL} now"):
            hub.pull("schnell", progress=False)
    assert resolves(server) == []


def test_token_the_hub_refuses(server, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_expired")
    with pytest.raises(MfluxError, match="the Hugging Face Hub refused your token"):
        hub.pull("schnell", progress=False)


def test_converted_model_of_the_same_name_is_not_replaced(server, mflux_home):
    (mflux_home / "schnell").mkdir(parents=True)  # a folder of the same name, not from the Hub
    with pytest.raises(MfluxError, match="a model named 'schnell' is already in the store"):
        hub.pull("schnell", progress=False)
    assert server.requests == []


def test_cli_dry_run_prints_the_files_and_the_total(server, capsys, mflux_home, monkeypatch):
    from mflux.cli import main

    monkeypatch.setattr(sys, "argv", ["mflux", "pull", "schnell", "--dry-run"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert f"schnell: {SCHNELL}@{catalog()['schnell'].revision[:12]}" in out
    assert VAE in out and "5.0 MB  in 23 files" in out
    assert not mflux_home.exists()


def test_run_pulls_a_missing_model_then_quantizes_it(server, tmp_path, mflux_home):
    # The end to end: on an empty store, `mflux run --model schnell-q8` pulls from the Hub.
    from PIL import Image

    out = tmp_path / "cat.png"
    command = [sys.executable, "-m", "mflux", "run", "--model", "schnell-q8", "--prompt", "a cat"]
    command += ["--width", "64", "--height", "64", "--seed", "1", "--output", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "schnell is not in the store; pulling it first" in result.stderr
    assert "quantizing schnell to 8 bits" in result.stderr
    assert Image.open(out).size == (64, 64)
    assert [m.name for m in Store().list()] == ["schnell"]
    assert Store().get("schnell").manifest.source["repo"] == SCHNELL


def test_ctrl_c_while_storing_keeps_the_downloads(server, monkeypatch):
    def interrupted(folder, manifest):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "write_manifest", interrupted)
    with pytest.raises(MfluxError, match="pull interrupted; the partial download is kept"):
        hub.pull("schnell", progress=False)
    assert Store().list() == []

    monkeypatch.setattr(hub, "write_manifest", write_manifest)
    before = len(resolves(server))
    hub.pull("schnell", progress=False)
    assert len(resolves(server)) == before  # nothing downloaded twice
    assert [m.name for m in Store().list()] == ["schnell"]
