"""`mflux pull`: FLUX.1 from the Hugging Face Hub into the model store, resumable and verified.

Where the files live: the store holds the files itself. They are downloaded straight into the store's
own disk, never into the Hugging Face cache (HF_HOME and HF_HUB_CACHE hold no weights for mflux), so
nothing is stored twice and `mflux rm` frees exactly the space it reports. Moving the store (MFLUX_HOME)
moves the models.

Resume: huggingface_hub resumes only within one call, so mflux keeps its own partial downloads in
`<store>/.downloads/<org>--<repo>@<commit>/`. There `<path>.part` grows as bytes arrive, survives Ctrl-C
or a kill, and is continued by a Range request. A complete file is verified against what the Hub gives
(sha256 for LFS files, the git blob sha1 for small ones) and only then loses its `.part` suffix. When
every file is there, they are hard-linked into a `Store.build` folder, which lands atomically with its
manifest, and only then is the partial folder removed. A lock file beside it keeps two pulls apart.

Environment: HF_ENDPOINT, HF_TOKEN (or a token saved by `hf auth login`) and HF_HUB_OFFLINE are read
when `pull` is called, not when huggingface_hub was imported.
"""

import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from huggingface_hub import HfApi, constants, get_token, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from huggingface_hub.utils import tqdm as hf_tqdm

from mflux import __version__
from mflux.catalog import catalog
from mflux.errors import Interrupted, InvalidArgument, MfluxError
from mflux.manifest import (
    REDUX,
    Manifest,
    architecture_from_hf,
    defaults_for,
    read_manifest,
    write_manifest,
)
from mflux.runtime.folder import REDUX_CONFIG_FILES, detect_variant, read_redux_architecture
from mflux.runtime.weights import PICKLE_SUFFIXES, SafetensorsFile
from mflux.store import Store, StoredModel, close_names, format_size, validate_name

DEFAULT_ENDPOINT = "https://huggingface.co"
_OFFLINE = "pulling needs the network, and HF_HUB_OFFLINE is set (unset it to pull)"
_OFFLINE_DRY_RUN = (
    "--dry-run asks the Hub for the file list, so it needs the network too, and HF_HUB_OFFLINE is set "
    "(unset it; the catalog's download estimate is in: mflux list --available)"
)
LICENSE_HOST = "https://huggingface.co"
# The files of a FLUX.1 pipeline in diffusers layout; the root single-file checkpoints are never taken.
DIFFUSERS_PATTERNS = (
    "model_index.json",
    "scheduler/*.json",
    "text_encoder/*.json",
    "text_encoder/*.safetensors",
    "text_encoder_2/*.json",
    "text_encoder_2/*.safetensors",
    "tokenizer/*",
    "tokenizer_2/*",
    "transformer/*.json",
    "transformer/*.safetensors",
    "vae/*.json",
    "vae/*.safetensors",
)
WEIGHTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
# A FLUX.1 model saved by the other MLX port (PyPI mflux 0.x), converted at pull (mflux.othermflux).
OTHER_PORT_FORMAT = "mflux-saved"
OTHER_PORT_PATTERNS = (*(f"{c}/*.safetensors" for c in WEIGHTS), *(f"{t}/*" for t in TOKENIZERS))
RETRIES = 5  # consecutive failed attempts at one file before giving up


@dataclass
class RemoteFile:
    path: str
    size: int
    blob_id: str  # git blob sha1 (of the LFS pointer for LFS files)
    sha256: str | None  # LFS files only

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class PullPlan:
    """What a pull would fetch: returned by `pull(..., dry_run=True)`."""

    name: str
    repo: str
    revision: str
    commit: str
    files: list[RemoteFile]
    present: dict[str, int] = field(default_factory=dict)  # path -> bytes already downloaded
    up_to_date: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def missing_bytes(self) -> int:
        return sum(f.size - self.present.get(f.path, 0) for f in self.files)

    def describe(self) -> str:
        lines = [f"{self.name}: {self.repo}@{self.commit[:12]} (revision {self.revision})"]
        lines += [f"  {format_size(f.size):>10}  {f.path}" for f in self.files]
        lines.append(f"  {format_size(self.total_bytes):>10}  in {len(self.files)} files")
        if self.up_to_date:
            lines.append("already in the store and up to date: nothing to download")
        elif self.present:
            lines.append(f"{format_size(self.total_bytes - self.missing_bytes)} already downloaded (resumes)")
        return "\n".join(lines)


