"""Getting an item's files: from the caches, or from its sources in order (the only network code in diffsr).

Hugging Face sources go through huggingface_hub (its cache, HF_HOME, HF_ENDPOINT mirrors, HF_HUB_OFFLINE).
Plain URLs go into $DIFFSR_HOME/weights/<item>/ with resume, a lock and a rename after the check: written by
hand because huggingface_hub only downloads from Hub repos and urllib has no resume.
"""

from __future__ import annotations

import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from diffsr.errors import WeightsError, first_line
from diffsr.weights.checks import CHUNK, check_file, diffsr_home, digest, expected, remember
from diffsr.weights.registry import FileSpec, Item, Source

ATTEMPTS = 5  # per file and source: a dropped connection resumes where it stopped
TIMEOUT_S = 60


class SourceFailed(Exception):
    """One source could not deliver a good copy (the caller tries the next)."""


def is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def item_dir(item: Item) -> Path:
    return diffsr_home() / "weights" / item.name


def fetch_command(item: Item) -> str:
    return f"diffsr weights fetch {item.name}"


# -- where a source's copy lives in the caches ---------------------------------------------------------
def cached_paths(item: Item, source: Source) -> list[Path] | None:
    """The local paths of all the item's files from `source`, or None if any is not in the cache."""
    paths = []
    for spec in item.files:
        if source.hf:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source.hf, spec.path, revision=source.revision)
            if not isinstance(found, str):
                return None
            path = Path(found)
        else:
            path = item_dir(item) / spec.path
        if not path.is_file():
            return None
        paths.append(path)
    return paths


def item_root(item: Item, paths: list[Path]) -> Path:
    """What a caller gets: the file of a one-file item, else the folder holding the item's layout."""
    if item.single_file:
        return paths[0]
    first, spec = paths[0], item.files[0]
    return Path(str(first)[: -len(spec.path)].rstrip("/\\"))


def find_cached(item: Item) -> tuple[Source, list[Path]] | None:
    for source in item.sources:
        paths = cached_paths(item, source)
        if paths is not None:
            return source, paths
    return None


def remove(path: Path) -> None:
    """Delete a cached file; for huggingface_hub's cache, the blob the snapshot entry points at too."""
    real = path.resolve()
    for victim in {path, real}:
        try:
            victim.unlink()
        except FileNotFoundError:
            pass


# -- fetching ------------------------------------------------------------------------------------------
def fetch_item(item: Item, offline: bool | None = None, progress: bool = True) -> Path:
    """The item's local path (file or folder), fetched and checked if it is not in the cache yet."""
    found = find_cached(item)
    if found is not None:
        _, paths = found
        problems = [(p, why) for p, spec in zip(paths, item.files)
                    if (why := check_file(p, spec, progress=progress)) is not None]
        if not problems:
            return item_root(item, paths)
        first, why = problems[0]
        if is_offline(offline):
            raise WeightsError(f"{first}: cached copy of '{item.name}' is corrupt ({why}); offline, so it is not "
                               f"used: on a connected machine run `{fetch_command(item)}`")
        if progress:
            print(f"diffsr: {first}: corrupt ({why}); fetching '{item.name}' again", file=sys.stderr)
        for path, _ in problems:  # a file that failed its check is never loaded
            remove(path)
    if is_offline(offline):
        raise WeightsError(f"'{item.name}' is not in the cache and downloads are off (offline): on a connected "
                           f"machine run `{fetch_command(item)}` and copy {diffsr_home()} and the Hugging Face "
                           f"cache (HF_HOME) here")
    failures = []
    for source in item.sources:
        try:
            return item_root(item, fetch_from(item, source, progress))
        except SourceFailed as error:
            failures.append(f"{source.describe()}: {error}")
    raise WeightsError(f"could not fetch '{item.name}' from any source: " + "; ".join(failures))


def fetch_from(item: Item, source: Source, progress: bool) -> list[Path]:
    if source.hf:
        return [_fetch_hf(source, spec, progress) for spec in item.files]
    if source.url:
        return [_fetch_url(source.url.replace("{file}", spec.path), item_dir(item) / spec.path, spec,
                           progress, f"{item.name}: {spec.path}") for spec in item.files]
    return _fetch_gdrive(item, source, progress)


