"""The RAM / DAPE tagger: parity with the authors' code on tiny release-format files, and its errors."""

from pathlib import Path

import pytest
import torch

from diffsr import taggers
from diffsr.errors import DiffsrError, ImageError, UsageError, WeightsError
from conftest import parity_fixture
from diffsr.testing import make_tiny_tagger, weights_digest

FIXTURE = Path(__file__).parent / "fixtures" / "taggers" / "ram_parity.pt"


@pytest.fixture(scope="module")
def tiny_tagger_files(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture(scope="module")
def parity(tiny_tagger_files):
    return parity_fixture("taggers/ram_parity.pt", *tiny_tagger_files)  # the one staleness guard


def test_tiny_files_are_those_the_fixture_was_made_from(tiny_tagger_files, parity):
    assert weights_digest(*tiny_tagger_files) == parity["digest"]


@pytest.mark.parametrize("name", ["ram", "dape"])
def test_logits_and_tags_equal_the_authors(tiny_tagger_files, parity, name):
    ram_file, dape_file = tiny_tagger_files
    tagger = taggers.load(name, ram_weights=ram_file, dape_weights=dape_file)
    logits = tagger.logits(parity["images"])  # a batch of 3; the authors' ran one image a call
    torch.testing.assert_close(logits, parity[f"{name}_logits"], atol=1e-4, rtol=0)
    assert tagger(parity["images"]) == parity[f"{name}_tags"]
    assert any(parity[f"{name}_tags"]), "the fixture must tag something"


def test_dape_changes_the_tags(parity):
    assert parity["ram_tags"] != parity["dape_tags"]


def test_images_of_any_size_are_tagged_and_empty_ones_refused(tiny_tagger_files):
    tagger = taggers.load("dape", ram_weights=tiny_tagger_files[0], dape_weights=tiny_tagger_files[1])
    assert len(tagger(torch.rand(2, 3, 1, 1))) == 2  # a 1 x 1 image is enlarged to 384 like any other
    for bad in (torch.rand(1, 3, 0, 5), torch.rand(3, 8, 8), torch.rand(1, 4, 8, 8)):
        with pytest.raises(ImageError):
            tagger(bad)


def test_missing_files_name_the_file_and_the_fetch_command(tmp_path, monkeypatch, tiny_tagger_files):
    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match=r"ram_swin_large_14m\.pth.*diffsr weights fetch ram-swin-large.*--tagger none"):
        taggers.load("ram")
    with pytest.raises(WeightsError, match=r"DAPE\.pth.*diffsr weights fetch dape"):
        taggers.load("dape", ram_weights=tiny_tagger_files[0])
    with pytest.raises(WeightsError, match="nothing.pth"):
        taggers.load("ram", ram_weights=tmp_path / "nothing.pth")


def test_files_beside_the_method_weights_are_found(tiny_tagger_files):
    tagger = taggers.load("dape", beside=tiny_tagger_files[0].parent / "osediff.pkl")
    assert len(tagger(torch.rand(1, 3, 8, 8))) == 1


def test_a_dape_file_for_another_ram_size_is_one_line(tmp_path, tiny_tagger_files):
    ram_file, dape_file = tiny_tagger_files
    other = make_tiny_tagger(tmp_path / "other")[1]
    state = torch.load(other)
    key = next(k for k in state if k.endswith("qkv.lora_A"))
    state[key] = torch.zeros(16, 24)  # as a DAPE trained on a wider Swin would hold
    torch.save(state, other)
    with pytest.raises(WeightsError, match="another RAM size") as error:
        taggers.load("dape", ram_weights=ram_file, dape_weights=other)
    assert "\n" not in str(error.value) and str(other) in str(error.value)
    torch.save({"something": torch.zeros(2)}, tmp_path / "notdape.pth")
    with pytest.raises(WeightsError, match="no DAPE LoRA"):
        taggers.load("dape", ram_weights=ram_file, dape_weights=tmp_path / "notdape.pth")
    with pytest.raises(WeightsError, match="not a RAM checkpoint"):
        taggers.load("ram", ram_weights=dape_file)


def test_unknown_tagger_name():
    with pytest.raises(UsageError, match="no tagger named"):
        taggers.load("blip")


def test_half_precision_tags_like_float32(tiny_tagger_files, parity):
    tagger = taggers.load("dape", dtype="bfloat16", ram_weights=tiny_tagger_files[0], dape_weights=tiny_tagger_files[1])
    logits = tagger.logits(parity["images"])
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), parity["dape_logits"], atol=0.1, rtol=0)