@dataclass
class _Source:
    repo: str
    revision: str
    patterns: tuple[str, ...]
    name: str
    variant: str | None = None  # a catalog model's name (krea's files are dev's); else read from the files
    format: str = "hf"  # or OTHER_PORT_FORMAT: saved by the other MLX port, converted at pull
    kind: str = "model"  # or "lora": one LoRA file, stored for --lora-paths (a catalog entry's kind)


def pull(
    model_or_repo: str,
    *,
    name: str | None = None,
    revision: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    progress: bool = True,
    store: Store | None = None,
) -> StoredModel | PullPlan:
    """Download a catalog model (`schnell`, `dev`, `kontext`, `fill`, `krea`, ...: its name is recorded as
    the variant; `redux` is FLUX.1 Redux, an image encoder and embedder, not a pipeline) or any Hub repo in
    FLUX.1 diffusers layout (`org/name`) into the store, resuming partial downloads and verifying every
    file. A catalog LoRA (`canny-lora`, `depth-lora`) is one file, stored as an entry of kind lora.

    Returns the StoredModel, or with `dry_run` a PullPlan (nothing is written). `force` downloads
    and replaces a model even when the stored one is up to date.
    """
    store = store if store is not None else Store()
    source = _source(model_or_repo, revision, name)
    store.check_root()
    stored = _stored_source(store, source.name)
    if stored is not None and stored.get("repo") != source.repo and not force:
        raise MfluxError(
            f"a model named {source.name!r} is already in the store (from {stored.get('repo') or 'elsewhere'}); "
            "choose another name with --name, or replace it with --force"
        )
    if stored and not force and re.fullmatch(r"[0-9a-f]{40}", source.revision):
        # A pinned commit that is already here needs no network at all.
        if _up_to_date(store, source.name, stored, source.revision):
            return _done(store, source, source.revision, dry_run, progress)
    endpoint, token = _client_settings(dry_run)
    with _hub_errors(source, model_or_repo, token, endpoint, None):
        commit, files = _remote_files(endpoint, token, source)
    if stored and not force and _up_to_date(store, source.name, stored, commit):
        return _done(store, source, commit, dry_run, progress)
    partial = _partial_folder(store.root, source.repo, commit)
    plan = PullPlan(source.name, source.repo, source.revision, commit, files, _present(partial, files))
    if dry_run:
        return plan
    # A save of the other port is written again, converted, before its download is removed.
    _check_space(store, plan, plan.total_bytes if source.format != "hf" else 0)
    store.make_folder(partial.parent)  # a read-only store, or a file as the store, fails here
    _say(progress, f"pulling {source.name} from {source.repo}@{commit[:12]}: {format_size(plan.total_bytes)}")
    with _hub_errors(source, model_or_repo, token, endpoint, partial), _exclusive(partial, source.repo):
        sha256s = _download_all(endpoint, token, source.repo, commit, files, partial, progress)
        model = _install(store, source, commit, files, sha256s, partial, replace=stored is not None)
    _say(progress, f"pulled {source.name} into {model.path}")
    return model


