"""A local server that speaks enough of the Hugging Face Hub's API for huggingface_hub 2.4.

It serves folders as model repos at fake commits, with the Hub's headers and error codes, and can
inject faults: a dropped connection, a corrupted byte, a stalled download, an error status, an HTML page
where JSON belongs (a captive portal), a redirect to a dead host, or no server at all.
"""

import hashlib
import json
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GOOD_TOKEN = "hf_good"
NO_ACCESS_TOKEN = "hf_noaccess"
# As in the real FLUX.1 repos' .gitattributes.
LFS_SUFFIXES = (".safetensors", ".model", "tokenizer.json")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        # Git stores an LFS file as its pointer, so the tree's oid is the pointer's blob id.
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.oid


@dataclass
class Repo:
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit -> path -> blob

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


def read_folder(folder: Path) -> dict[str, Blob]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        p.relative_to(folder).as_posix(): Blob(p.read_bytes(), p.name.endswith(LFS_SUFFIXES)) for p in files
    }


class HubServer:
    """The Hub on 127.0.0.1 at a free port. Use as a context manager, or start() and stop()."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []  # method, path, range, token of each request
        self.served: dict[str, int] = {}  # file path -> body bytes sent
        self.drop_after: dict[str, int] = {}  # file path -> close after this many bytes, once
        self.stall_after: dict[str, int] = {}  # file path -> hang after this many bytes, once
        self.corrupt: set[str] = set()  # file paths served with one byte flipped
        self.fail: dict[str, int] = {}  # file path -> HTTP status it is answered with, every time
        self.redirect: dict[str, str] = {}  # file path -> URL it is redirected to (302)
        self.html_api = False  # answer the API with a captive portal's HTML page
        self.release = threading.Event()  # ends a stall
        self._httpd: _Server | None = None
        self.port = _free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        gated: bool = False,
        commit: str = COMMIT,
        refs=("main",),
        extra: dict[str, bytes] | None = None,
    ) -> Repo:
        """Serve `folder` (plus `extra` files) as `repo_id` at `commit`, which `refs` point to."""
        repo = self.repos.setdefault(repo_id, Repo(gated=gated))
        files = read_folder(folder)
        files.update({p: Blob(data, p.endswith(LFS_SUFFIXES)) for p, data in (extra or {}).items()})
        repo.commits[commit] = dict(sorted(files.items()))
        repo.refs.update(dict.fromkeys(refs, commit))
        return repo

    def start(self) -> "HubServer":
        self._httpd = _Server(("127.0.0.1", self.port), _handler(self))
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        # The port then refuses connections: the server is down.
        self.release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def ranges(self, path: str) -> list[str]:
        """The Range headers of the GET requests for one file ('' for none)."""
        return [r["range"] for r in self.requests if r["method"] == "GET" and r["path"].endswith("/" + path)]


def point_client_at(server: HubServer, monkeypatch, tmp_path: Path) -> None:
    """Point huggingface_hub at `server`, online, with no token unless a test sets one."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # Where `hf auth login` saves its token; kept away from the real one.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_token"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hangs up mid-download (Ctrl-C, a full disk) is part of the tests, not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _handler(hub: HubServer):
    class Handler(_HubHandler):
        server_hub = hub

    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._route(body=True)

    def do_HEAD(self):
        self._route(body=False)

    def _route(self, body: bool):
        url = urlsplit(self.path)
        hub = self.server_hub
        hub.requests.append(
            {
                "method": self.command,
                "path": unquote(url.path),
                "range": self.headers.get("Range", ""),
                "token": self._token(),
            }
        )
        # Split before unquoting: a revision such as refs%2Fpr%2F1 is one segment.
        parts = url.path.strip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if parts[:2] == ["api", "models"] and hub.html_api:
            page = b"<html><body>Please log in to the Wi-Fi</body></html>"
            self._send(200, {"Content-Type": "text/html"}, page)
        elif parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api("/".join(parts[2:4]), parts[4:], query)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), unquote(parts[3]), unquote("/".join(parts[4:])), body)
        else:
            self._error(404, None, "Not Found")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() or None

    def _repo(self, repo_id: str) -> Repo | None:
        token = self._token()
        if token not in (None, GOOD_TOKEN, NO_ACCESS_TOKEN):
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            # The Hub answers 401 to anonymous requests, so as not to leak private names.
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    def _api(self, repo_id: str, rest: list[str], query: dict):
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            commit = self._commit(repo, unquote(rest[1]) if rest else "main")
            if commit is not None:
                self._json(_model_info(repo_id, repo, commit, _flag(query, "blobs")))
        elif rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo, unquote(rest[1]))
            if commit is not None:
                self._tree(repo.commits[commit], unquote("/".join(rest[2:])), commit, query)
        else:
            self._error(404, None, "Not Found")

    def _tree(self, files: dict[str, Blob], folder: str, commit: str, query: dict):
        prefix = folder + "/" if folder else ""
        if folder and not any(p.startswith(prefix) for p in files):
            self._error(404, "EntryNotFound", f"{folder} does not exist on this revision")
            return
        recursive = _flag(query, "recursive")
        entries, folders = [], set()
        for path, blob in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if recursive:
                folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            elif len(parts) > 1:
                folders.add(prefix + parts[0])
                continue
            entries.append(_tree_file(path, blob))
        for name in sorted(folders):
            entries.append(
                {"type": "directory", "oid": git_blob_sha1(name.encode()), "size": 0, "path": name}
            )
        if _flag(query, "expand"):
            for entry in entries:
                entry["lastCommit"] = {"id": commit, "title": "Upload", "date": "2024-08-01T00:00:00.000Z"}
        self._json(entries)

    def _resolve(self, repo_id: str, rev: str, path: str, body: bool):
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = self._commit(repo, rev)
        if commit is None:
            return
        if repo.gated and self._token() != GOOD_TOKEN:
            anonymous = self._token() is None
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it."
                if anonymous
                else f"Access to model {repo_id} is restricted and you are not in the authorized list."
            )
            self._error(401 if anonymous else 403, "GatedRepo", message)
            return
        blob = repo.commits[commit].get(path)
        if path in self.server_hub.fail:
            self._error(self.server_hub.fail[path], None, "Internal Error - We're working hard to fix this")
            return
        if path in self.server_hub.redirect:
            self._send(302, {"Location": self.server_hub.redirect[path], **_etag_headers(blob, commit)}, b"")
            return
        if blob is None:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
            return
        self._file(path, blob, commit, body)

    def _file(self, path: str, blob: Blob, commit: str, body: bool):
        hub = self.server_hub
        size = len(blob.data)
        start, end = _byte_range(self.headers.get("Range"), size)
        headers = {"ETag": f'"{blob.etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size)})
        if start >= size and size > 0:
            self._send(416, {**headers, "Content-Range": f"bytes */{size}"}, b"")
            return
        partial = self.headers.get("Range") is not None
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Content-Length"] = str(end - start)
        self.send_response(206 if partial else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        data = bytearray(blob.data)
        if path in hub.corrupt:
            data[size // 2] ^= 0xFF
        data = bytes(data[start:end])
        cut = hub.drop_after.pop(path, None)
        stall = hub.stall_after.pop(path, None)
        if cut is not None or stall is not None:
            self._write(path, data[: max(0, (cut if cut is not None else stall) - start)])
            if stall is not None:
                hub.release.wait(60)
            self.close_connection = True
            return
        self._write(path, data)

    def _write(self, path: str, data: bytes):
        hub = self.server_hub
        for i in range(0, len(data), 1 << 16):
            chunk = data[i : i + (1 << 16)]
            self.wfile.write(chunk)
            hub.served[path] = hub.served.get(path, 0) + len(chunk)
        self.wfile.flush()

    def _json(self, obj):
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _error(self, status: int, code: str | None, message: str, extra: dict | None = None):
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, headers, json.dumps({"error": message}).encode())

    def _send(self, status: int, headers: dict, data: bytes):
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


def _etag_headers(blob: Blob | None, commit: str) -> dict:
    # As the Hub's 302 to its CDN: the file's identity comes with the redirect.
    if blob is None:
        return {"X-Repo-Commit": commit}
    headers = {"ETag": f'"{blob.etag}"', "X-Repo-Commit": commit}
    if blob.lfs:
        headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
    return headers


def _flag(query: dict, key: str) -> bool:
    return query.get(key, "").lower() in ("1", "true")


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    # Only the forms the client sends: "bytes=N-" and "bytes=N-M".
    if not header or not header.startswith("bytes="):
        return 0, size
    first, _, last = header.removeprefix("bytes=").partition("-")
    return int(first), min(size, int(last) + 1) if last else size


def _model_info(repo_id: str, repo: Repo, commit: str, blobs: bool) -> dict:
    siblings = []
    for path, blob in repo.commits[commit].items():
        sibling = {"rfilename": path}
        if blobs:
            sibling.update({"size": len(blob.data), "blobId": blob.oid})
            if blob.lfs:
                sibling["lfs"] = {
                    "sha256": blob.sha256,
                    "size": len(blob.data),
                    "pointerSize": len(blob.pointer),
                }
        siblings.append(sibling)
    return {
        "_id": repo_id,
        "id": repo_id,
        "modelId": repo_id,
        "author": repo_id.split("/")[0],
        "sha": commit,
        "lastModified": "2024-08-01T00:00:00.000Z",
        "private": False,
        "disabled": False,
        "gated": "manual" if repo.gated else False,
        "library_name": "diffusers",
        "tags": ["diffusers", "text-to-image"],
        "siblings": siblings,
    }


def _tree_file(path: str, blob: Blob) -> dict:
    entry = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
    return entry