# -- OSEDiff with its default tagger, the CLI --------------------------------------------------------------------
def _lr():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_osediff_tags_with_dape_by_default(tiny_base, osediff_weights, osediff):
    import diffsr
    from diffsr.prompts import compose_prompt

    tagged = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights)
    dape = taggers.load("dape", beside=osediff_weights)
    assert dape(_lr())[0]  # the tiny tagger tags this image
    assert tagged.prompt_for(_lr(), "sharp") == compose_prompt("sharp", dape(_lr())[0]) == f"{dape(_lr())[0]}, sharp,"
    seen = []
    generator = torch.Generator().manual_seed(0)
    out = tagged.restore(_lr(), generator, prompt="sharp", on_prompt=seen.append)
    assert seen == [tagged.prompt_for(_lr(), "sharp")]  # the tagger ran on the whole image, once
    untagged = osediff.restore(_lr(), torch.Generator().manual_seed(0), prompt="sharp")
    assert (out - untagged).abs().max() > 1e-4
    plain = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, tagger="ram", tagger_device="cpu")
    assert plain.prompt_for(_lr(), "") == compose_prompt("", taggers.load("ram", beside=osediff_weights)(_lr())[0])


def test_osediff_names_a_missing_tagger_file(tmp_path, tiny_base, osediff_weights, monkeypatch):
    import shutil

    import diffsr

    monkeypatch.setenv("DIFFSR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    alone = shutil.copy(osediff_weights, tmp_path / "osediff.pkl")
    with pytest.raises(WeightsError, match=r"ram_swin_large_14m\.pth.*diffsr weights fetch ram-swin-large.*--tagger none"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=alone)
    shutil.copy(osediff_weights.parent / "ram_swin_large_14m.pth", tmp_path)
    with pytest.raises(WeightsError, match=r"DAPE\.pth.*diffsr weights fetch dape"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=alone)
    assert diffsr.load_upscaler("osediff", base=tiny_base, weights=alone, tagger="ram").tagger is not None
    assert diffsr.load_upscaler("osediff", base=tiny_base, weights=alone, tagger="none").tagger is None


def test_cli_shows_and_saves_the_prompts(tmp_path, tiny_base, osediff_weights, capsys):
    from PIL import Image

    from conftest import smooth_image
    from diffsr.cli import main

    Image.fromarray(smooth_image(12, 14)).save(tmp_path / "a.png")
    model = ["--method", "osediff", "--base", str(tiny_base), "--weights", str(osediff_weights), "--quiet"]
    out = tmp_path / "out"
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(out), "--prompt", "clean", "--show-prompt",
                 "--save-prompts"] + model) == 0
    saved = (out / "txt" / "a.txt").read_text()
    assert f"a.png: prompt: {saved}" in capsys.readouterr().out
    import diffsr
    from diffsr.images import as_picture

    upscaler = diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights)
    assert saved == upscaler.prompt_for(upscaler.preprocess(as_picture(tmp_path / "a.png"), 4).lr, "clean")
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "none"), "--tagger", "none",
                 "--prompt", "clean", "--show-prompt"] + model) == 0
    assert "a.png: prompt: clean\n" in capsys.readouterr().out
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "s"), "--method", "s3diff",
                 "--show-prompt", "--dape-weights", "x.pth"]) == 2
    assert capsys.readouterr().err == ("diffsr: error: --method s3diff does not take --dape-weights (a flag of osediff); "
                                       "--show-prompt/--save-prompts (a flag of osediff)\n")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "osediff.pkl").write_bytes(osediff_weights.read_bytes())
    files = ["--ram-weights", str(osediff_weights.parent / "ram_swin_large_14m.pth"),
             "--dape-weights", str(osediff_weights.parent / "DAPE.pth")]
    model[model.index("--weights") + 1] = str(alone / "osediff.pkl")
    assert main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "named"), "--prompt", "clean",
                 "--save-prompts"] + model + files) == 0
    assert (tmp_path / "named" / "txt" / "a.txt").read_text() == saved


def test_cli_tag_prints_the_tags(tmp_path, tiny_tagger_files, capsys):
    from PIL import Image

    from conftest import smooth_image
    from diffsr.cli import main
    from diffsr.images import as_picture

    Image.fromarray(smooth_image(30, 20)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_text("no")
    files = ["--ram-weights", str(tiny_tagger_files[0]), "--dape-weights", str(tiny_tagger_files[1])]
    assert main(["tag", str(tmp_path / "a.png"), str(tmp_path / "bad.png")] + files) == 1
    captured = capsys.readouterr()
    expected = taggers.load("dape", ram_weights=tiny_tagger_files[0], dape_weights=tiny_tagger_files[1])(
        as_picture(tmp_path / "a.png").to_tensor())[0]
    assert captured.out == f"{tmp_path / 'a.png'}: {expected}\n"
    assert "bad.png" in captured.err and captured.err.count("error:") == 1
    assert main(["tag", str(tmp_path / "a.png"), "--ram-weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["enlarge_x4", "odd_x4_prompt", "x2"])
def test_osediff_prompt_equals_the_release_script(osediff, osediff_weights, tiny_tagger_files, parity, name):
    """test_osediff.py's prompt (their DAPE on their preprocessed input, then f"{tags}, {prompt},") for OSEDiff's
    parity cases; given the prompt, tests/test_osediff_parity.py shows the outputs equal theirs."""
    import json

    from diffsr.images import Picture
    from diffsr.methods.osediff import OSEDiff

    expected = json.loads((FIXTURE.parent / "osediff_tagged_prompts.json").read_text())[name]
    case = torch.load(FIXTURE.parent.parent / "osediff" / "osediff_parity.pt")["cases"][name]
    assert weights_digest(osediff_weights.parent / "ram_swin_large_14m.pth", osediff_weights.parent / "DAPE.pth") == \
        parity["digest"]
    method = OSEDiff(osediff.backbone, tagger=taggers.load("dape", beside=osediff_weights),
                     process_size=case["process_size"])
    lr = method.preprocess(Picture(case["lr"].numpy()), case["upscale"]).lr
    assert torch.equal(lr[0], case["lq"])
    assert method.prompt_for(lr, case["prompt"]) == expected


def test_a_ram_file_whose_windows_do_not_tile_384_px_is_one_line(tmp_path):
    ram_file, _ = make_tiny_tagger(tmp_path)
    checkpoint = torch.load(ram_file)
    for key in [k for k in checkpoint["model"] if k.startswith("visual_encoder.layers.0.") and k.endswith("bias_table")]:
        checkpoint["model"][key] = torch.zeros(13 ** 2, 1)  # 7 px windows (a 224 px Swin)
    torch.save(checkpoint, ram_file)
    with pytest.raises(WeightsError, match="7 px windows, which do not tile its 96 px grid"):
        taggers.load("ram", ram_weights=ram_file)


@pytest.mark.parametrize("which", ["ram_swin_large_14m.pth", "DAPE.pth"])
def test_a_pickled_payload_in_a_tagger_file_never_runs(tmp_path, tiny_tagger_files, which):
    from test_weights_safety import poison

    marker = tmp_path / "ran"
    for source in tiny_tagger_files:
        (tmp_path / source.name).write_bytes(source.read_bytes())
    poison(tmp_path / which, marker)
    with pytest.raises(WeightsError, match=which.replace(".", r"\.")):
        taggers.load("dape", beside=tmp_path / "osediff.pkl")
    assert not marker.exists()


def test_the_registry_fetches_the_tagger_files_with_osediff_unless_unused(tmp_path, tiny_base, osediff_weights):
    import shutil

    import diffsr
    from diffsr import weights
    from diffsr.methods.osediff import OSEDiff

    assert {"ram-swin-large", "dape"} <= set(weights.needed_by("osediff"))
    assert weights.Registry.load().get("osediff-face").extras == {"ram_weights": "ram-swin-large",
                                                                   "dape_weights": "dape"}
    assert OSEDiff.unused_extras({}) == frozenset()
    assert OSEDiff.unused_extras({"tagger": "ram"}) == {"dape_weights"}
    for off in (None, "none", lambda images: ["x"]):
        assert OSEDiff.unused_extras({"tagger": off}) == {"ram_weights", "dape_weights"}
    files = tmp_path / "elsewhere"
    files.mkdir()
    for name in ("ram_swin_large_14m.pth", "DAPE.pth"):
        shutil.copy(osediff_weights.parent / name, files / f"my_{name}")
    alone = shutil.copy(osediff_weights, tmp_path / "osediff.pkl")
    up = diffsr.load_upscaler("osediff", base=tiny_base, weights=alone, ram_weights=files / "my_ram_swin_large_14m.pth",
                              dape_weights=files / "my_DAPE.pth")
    assert up.prompt_for(_lr(), "") == f"{taggers.load('dape', beside=osediff_weights)(_lr())[0]}, ,"