def _source(model_or_repo: str, revision: str | None, name: str | None) -> _Source:
    known = catalog()
    if model_or_repo in known:
        entry = known[model_or_repo]
        patterns = tuple(entry.allow_patterns) or DIFFUSERS_PATTERNS
        name = validate_name(name or model_or_repo)
        return _Source(
            entry.repo, revision or entry.revision, patterns, name, variant=entry.name, kind=entry.kind
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model_or_repo):
        repo_name = model_or_repo.split("/")[1].lower()
        return _Source(
            model_or_repo, revision or "main", DIFFUSERS_PATTERNS, validate_name(name or repo_name)
        )
    close = close_names(model_or_repo, known, 1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise InvalidArgument(
        f"unknown model {model_or_repo!r} ({hint}give one of: {', '.join(known)}, "
        "or a Hugging Face repo as org/name; see: mflux list --available)"
    )


def _client_settings(dry_run: bool = False) -> tuple[str, str | None]:
    # huggingface_hub read HF_HUB_OFFLINE and HF_ENDPOINT at import; honour them as they are now.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise MfluxError(_OFFLINE_DRY_RUN if dry_run else _OFFLINE)
    constants.HF_HUB_OFFLINE = False
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    return endpoint, get_token()


def _remote_files(endpoint: str, token: str | None, source: _Source) -> tuple[str, list[RemoteFile]]:
    # One request gives the commit and each file's size, blob id and LFS sha256. It doesn't retry,
    # so a Hub that can't be reached fails at once.
    api = HfApi(endpoint=endpoint, token=token or False, library_name="mflux", library_version=__version__)
    info = api.model_info(source.repo, revision=source.revision, files_metadata=True, timeout=30)
    files = [
        RemoteFile(s.rfilename, s.size or 0, s.blob_id or "", s.lfs.sha256 if s.lfs else None)
        for s in info.siblings or []
    ]
    paths = [f.path for f in files]
    _check_paths(source.repo, paths)
    if source.kind == "lora":
        _check_lora_layout(source, [p for p in paths if _wanted(p, source.patterns)])
    elif source.variant == REDUX:
        _check_redux_layout(source.repo, paths)
    elif _saved_by_other_port(paths):
        _check_other_port_layout(source.repo, paths)
        source.format, source.patterns = OTHER_PORT_FORMAT, OTHER_PORT_PATTERNS
    else:
        _check_layout(source.repo, paths)
    chosen = [f for f in files if _wanted(f.path, source.patterns)]
    # Small files first: a gated repo or a bad layout shows before gigabytes move.
    return info.sha, sorted(chosen, key=lambda f: (f.lfs, f.size, f.path))


def _wanted(path: str, patterns: tuple[str, ...]) -> bool:
    if path.lower().endswith(PICKLE_SUFFIXES):
        return False
    return any(_matches(path, p) for p in patterns)


def _matches(path: str, pattern: str) -> bool:
    # Segment by segment, so `tokenizer/*` takes `tokenizer/vocab.json` but never
    # `tokenizer/../../x` or `tokenizer/sub/x`: fnmatch's `*` alone would cross `/`.
    parts, wanted = path.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(map(fnmatch.fnmatchcase, parts, wanted))


def _check_paths(repo: str, paths: list[str]) -> None:
    """Refuse the whole listing if any path could land outside the download folder, before anything
    is downloaded: a Hub or mirror never lists such a path for a real repo."""
    for path in paths:
        parts = path.split("/")
        if path.startswith("/") or "\\" in path or "\0" in path or {"", ".", ".."} & set(parts):
            raise MfluxError(
                f"{repo}: the Hub lists an unsafe file path {path!r}, which would be written outside the "
                "model folder; nothing was downloaded (check HF_ENDPOINT: is it a trusted Hub or mirror?)"
            )


def _inside(folder: Path, rel: str) -> Path:
    # The last guard before a write: the resolved target stays inside `folder`.
    target = folder / rel
    if not target.resolve().is_relative_to(folder.resolve()):
        raise MfluxError(f"refusing to write {rel!r} outside {folder}")
    return target


def _check_layout(repo: str, paths: list[str]) -> None:
    present = set(paths)
    missing = [p for p in ("model_index.json", "scheduler/scheduler_config.json") if p not in present]
    for folder in WEIGHTS:
        if f"{folder}/config.json" not in present:
            missing.append(f"{folder}/config.json")
        if not any(p.startswith(folder + "/") and p.endswith(".safetensors") for p in paths):
            missing.append(f"{folder}/*.safetensors")
    missing += [f"{t}/" for t in TOKENIZERS if not any(p.startswith(t + "/") for p in paths)]
    if missing:
        raise MfluxError(
            f"{repo} is not a FLUX.1 pipeline in diffusers layout: it lacks {', '.join(missing)} "
            "(mflux pulls repos laid out like black-forest-labs/FLUX.1-schnell)"
        )


def _saved_by_other_port(paths: list[str]) -> bool:
    """The other MLX port's saved layout (mflux.othermflux): numbered shards, no config files. Told
    from the file list, before anything is downloaded."""
    shards = any(re.fullmatch(r"transformer/\d+\.safetensors", p) for p in paths)
    return shards and "transformer/config.json" not in paths


def _check_other_port_layout(repo: str, paths: list[str]) -> None:
    missing = [f"{c}/0.safetensors" for c in WEIGHTS if f"{c}/0.safetensors" not in paths]
    missing += [f"{t}/" for t in TOKENIZERS if not any(p.startswith(t + "/") for p in paths)]
    if missing:
        raise MfluxError(
            f"{repo} is laid out as the other MLX port saves FLUX.1 (numbered shards, no config files) but "
            f"lacks {', '.join(missing)} (mflux pulls its complete saves: {', '.join(WEIGHTS + TOKENIZERS)})"
        )


def _check_redux_layout(repo: str, paths: list[str]) -> None:
    present = set(paths)
    missing = [p for p in ("model_index.json", *REDUX_CONFIG_FILES.values()) if p not in present]
    for folder in ("image_encoder", "image_embedder"):
        if not any(p.startswith(folder + "/") and p.endswith(".safetensors") for p in paths):
            missing.append(f"{folder}/*.safetensors")
    if missing:
        raise MfluxError(
            f"{repo} is not a FLUX.1 Redux folder: it lacks {', '.join(missing)} "
            "(mflux pulls Redux laid out like black-forest-labs/FLUX.1-Redux-dev)"
        )


def _check_lora_layout(source: _Source, chosen: list[str]) -> None:
    if len(chosen) != 1:
        raise MfluxError(
            f"{source.repo} does not hold {' '.join(source.patterns)}, the LoRA file {source.name} is "
            "(has the repo changed? pin an older commit with --revision)"
        )


def _stored_source(store: Store, name: str) -> dict | None:
    """The stored model's source (empty for one not pulled from the Hub, or broken), or None when absent."""
    if not store.path(name).exists():
        return None
    try:
        manifest = read_manifest(store.path(name))
    except MfluxError:
        return {}
    source = dict(manifest.source or {})
    return source if source.get("kind") == "hub" else {}


def _up_to_date(store: Store, name: str, stored: dict, commit: str) -> bool:
    # Sizes against the manifest: quick, and the sha256s were checked when the files arrived.
    if stored.get("commit") != commit:
        return False
    folder = store.path(name)
    files = read_manifest(folder).files
    return bool(files) and all(_size_of(folder / f["path"]) == f["size"] for f in files)


def _done(store: Store, source: _Source, commit: str, dry_run: bool, progress: bool):
    model = store.get(source.name)
    if dry_run:
        files = [RemoteFile(f["path"], f["size"], "", f["sha256"]) for f in model.manifest.files]
        return PullPlan(source.name, source.repo, source.revision, commit, files, up_to_date=True)
    _say(progress, f"{source.name} is up to date ({source.repo}@{commit[:12]}): nothing to download")
    return model


def _partial_folder(root: Path, repo: str, commit: str) -> Path:
    return Path(root) / ".downloads" / f"{repo.replace('/', '--')}@{commit}"


def _present(partial: Path, files: list[RemoteFile]) -> dict[str, int]:
    present = {}
    for f in files:
        done = _size_of(partial / f.path) == f.size
        have = f.size if done else _size_of(partial / (f.path + ".part")) or 0
        if 0 < have <= f.size:
            present[f.path] = have
    return present


def _check_space(store, plan: PullPlan, converted: int = 0) -> None:
    needed, free = plan.missing_bytes + converted, store.free_bytes()
    if needed > free:
        raise MfluxError(
            f"not enough disk space to pull {plan.name}: it needs {format_size(needed)} in {store.root}, and "
            f"{format_size(free)} is free (free some space, or set MFLUX_HOME to a larger disk)"
        )


def _download_all(
    endpoint: str,
    token: str | None,
    repo: str,
    commit: str,
    files: list[RemoteFile],
    partial: Path,
    progress: bool,
) -> dict[str, str]:
    headers = build_hf_headers(token=token or False, library_name="mflux", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # byte ranges and sizes must be of the file itself
    sha256s = {}
    for f in files:
        url = hf_hub_url(repo, f.path, revision=commit, endpoint=endpoint)
        sha256s[f.path] = _download(url, f, partial, headers, progress)
    return sha256s


def _download(url: str, f: RemoteFile, partial: Path, headers: dict, progress: bool) -> str:
    """Fetch one file into `partial`, verify it, and return its sha256."""
    done = _inside(partial, f.path)
    if _size_of(done) == f.size:
        # Verified when it was completed; a small file is rehashed for the manifest.
        return f.sha256 if f.lfs else _digests(done, blob=False)[0]
    part = partial / (f.path + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    if (_size_of(part) or 0) > f.size:
        part.unlink()
    with _progress_bar(f, _size_of(part) or 0, progress) as bar:
        _fetch(url, part, f.size, headers, bar)
    sha256 = _verify(part, f)
    os.replace(part, done)
    return sha256


def _progress_bar(f: RemoteFile, have: int, enabled: bool):
    return hf_tqdm(
        total=f.size,
        initial=have,
        desc=f.path,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled or None,
        name="mflux.pull",
    )


def _fetch(url: str, part: Path, size: int, headers: dict, bar) -> None:
    # Every byte goes to disk as it arrives, so a dropped connection or a killed process resumes at
    # the exact byte with a Range request.
    failures = 0
    while (have := _size_of(part) or 0) < size:
        error = None
        try:
            _stream(url, part, have, headers, bar)
        except HfHubHTTPError:
            raise
        except HTTPError as e:  # a dropped connection or a timeout
            error = e
        failures = 0 if (_size_of(part) or 0) > have else failures + 1
        if failures >= RETRIES:
            raise error or MfluxError(f"the Hub keeps sending less than all of {url} (try again later)")
        if error is not None:
            time.sleep(0.5 * failures)
    part.touch()  # an empty file takes no request


def _stream(url: str, part: Path, have: int, headers: dict, bar) -> None:
    headers = {**headers, "Range": f"bytes={have}-"} if have else headers
    with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        if r.status_code >= 400:
            r.read()  # the error's body, for the client's message
        hf_raise_for_status(r)
        resumed = have > 0 and r.status_code == 206
        if have and not resumed:
            bar.reset()  # the server ignored the range: start over
        with open(part, "ab" if resumed else "wb") as out:
            for chunk in r.iter_bytes():
                out.write(chunk)
                bar.update(len(chunk))


def _verify(part: Path, f: RemoteFile) -> str:
    sha256, blob = _digests(part, blob=not f.lfs)
    expected, got, kind = (f.sha256, sha256, "sha256") if f.lfs else (f.blob_id, blob, "git blob sha1")
    if got != expected:
        part.unlink()
        raise MfluxError(
            f"downloaded {f.path} is corrupt: its {kind} is {got[:12]}…, the Hub says {expected[:12]}… "
            "(deleted it; run the pull again to download it afresh)"
        )
    return sha256


def _digests(path: Path, blob: bool) -> tuple[str, str | None]:
    """(sha256, git blob sha1 when asked) of a file, in one read."""
    hashes = [hashlib.sha256()]
    if blob:
        hashes.append(hashlib.sha1(b"blob %d\0" % path.stat().st_size))
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            for h in hashes:
                h.update(chunk)
    digests = [h.hexdigest() for h in hashes]
    return digests[0], digests[1] if blob else None


def _install(store: Store, source: _Source, commit: str, files, sha256s, partial: Path, replace: bool):
    name = source.name
    if source.format != "hf":
        return _install_converted(store, source, commit, files, partial, replace)
    manifest = Manifest(
        name=name,
        variant="dev",
        format="hf",
        dtype="bfloat16",
        source={"kind": "hub", "repo": source.repo, "revision": source.revision, "commit": commit},
        files=[{"path": f.path, "size": f.size, "sha256": sha256s[f.path]} for f in files],
        architecture={},
        defaults={},
        kind=source.kind,
    )
    # Read the configs (or the LoRA's header) before moving anything: a bad one can't cost the downloads.
    if source.kind == "lora":
        manifest.dtype = _lora_dtype(partial / files[0].path)
    elif source.variant == REDUX:  # no defaults: the pipeline Redux is used with has them
        manifest.architecture, manifest.variant = read_redux_architecture(partial), REDUX
        manifest.dtype = _dtype(partial, "image_embedder")
    else:
        manifest.architecture = architecture_from_hf(partial)
        manifest.variant = detect_variant(manifest.architecture, source.variant)
        manifest.defaults = defaults_for(manifest.variant, manifest.architecture)
        manifest.dtype = _dtype(partial)
    with store.build(name, force=replace, size_hint=sum(f.size for f in files)) as folder:
        for f in files:
            target = _inside(folder, f.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            _place(partial / f.path, target)
        write_manifest(folder, manifest)
    shutil.rmtree(partial, ignore_errors=True)
    return store.get(name)


def _install_converted(store: Store, source: _Source, commit: str, files, partial: Path, replace: bool):
    # The other port's save: its names become ours as the store model is built (packed layers kept
    # packed), so the store holds one MLX-native copy; the download goes once the model has landed.
    from mflux import othermflux  # imports mlx, which a diffusers pull never needs

    record = {"kind": "hub", "repo": source.repo, "revision": source.revision, "commit": commit}
    record["format"] = OTHER_PORT_FORMAT
    with store.build(source.name, force=replace, size_hint=sum(f.size for f in files)) as folder:
        othermflux.convert(partial, folder, name=source.name, source=record, variant=source.variant)
    shutil.rmtree(partial, ignore_errors=True)
    return store.get(source.name)


def _place(src: Path, dst: Path) -> None:
    # A hard link, so a build that fails (or Ctrl-C) leaves the downloads where a re-run finds them;
    # a move where links aren't supported. The same disk either way, so nothing is copied.
    try:
        os.link(src, dst)
    except OSError:
        os.replace(src, dst)


def _lora_dtype(path: Path) -> str:
    # The LoRA file's dtype, read (and the file checked to be a LoRA) from its header.
    from mflux.runtime.lora import open_lora

    lora = open_lora(path)
    lora.file.close()
    if not lora.modules:
        raise MfluxError(f"{path.name} is not a LoRA: none of its tensors is a LoRA layer of FLUX.1")
    dtypes = {lora.file.tensors[m.down[0]][0] for m in lora.modules}
    top = sorted(dtypes)[0]
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(top, "bfloat16")


def _dtype(folder: Path, component: str = "transformer") -> str:
    # The dtype holding most of the component's bytes (norms are sometimes kept in float32).
    counts: dict[str, int] = {}
    for shard in (folder / component).glob("*.safetensors"):
        for dtype, _, (begin, end) in SafetensorsFile(shard).tensors.values():
            counts[dtype] = counts.get(dtype, 0) + end - begin
    top = max(counts, key=counts.get)
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(top, top.lower())


@contextlib.contextmanager
def _exclusive(partial: Path, repo: str):
    # Two pulls appending to the same partial files would corrupt them both.
    path = partial.with_name(partial.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MfluxError(
                f"another mflux pull is downloading {repo} now (wait for it to finish)"
            ) from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _hub_errors(source: _Source, asked: str, token: str | None, endpoint: str, partial: Path | None):
    """Turns the client's exceptions into one clear line each."""
    again = f"run `mflux pull {asked}` again to resume"
    try:
        yield
    except KeyboardInterrupt:
        kept = "; the partial download is kept" if partial is not None else ""
        raise Interrupted(f"pull interrupted{kept} ({again})") from None
    except GatedRepoError as e:
        raise MfluxError(_gated_message(source.repo, token, e)) from None
    except RevisionNotFoundError:
        raise MfluxError(
            f"revision {source.revision!r} not found in {source.repo} (give a branch, tag or commit of it)"
        ) from None
    except RepositoryNotFoundError:
        raise MfluxError(
            f"repo {source.repo!r} not found on {endpoint} (check the name; a private repo needs a token: "
            "`hf auth login` or HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        raise MfluxError(_http_message(e, source.repo, token)) from None
    except OfflineModeIsEnabled:
        raise MfluxError(_OFFLINE) from None
    except HTTPError as e:
        where = f"; {again}" if partial is not None else ""
        raise MfluxError(
            f"cannot reach {_failed_host(e, endpoint)}: {_first_line(e)} "
            f"(pulling needs the network: check the connection, a proxy, or HF_ENDPOINT{where})"
        ) from None
    except json.JSONDecodeError:
        raise MfluxError(
            f"the Hugging Face Hub at {endpoint} answered with something that is not JSON, such as a "
            "captive portal's or a proxy's page (log in to the network, or check HF_ENDPOINT)"
        ) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MfluxError(
                f"the disk is full ({e.filename or partial}); free some space, then {again}"
            ) from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
            raise MfluxError(
                f"cannot write {e.filename or partial}: {e.strerror} (fix the store's permissions, or "
                "point MFLUX_HOME at a writable folder)"
            ) from None
        raise
    finally:
        if partial is not None:
            _prune(partial.parent)


def _failed_host(error: HTTPError, endpoint: str) -> str:
    """The Hub, or the host it redirected to (a CDN, a mirror's storage) when that is what failed."""
    try:
        url = str(error.request.url)
    except (AttributeError, RuntimeError):  # an error raised before any request was made
        return f"the Hugging Face Hub at {endpoint}"
    host, hub = urlsplit(url).netloc, urlsplit(endpoint).netloc
    if host and host != hub:
        return f"{host} (where the Hugging Face Hub at {endpoint} redirected the download)"
    return f"the Hugging Face Hub at {endpoint}"


def _gated_message(repo: str, token: str | None, error: GatedRepoError) -> str:
    page = f"{LICENSE_HOST}/{repo}"
    how = "`hf auth login`, or set HF_TOKEN"
    if token is None or error.response.status_code == 401:
        return (
            f"{repo} is gated: accept its license at {page} while logged in, then give mflux a token ({how})"
        )
    return (
        f"your Hugging Face token has no access to the gated {repo}: accept its license at {page} "
        f"with that token's account, or use another token ({how})"
    )


def _http_message(error: HfHubHTTPError, repo: str, token: str | None) -> str:
    status = error.response.status_code if error.response is not None else None
    if status == 401 and token is not None:
        return "the Hugging Face Hub refused your token (renew it: `hf auth login`, or set HF_TOKEN)"
    if status == 403:
        return (
            f"no access to {repo} with your token ({LICENSE_HOST}/{repo}; `hf auth login`, or set HF_TOKEN)"
        )
    return f"the Hugging Face Hub answered {status} for {repo}: {_first_line(error)} (try again later)"


def _first_line(error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _prune(folder: Path) -> None:
    # Drop empty folders left by a pull that failed before writing anything.
    if not folder.is_dir():
        return
    for sub in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr)


def _size_of(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None
