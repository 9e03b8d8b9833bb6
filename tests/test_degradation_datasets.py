"""Training datasets: HR crops with on-the-fly degradation, paired folders, bad files, the pair pool."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffsr.data import HRImages, PairedImages, PairPool
from diffsr.errors import UsageError


pytestmark = pytest.mark.usefixtures("one_thread")


def _save(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def hr_tree(tmp_path):
    root = tmp_path / "hr"
    (root / "sub").mkdir(parents=True)
    _save(root / "a.png", 70, 90, 0)
    _save(root / "sub" / "b.png", 64, 64, 1)
    _save(root / "small.png", 30, 90, 2)
    (root / "broken.png").write_bytes(b"\x89PNG garbage")
    return root


def test_hr_crops_flips_and_skips(hr_tree):
    with pytest.warns(UserWarning, match="left out 1 item"):
        data = HRImages(hr_tree, crop=64)
    assert len(data) == 2 and data.too_small == 1 and len(data.unreadable) == 1
    item = data[0]
    assert item["hr"].shape == (3, 64, 64) and 0 <= item["hr"].min() and item["hr"].max() <= 1
    whole = torch.from_numpy(np.array(Image.open(hr_tree / "sub" / "b.png"))).permute(2, 0, 1).float() / 255
    crops = {tuple(data[1]["hr"][0, 0, :3].tolist()) for _ in range(12)}
    assert crops <= {tuple(whole[0, 0, :3].tolist()), tuple(whole.flip(-1)[0, 0, :3].tolist())} and len(crops) == 2


@pytest.mark.filterwarnings("ignore:HRImages. left out")
def test_file_lists_and_on_the_fly_degradation(hr_tree, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# training images\n{hr_tree / 'a.png'}\nhr/sub/b.png\n")
    data = HRImages(listing, crop=64, degradation="realesrgan_x4")
    batch = next(iter(DataLoader(data, batch_size=2, num_workers=0)))
    assert batch["hr"].shape == (2, 3, 64, 64) and batch["lr"].shape == (2, 3, 16, 16)


@pytest.mark.filterwarnings("ignore:HRImages. left out")
def test_a_file_that_breaks_mid_epoch_is_replaced_not_fatal(hr_tree):
    data = HRImages(hr_tree, crop=64)
    good = (hr_tree / "a.png").read_bytes()
    (hr_tree / "a.png").write_bytes(good[: len(good) // 3])  # truncated after the size check
    with pytest.warns(UserWarning, match="a.png"):
        items = [data[i] for i in range(len(data))]
    assert all(item["path"].endswith("b.png") for item in items)
    assert any("a.png" in line for line in data.unreadable)


@pytest.mark.filterwarnings("ignore:HRImages. left out")
def test_no_usable_image_is_a_usage_error(hr_tree):
    with pytest.raises(UsageError, match="no readable HR image"):
        HRImages(hr_tree, crop=512)


def test_paired_folders_match_by_name_and_crop_aligned(tmp_path):
    lr_dir, hr_dir = tmp_path / "lr", tmp_path / "hr"
    lr_dir.mkdir(), hr_dir.mkdir()
    for name, seed in (("scene1", 0), ("scene2", 1)):
        _save(hr_dir / f"{name}_x1.png", 96, 128, seed)
        small = Image.open(hr_dir / f"{name}_x1.png").resize((32, 24), Image.NEAREST)
        small.save(lr_dir / f"{name}_x4.png")
    _save(lr_dir / "orphan_x4.png", 24, 32, 5)
    data = PairedImages(lr_dir, hr_dir, scale=4, crop=64)
    assert len(data) == 2 and data.unmatched == [str(lr_dir / "orphan_x4.png")]
    item = data[0]
    assert item["lr"].shape == (3, 16, 16) and item["hr"].shape == (3, 64, 64)
    # NEAREST downscale by 4 picks pixel (4i + 2, 4j + 2), (4i + 2, 4j + 1) once both are flipped: the crops
    # and flips must line up exactly.
    for _ in range(6):
        item = data[1]
        assert torch.equal(item["hr"][:, 2::4, 2::4], item["lr"]) or torch.equal(item["hr"][:, 2::4, 1::4], item["lr"])


def test_paired_files_in_one_folder_with_patterns(tmp_path):
    folder = tmp_path / "Canon"
    folder.mkdir()
    _save(folder / "Canon_001_HR.png", 64, 64, 0)
    Image.open(folder / "Canon_001_HR.png").resize((16, 16)).save(folder / "Canon_001_LR4.png")
    data = PairedImages(folder, folder, scale=4, lr_pattern="*_LR4.png", hr_pattern="*_HR.png")
    assert len(data) == 1 and data[0]["lr"].shape == (3, 16, 16) and data[0]["hr"].shape == (3, 64, 64)


def test_pair_pool_mixes_batches():
    pool = PairPool(size=4, generator=torch.Generator().manual_seed(0))
    batches = [torch.full((2, 1, 1, 1), float(i)) for i in range(6)]
    out = [pool(b, b * 10)[0] for b in batches]
    assert torch.equal(out[0], batches[0]) and torch.equal(out[1], batches[1])  # filling: pass through
    later = torch.cat(out[2:]).flatten().tolist()
    assert set(later) <= {0.0, 1.0, 2.0, 3.0, 4.0} and len(set(later)) > 1
    lr, hr = pool(batches[0], batches[0] * 10)
    assert torch.equal(hr, lr * 10)  # pairs stay together
