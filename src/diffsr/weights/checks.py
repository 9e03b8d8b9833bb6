"""File checks against the registry: sha256, or the git blob id where that is all that is published.

Hashing a multi-GB file takes a while, so a file's digest is remembered in $DIFFSR_HOME/checks, keyed by
the file's real path, size and modification time (kept there, not beside the file, because Hugging Face
files live in huggingface_hub's cache, which is not ours to write into). `verify` re-hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from diffsr.weights.registry import FileSpec

CHUNK = 8 << 20


def diffsr_home() -> Path:
    return Path(os.environ.get("DIFFSR_HOME") or Path.home() / ".cache" / "diffsr").expanduser()


def digest(path: Path, spec: FileSpec, progress: bool = False) -> str:
    """The file's digest in the kind `spec` publishes: sha256 (default) or the git blob sha1, which hashes
    the header b"blob <size>\0" followed by the bytes. `progress`: a bar (hashing GBs takes a while)."""
    import sys

    from tqdm.auto import tqdm

    size = path.stat().st_size
    if spec.git_sha1 and not spec.sha256:
        hasher = hashlib.sha1(b"blob %d\0" % size)
    else:
        hasher = hashlib.sha256()
    with open(path, "rb") as stream, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1000,
                                          desc=f"checking {spec.path}", disable=not progress, file=sys.stderr,
                                          leave=False) as bar:
        while chunk := stream.read(CHUNK):
            hasher.update(chunk)
            bar.update(len(chunk))
    return hasher.hexdigest()


def expected(spec: FileSpec) -> str | None:
    return spec.sha256 or spec.git_sha1


def _memo_file(path: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return diffsr_home() / "checks" / f"{key}.json"


def remembered(path: Path) -> str | None:
    """The digest remembered for this file, if its size and modification time are unchanged since."""
    memo = _memo_file(path)
    try:
        data = json.loads(memo.read_text())
        stat = path.resolve().stat()
    except (OSError, ValueError):
        return None
    unchanged = (data.get("path"), data.get("size"), data.get("mtime_ns")) == (str(path.resolve()), stat.st_size,
                                                                            stat.st_mtime_ns)
    return data.get("digest") if unchanged else None


def remember(path: Path, value: str) -> None:
    memo = _memo_file(path)
    stat = path.resolve().stat()
    memo.parent.mkdir(parents=True, exist_ok=True)
    temporary = memo.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"path": str(path.resolve()), "size": stat.st_size,
                                     "mtime_ns": stat.st_mtime_ns, "digest": value}))
    temporary.replace(memo)


def check_file(path: Path, spec: FileSpec, rehash: bool = False, progress: bool = False) -> str | None:
    """None when the file matches what the registry publishes, else what is wrong (one phrase).
    Files without a published hash are checked by size where that is known."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"size {size} bytes, expected {spec.size}"
    want = expected(spec)
    if want is None:
        return None
    value = None if rehash else remembered(path)
    if value is None:
        value = digest(path, spec, progress)
        remember(path, value)
    if value != want:
        kind = "git blob id" if spec.git_sha1 and not spec.sha256 else "sha256"
        return f"{kind} {value[:12]}..., expected {want[:12]}..."
    return None
