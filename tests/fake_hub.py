"""A tiny Hugging Face Hub on loopback, for download tests.

It answers the two endpoints huggingface_hub's download path uses, the way
the hub does:
- `GET /api/models/{repo}[/revision/{rev}]` (model_info with
  `files_metadata`): the commit `sha` and `siblings` with size, git blob id
  and, for LFS files, `lfs.sha256`;
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` (git blob
  id, or the sha256 for LFS files, repeated in `X-Linked-Etag` with
  `X-Linked-Size`), `Content-Length`, and `Range` requests (206).
Unknown repos and revisions get 404 with the hub's `X-Error-Code`.

Knobs for tests: a send-rate throttle, a connection dropped once mid-file,
a file served with different bytes than the hash it publishes. Every request
is recorded so tests can count what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SEND_PIECE = 64 * 1024


@dataclass
class HubFile:
    name: str
    data: bytes | None = None   # small files, in memory
    path: Path | None = None    # large files, streamed from disk
    lfs: bool = False
    size: int = 0
    sha256: str = ""
    git_sha1: str = ""

    def __post_init__(self) -> None:
        if self.data is not None:
            self.size = len(self.data)
            self.sha256 = hashlib.sha256(self.data).hexdigest()
            blob = f"blob {self.size}\0".encode() + self.data
            self.git_sha1 = hashlib.sha1(blob).hexdigest()
        else:
            assert self.path is not None
            self.size = self.path.stat().st_size
            digest = hashlib.sha256()
            with self.path.open("rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            self.sha256 = digest.hexdigest()
            self.git_sha1 = hashlib.sha1(self.pointer().encode()).hexdigest()
            self.lfs = True

    def pointer(self) -> str:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {self.size}\n")

    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(start)
            return f.read(end - start)


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str = field(default_factory=lambda: hashlib.sha1(str(time.time_ns()).encode())
                        .hexdigest())


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self.bytes_per_sec: float | None = None
        self.drop_once: dict[str, int] = {}    # file name -> drop after this many bytes
        self.corrupt: set[str] = set()         # file names served with a flipped byte
        self.aborted: list[str] = []           # paths whose client hung up mid-body
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, files: list[HubFile]) -> HubRepo:
        repo = HubRepo(repo_id, {f.name: f for f in files})
        self.repos[repo_id] = repo
        return repo

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def gets(self, repo_id: str, filename: str) -> list[Request]:
        """The GET requests for one file of one repo."""
        prefix = f"/{repo_id}/resolve/"
        suffix = "/" + urllib.parse.quote(filename)
        with self._lock:
            return [r for r in self.requests if r.method == "GET"
                    and r.path.startswith(prefix) and r.path.endswith(suffix)]

    def touched(self, repo_id: str) -> list[Request]:
        """Every request about one repo (metadata and files)."""
        with self._lock:
            return [r for r in self.requests
                    if r.path.startswith((f"/{repo_id}/", f"/api/models/{repo_id}"))]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return  # keep test output clean

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                path = urllib.parse.urlsplit(self.path).path
                hub.record(Request(self.command, path, self.headers.get("Range")))
                if path.startswith("/api/models/"):
                    self._model_info(urllib.parse.unquote(path[len("/api/models/"):]))
                elif "/resolve/" in path:
                    repo_id, rest = path.lstrip("/").split("/resolve/", 1)
                    revision, _, name = rest.partition("/")
                    self._resolve(urllib.parse.unquote(repo_id), urllib.parse.unquote(revision),
                                  urllib.parse.unquote(name), head)
                else:
                    self._error(404, "NotFound", f"no route {path}")

            def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                    return None
                if revision not in ("main", repo.commit):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return None
                return repo

            def _model_info(self, rest: str) -> None:
                repo_id, _, revision = rest.partition("/revision/")
                repo = self._repo(repo_id, revision or "main")
                if repo is None:
                    return
                siblings = []
                for f in repo.files.values():
                    entry: dict[str, object] = {"rfilename": f.name, "size": f.size,
                                                "blobId": f.git_sha1}
                    if f.lfs:
                        entry["lfs"] = {"sha256": f.sha256, "size": f.size,
                                        "pointerSize": len(f.pointer())}
                    siblings.append(entry)
                body = json.dumps({"_id": repo_id, "id": repo_id, "modelId": repo_id,
                                   "sha": repo.commit, "private": False,
                                   "siblings": siblings}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
                repo = self._repo(repo_id, revision)
                if repo is None:
                    return
                f = repo.files.get(name)
                if f is None:
                    self._error(404, "EntryNotFound", f"{name} does not exist")
                    return
                start = 0
                wanted = self.headers.get("Range")
                if wanted and wanted.startswith("bytes=") and not head:
                    start = int(wanted[len("bytes="):].split("-")[0])
                status = 206 if start else 200
                self.send_response(status)
                self.send_header("X-Repo-Commit", repo.commit)
                self.send_header("ETag", f'"{f.etag()}"')
                if f.lfs:
                    self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                    self.send_header("X-Linked-Size", str(f.size))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(f.size - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
                self.end_headers()
                if not head:
                    self._send_body(f, start)

            def _send_body(self, f: HubFile, start: int) -> None:
                drop_at = hub.drop_once.pop(f.name, None)
                sent_since = time.monotonic()
                sent = 0
                pos = start
                while pos < f.size:
                    piece = f.read(pos, min(f.size, pos + SEND_PIECE))
                    if f.name in hub.corrupt and pos == start:
                        piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
                    if drop_at is not None and pos + len(piece) > drop_at:
                        piece = piece[: max(0, drop_at - pos)]
                        self.wfile.write(piece)
                        self.wfile.flush()
                        # Cut the connection mid-body, as a network failure would.
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    try:
                        self.wfile.write(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        with hub._lock:  # the client went away (a cancelled download)
                            hub.aborted.append(urllib.parse.urlsplit(self.path).path)
                        return
                    pos += len(piece)
                    sent += len(piece)
                    rate = hub.bytes_per_sec
                    if rate:
                        ahead = sent / rate - (time.monotonic() - sent_since)
                        if ahead > 0:
                            time.sleep(ahead)

        return Handler
