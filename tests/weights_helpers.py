"""Servers on 127.0.0.1 for the weights registry tests: a plain file server (HTTP Range, a connection that
drops mid-file, slow sending) that also answers the few routes huggingface_hub's hf_hub_download uses
(HEAD/GET /{repo}/resolve/{revision}/{file} with X-Repo-Commit, ETag and Content-Length)."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FileServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # URL path -> content
        self.drop_after: dict[str, int] = {}  # URL path -> bytes sent before the first response is cut
        self.delay_s = 0.0  # per 16 kB chunk (to make two clients overlap)
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def answer(self, body: bool):
                path = self.path.split("?")[0]
                if path.startswith("/api/models/"):
                    return self.api(path[len("/api/models/"):])
                wanted = self.headers.get("Range")
                with server.lock:
                    server.requests.append((self.command, path, wanted))
                    drop = server.drop_after.pop(path, None) if body else None
                data = server.files.get(path.replace(f"/resolve/{COMMIT}/", "/resolve/main/"))  # main's commit
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(wanted.split("=")[1].split("-")[0]) if wanted else 0
                if start >= len(data) and wanted:
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if wanted else 200)
                if wanted:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if not body:
                    return
                rest = data[start:] if drop is None else data[start:drop]
                for offset in range(0, len(rest), 16384):
                    self.wfile.write(rest[offset:offset + 16384])
                    if server.delay_s:
                        time.sleep(server.delay_s)
                self.wfile.flush()
                if drop is not None:  # cut the connection mid-file
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def api(self, rest: str):
                """repo_info (.../revision/R) and list_repo_tree (.../tree/R), what snapshot_download asks."""
                for marker in ("/revision/", "/tree/"):
                    if marker in rest:
                        repo = rest.split(marker)[0]
                        break
                else:
                    repo = rest
                prefix = f"/{repo}/resolve/main/"
                files = [{"type": "file", "path": p[len(prefix):], "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                         for p, d in server.files.items() if p.startswith(prefix)]
                with server.lock:
                    server.requests.append((self.command, self.path, None))
                data = json.dumps(files if "/tree/" in rest else {"id": repo, "sha": COMMIT, "siblings": [
                    {"rfilename": f["path"]} for f in files]}).encode() if files else b""
                self.send_response(200 if files else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "FileServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the GET requests for `path`."""
        return [wanted for method, p, wanted in self.requests if method == "GET" and p == path]

    def add_hf_file(self, repo: str, file: str, data: bytes, revision: str = "main") -> None:
        self.files[f"/{repo}/resolve/{revision}/{file}"] = data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_registry(path: Path, items: dict) -> Path:
    path.write_text(yaml.safe_dump({"items": items}, sort_keys=False))
    return path


def folder_files(folder: Path) -> list[dict]:
    """Registry file entries (path, size, sha256) for every file in a folder."""
    return [{"path": f.relative_to(folder).as_posix(), "size": f.stat().st_size, "sha256": sha256(f.read_bytes())}
            for f in sorted(folder.rglob("*")) if f.is_file()]


def fill_hf_cache(hub: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """Put files into huggingface_hub's cache layout (blobs + snapshot links + refs), as a download would."""
    root = hub / f"models--{repo.replace('/', '--')}"
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else COMMIT  # a pinned revision is its own name
    snapshot = root / "snapshots" / commit
    for name, data in files.items():
        blob = root / "blobs" / sha256(data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / blob.name)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot
