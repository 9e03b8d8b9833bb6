"""The RAM / DAPE tagger: parity with the authors' code on tiny release-format files, and its errors."""

from pathlib import Path

import pytest
import torch

from diffsr import taggers
from diffsr.errors import DiffsrError, ImageError, UsageError, WeightsError
from diffsr.testing import make_tiny_tagger, weights_digest

FIXTURE = Path(__file__).parent / "fixtures" / "taggers" / "ram_parity.pt"


@pytest.fixture(scope="module")
def tiny_tagger_files(tmp_path_factory):
    return make_tiny_tagger(tmp_path_factory.mktemp("tagger"))


@pytest.fixture(scope="module")
def parity():
    return torch.load(FIXTURE)


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