def _fetch_hf(source: Source, spec: FileSpec, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from tqdm.auto import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    try:
        path = Path(hf_hub_download(source.hf, spec.path, revision=source.revision,
                                    tqdm_class=None if progress else QuietTqdm))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise SourceFailed(f"{spec.path}: {first_line(error)}") from None
    problem = check_file(path, spec, rehash=True, progress=progress)
    if problem is not None:
        remove(path)
        raise SourceFailed(f"{spec.path}: {problem} (download deleted)")
    return path


def download_url(url: str, target: Path, progress: bool = True) -> Path:
    """One plain file from `url` to `target` (resumed, locked, renamed when complete), for callers whose
    files are not registry items (the metric networks); one-line WeightsError on failure."""
    try:
        return _fetch_url(url, Path(target), FileSpec(path=Path(target).name), progress, Path(target).name)
    except SourceFailed as error:
        raise WeightsError(f"{url}: download failed: {error}") from None


def _fetch_url(url: str, target: Path, spec: FileSpec, progress: bool, label: str) -> Path:
    """Download `url` to `target`: into `target.part` (resumed with an HTTP Range request after a dropped
    connection), under a lock so two processes do not write one file, renamed once the hash matches."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file() and check_file(target, spec) is None:  # another process fetched it meanwhile
            return target
        part = target.with_name(target.name + ".part")
        done, failure = False, None
        for _ in range(ATTEMPTS):
            before = _size(part)
            try:
                done = _download(url, part, progress, label)
            except urllib.error.HTTPError as error:
                if error.code != 416 or not part.is_file():  # 416: nothing left to fetch, the part is whole
                    part.unlink(missing_ok=True)
                    raise SourceFailed(f"HTTP {error.code} {error.reason}") from None
                done = True
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                failure = error
            if done or _size(part) == before:  # resume only while the download advances
                break
        if not done:
            raise SourceFailed(f"{spec.path}: download stopped ({first_line(failure) if failure else 'incomplete'}); "
                               f"run again to resume")
        if spec.size is not None and part.stat().st_size != spec.size:
            size = part.stat().st_size
            part.unlink()
            raise SourceFailed(f"{spec.path}: size {size} bytes, expected {spec.size} (download deleted)")
        value = digest(part, spec, progress) if expected(spec) else None
        if value is not None and value != expected(spec):
            part.unlink()
            raise SourceFailed(f"{spec.path}: hash {value[:12]}..., expected {expected(spec)[:12]}... (download deleted)")
        part.replace(target)
        if value is not None:
            remember(target, value)
    return target


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _download(url: str, part: Path, progress: bool, label: str) -> bool:
    """Fetch the rest of `url` into `part`; True when the server sent all it announced."""
    from tqdm.auto import tqdm

    start = _size(part)
    headers = {"User-Agent": "diffsr", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
        if start and response.status != 206:  # the server ignored the range: start over
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if start else "wb") as out, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1000, desc=label,
                     disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            while chunk := response.read(CHUNK if total is None else min(CHUNK, 1 << 20)):
                out.write(chunk)
                bar.update(len(chunk))
    return total is None or part.stat().st_size >= total


def _fetch_gdrive(item: Item, source: Source, progress: bool) -> list[Path]:
    """Google Drive through gdown (an optional extra), into a scratch folder, then checked and moved."""
    try:
        import gdown
    except ImportError:
        raise SourceFailed('needs the optional gdown package (pip install "diffsr[gdrive]")') from None
    folder = item_dir(item)
    folder.mkdir(parents=True, exist_ok=True)
    folders = source.gdrive if isinstance(source.gdrive, dict) else {"": source.gdrive}
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        scratch = Path(scratch)
        try:
            for inside, drive_id in folders.items():
                out = scratch / inside
                if source.folder:
                    gdown.download_folder(id=drive_id, output=str(out), quiet=not progress)
                else:
                    out.mkdir(parents=True, exist_ok=True)
                    gdown.download(id=drive_id, output=str(out / item.files[0].path), quiet=not progress)
        except Exception as error:  # gdown raises many kinds (quota, permissions, HTML pages)
            raise SourceFailed(first_line(error)) from None
        paths = []
        for spec in item.files:
            top = Path(spec.path).parts[0]
            within = scratch / top if top in folders else scratch  # controlnet/ and vae/ both hold config.json
            matches = [scratch / spec.path] + sorted(within.rglob(Path(spec.path).name))
            found = next((m for m in matches if m.is_file()), None)
            if found is None:
                raise SourceFailed(f"{spec.path}: not in the downloaded folder")
            problem = check_file(found, spec, rehash=True, progress=progress)
            if problem is not None:
                raise SourceFailed(f"{spec.path}: {problem} (download deleted)")
            target = folder / spec.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(found), target)
            if expected(spec):
                remember(target, expected(spec))
            paths.append(target)
    return paths
