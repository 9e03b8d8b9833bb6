"""Hostile and unlucky inputs (issue 16, items 5-12): one line per bad file, the other images still written,
every-file problems found before the model loads, no original ever overwritten, no link ever written through.

The CLI tests swap `diffsr.load_upscaler` for a tiny OSEDiff (loaded once per module), so they cost one
tiny upscale per good image; the swap also counts loads, to show what is refused before loading.
"""

import errno
import os
import struct
import tempfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import diffsr
from diffsr.cli import main
from diffsr.errors import DiffsrError, ImageError, UsageError
from diffsr.images import read_image, write_image
from conftest import smooth_image

pytestmark = pytest.mark.usefixtures("one_thread")


def declared_png(path, width, height, bit_depth=8, colour_type=2):
    """A small PNG whose header declares width x height (its pixel data is a few bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def osediff(tiny_base, osediff_weights):
    """The tiny OSEDiff working at 64 px (the release's 512 would make every small image a 512 px run)."""
    return diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, process_size=64)


@pytest.fixture
def loads(monkeypatch, osediff):
    """Model loads made by the CLI (each returns the tiny OSEDiff)."""
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        return osediff

    monkeypatch.setattr(diffsr, "load_upscaler", load)
    return calls


def upscale(*args) -> int:
    return main(["upscale", *map(str, args), "--quiet", "--scale", "2"])


def written_name(fp) -> str:
    """The file name PIL is saving to: a path, or an open file (named through /proc where it has no name)."""
    name = getattr(fp, "name", fp)
    if isinstance(name, int):
        name = os.readlink(f"/proc/self/fd/{name}")
    return os.path.basename(str(name))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("diffsr: error:")]


def good_image(path, seed=0, size=(10, 12)):
    Image.fromarray(smooth_image(*size, seed=seed)).save(path)
    return path


def read_only(folder, monkeypatch):
    """Make `folder` read-only. chmod stops other users; root ignores it, so as root file creation inside
    the folder fails as a read-only mount would make it fail (EROFS) - diffsr creates every file through
    tempfile.mkstemp."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.realpath(dir) == os.path.realpath(folder):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# -- 5: one file never aborts a batch; every-file problems are found before loading ----------------------
def test_decompression_bomb_is_one_line_and_the_batch_goes_on(tmp_path, loads, capsys):
    good_image(tmp_path / "a.png")
    declared_png(tmp_path / "bomb.png", 60000, 60000)
    code = upscale(tmp_path / "a.png", tmp_path / "bomb.png", "-o", tmp_path / "out")
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and (tmp_path / "out" / "a.png").exists()
    assert len(errors) == 1 and "bomb.png" in errors[0] and "megapixels" in errors[0]


def test_output_that_is_a_file_or_read_only_is_refused_before_loading(tmp_path, loads, capsys, monkeypatch):
    good_image(tmp_path / "a.png")
    (tmp_path / "taken").write_text("a file")
    assert upscale(tmp_path / "a.png", "-o", tmp_path / "taken") == 2
    assert error_lines(capsys.readouterr().err) == [f"diffsr: error: {tmp_path / 'taken'}: exists and is not a folder"]
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    read_only(frozen, monkeypatch)
    assert upscale(tmp_path / "a.png", "-o", frozen) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(frozen) in errors[0] and "cannot write" in errors[0]
    assert loads == [] and list(frozen.iterdir()) == []


def test_disk_full_and_too_long_names_fail_alone_and_leave_no_temporary(tmp_path, loads, capsys, monkeypatch):
    good_image(tmp_path / "a.png")
    good_image(tmp_path / "full.png", seed=1)
    long_name = "x" * 251 + ".tif"  # 255 characters: its .webp output name has 256
    good_image(tmp_path / long_name, seed=2)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "full" in written_name(fp):
            if hasattr(fp, "write"):
                fp.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code = upscale(tmp_path / "a.png", tmp_path / "full.png", tmp_path / long_name, "-o", out, "--format", "webp")
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and sorted(p.name for p in out.iterdir()) == ["a.webp"]  # no temporaries left
    assert len(errors) == 2
    assert "full.webp" in errors[0] and "No space left" in errors[0]
    assert "x" * 251 in errors[1] and "name too long" in errors[1].lower()


def test_degrade_on_a_full_disk_reports_pairs_and_leaves_no_partial(tmp_path, capsys, monkeypatch):
    hr = tmp_path / "hr"
    hr.mkdir()
    good_image(hr / "a.png", size=(64, 64))

    def full(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):
            fp.write(b"")
        else:
            open(fp, "wb").close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    out = tmp_path / "set"
    code = main(["degrade", str(hr), "-o", str(out), "--crop", "32", "--count", "2", "--quiet"])
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and len(errors) == 2 and all("No space left" in line for line in errors)
    leftovers = [p.name for p in out.rglob("*") if p.is_file() and p.name != "pairs.json"]
    assert leftovers == []


def test_degrade_refuses_an_unusable_output_before_working(tmp_path, capsys, monkeypatch):
    hr = tmp_path / "hr"
    hr.mkdir()
    good_image(hr / "a.png", size=(64, 64))
    (tmp_path / "taken").write_text("a file")
    assert main(["degrade", str(hr), "-o", str(tmp_path / "taken"), "--crop", "32", "--count", "1", "--quiet"]) == 2
    assert error_lines(capsys.readouterr().err) == [f"diffsr: error: {tmp_path / 'taken'}: exists and is not a folder"]
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    read_only(frozen, monkeypatch)
    assert main(["degrade", str(hr), "-o", str(frozen), "--crop", "32", "--count", "1", "--quiet"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "cannot write" in errors[0]


# -- 6: pixel limits, from the header, before decoding ---------------------------------------------------
def test_input_pixel_limit_is_checked_from_the_header(tmp_path, loads, capsys):
    Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")  # 18 KB on disk, 144 megapixels
    good_image(tmp_path / "a.png")
    code = upscale(tmp_path / "huge.png", tmp_path / "a.png", "-o", tmp_path / "out")
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and (tmp_path / "out" / "a.png").exists()
    assert errors == [f"diffsr: error: {tmp_path / 'huge.png'}: 12000x12000 is 144.0 megapixels, over the input "
                      "limit of 64 megapixels (raise it with --max-input-megapixels or max_input_pixels)"]
    with pytest.raises(ImageError, match="over the input limit of 1 megapixels"):
        read_image(declared_png(tmp_path / "h.png", 1001, 1000), max_pixels=10**6)


def test_output_pixel_limit_is_checked_before_decoding_and_can_be_raised(tmp_path, loads, capsys, osediff):
    declared_png(tmp_path / "wide.png", 8000, 5000)  # 40 MP is under the input limit; x2 is 160 MP
    code = upscale(tmp_path / "wide.png", "-o", tmp_path / "out", "--max-output-megapixels", "100")
    errors = error_lines(capsys.readouterr().err)
    assert code == 1 and errors == [f"diffsr: error: {tmp_path / 'wide.png'}: its 16000x10000 output is 160.0 "
                                    "megapixels, over the output limit of 100 megapixels (raise it with "
                                    "--max-output-megapixels or max_output_pixels)"]
    image = smooth_image(20, 20)
    with pytest.raises(ImageError, match="over the output limit"):
        osediff.upscale(image, scale=4, max_output_pixels=1000)
    assert osediff.upscale(image, scale=2, max_output_pixels=1600).size == (40, 40)


# -- 7: an input file is never overwritten ---------------------------------------------------------------
def test_output_into_the_input_folder_never_replaces_an_original(tmp_path, loads, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    good_image(folder / "a.png")
    good_image(folder / "b.jpg", seed=1)
    original = (folder / "a.png").read_bytes()
    code = upscale(folder, "-o", folder, "--overwrite", "--format", "png")
    errors = error_lines(capsys.readouterr().err)
    assert (folder / "a.png").read_bytes() == original
    assert code == 1 and len(errors) == 1 and "a.png" in errors[0] and "input" in errors[0]
    assert Image.open(folder / "b.png").size == (24, 20)


# -- 8: temporaries are created exclusively; a planted link is never written through ---------------------
def test_a_planted_link_at_the_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".a.png.partial.png").symlink_to(victim)  # the name today's writer uses
    write_image(out / "a.png", smooth_image(8, 8))
    assert victim.read_text() == "precious"
    assert read_image(out / "a.png").size == (8, 8)
    (out / "b.png").symlink_to(victim)  # a link at the output name is replaced, not written through
    write_image(out / "b.png", smooth_image(8, 8))
    assert victim.read_text() == "precious" and not (out / "b.png").is_symlink()
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask  # as a plainly created file, not 0600
    assert sorted(p.name for p in out.iterdir()) == [".a.png.partial.png", "a.png", "b.png"]


# -- 9: evaluate names ambiguity, skips temporaries, names a missing --gt, checks -o first -----------------
def test_evaluate_ambiguous_ground_truth_hidden_files_and_missing_gt(tmp_path, capsys, monkeypatch):
    from diffsr.metrics.evaluate import evaluate

    sr, gt = tmp_path / "sr", tmp_path / "gt"
    sr.mkdir()
    gt.mkdir()
    for name in ("a.png", "b.png"):
        good_image(sr / name)
        good_image(gt / name)
    good_image(gt / "a.webp", seed=5)
    good_image(sr / ".b.png.partial.png")
    good_image(sr / ".hidden.png")
    declared_png(sr / "c.png", 60000, 60000)  # a decompression bomb: one problem line, the others scored
    good_image(gt / "c.png")
    result = evaluate(sr, gt, "psnr")
    assert set(result.per_image) == {"b.png"}
    assert any("c.png" in p and "megapixels" in p for p in result.problems)
    assert any("a.png" in p and "a.webp" in p and "ambiguous" in p for p in result.problems)
    assert not any("partial" in p or "hidden" in p for p in result.problems)
    with pytest.raises(UsageError, match="no-gt: no such ground-truth folder"):
        evaluate(sr, tmp_path / "no-gt", "psnr")

    import importlib

    evaluation = importlib.import_module("diffsr.metrics.evaluate")  # (diffsr.metrics.evaluate is also a function)
    def never(*args, **kwargs):
        raise AssertionError("computed before checking -o")

    monkeypatch.setattr(evaluation, "evaluate", never)
    (tmp_path / "taken").write_text("a file")
    code = main(["evaluate", str(sr), "--gt", str(gt), "--metrics", "psnr", "-o", str(tmp_path / "taken" / "t.md")])
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and "taken" in errors[0]


# -- 10: output names keep the input's type; a clash is reported on every run ----------------------------
def test_jpeg_and_tiff_keep_their_type_and_a_clash_is_reported_every_run(tmp_path, loads, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    good_image(folder / "p.jpeg")
    good_image(folder / "q.tiff", seed=1)
    good_image(folder / "c.png", seed=2)
    good_image(folder / "c.jpg", seed=3)
    out = tmp_path / "out"
    for run in range(2):
        code = upscale(folder, "-o", out, "--format", "png") if run else upscale(folder, "-o", out)
        errors = error_lines(capsys.readouterr().err)
        if not run:
            assert sorted(p.name for p in out.iterdir()) == ["c.jpg", "c.png", "p.jpeg", "q.tiff"], errors
            assert code == 0
        else:  # c.jpg and c.png both ask for c.png: c.jpg (first) was written on the first run, c.png never
            assert code == 1 and len(errors) == 1 and "c.jpg" in errors[0] and "c.png" in errors[0]
    code = upscale(folder, "-o", out, "--format", "png")
    assert code == 1 and len(error_lines(capsys.readouterr().err)) == 1


# -- 11: photographs: orientation honoured, ICC and EXIF kept, animation named ---------------------------
def test_exif_orientation_icc_and_exif_survive_and_animation_is_named(tmp_path, loads, capsys):
    icc = b"\0" * 128 + b"fake-but-carried-profile"
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise (a portrait phone photo)
    exif[0x010F] = "PhoneMaker"
    Image.fromarray(smooth_image(10, 16)).save(tmp_path / "photo.jpg", exif=exif.tobytes(), icc_profile=icc)
    frames = [Image.fromarray(smooth_image(8, 8, seed=s)) for s in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert read_image(tmp_path / "photo.jpg").size == (10, 16)
    out = tmp_path / "out"
    code = upscale(tmp_path / "photo.jpg", tmp_path / "anim.gif", "-o", out, "--format", "png")
    err = capsys.readouterr().err
    assert code == 0
    with Image.open(out / "photo.png") as result:
        assert result.size == (20, 32)  # portrait, as the photo is shown
        assert result.info.get("icc_profile") == icc
        kept = result.getexif()
        assert kept.get(0x010F) == "PhoneMaker" and kept.get(0x0112, 1) == 1
    assert "anim.gif" in err and "3 frames" in err and "first frame" in err


# -- 12: every bad API argument is a DiffsrError with one line, found at the boundary -----------------------
@pytest.mark.parametrize("scale", ["4", None, float("nan"), True])
def test_bad_scale_types(osediff, scale):
    from diffsr.errors import ArgumentTypeError

    with pytest.raises((ArgumentTypeError, UsageError), match="scale"):
        osediff(smooth_image(8, 8), scale=scale)


@pytest.mark.parametrize("seed", ["0", 1.5, None])
def test_bad_seed_types(osediff, seed):
    from diffsr.errors import ArgumentTypeError

    with pytest.raises(ArgumentTypeError, match="seed"):
        osediff(smooth_image(8, 8), scale=2, seed=seed)


def test_bad_arrays_and_options_are_diffsr_errors(osediff, tiny_base, osediff_weights):
    from diffsr.errors import ArgumentTypeError

    assert issubclass(UsageError, ValueError) and issubclass(ArgumentTypeError, TypeError)
    with pytest.raises(ImageError, match="empty"):
        osediff(np.zeros((0, 0, 3), np.uint8), scale=2)
    with pytest.raises(ImageError, match="NaN"):
        osediff(np.full((8, 8, 3), np.nan, np.float32), scale=2)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        osediff(smooth_image(8, 8).astype(np.float32), scale=2)  # 0..255 floats: would come out white
    with pytest.raises(ImageError, match="NaN"):
        osediff(torch.full((3, 8, 8), float("nan")), scale=2)
    with pytest.raises(ArgumentTypeError, match="image"):
        osediff(12, scale=2)
    with pytest.raises(UsageError, match="process_size"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, process_size=-8)
    with pytest.raises(ArgumentTypeError, match="method"):
        diffsr.load_upscaler(None, base=tiny_base, weights=osediff_weights)
    with pytest.raises(UsageError, match="device"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, device="gpu")
    with pytest.raises(UsageError, match="dtype"):
        diffsr.load_upscaler("osediff", base=tiny_base, weights=osediff_weights, dtype="float8")


# -- the closing case: one folder with every bad file above and good ones ---------------------------
def test_one_folder_with_every_bad_file_writes_every_good_one(tmp_path, loads, capsys, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = ["good.png", "photo.jpeg", "scan.tiff", "anim.gif"]
    good_image(folder / "good.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(smooth_image(10, 16, seed=1)).save(folder / "photo.jpeg", exif=exif.tobytes())
    good_image(folder / "scan.tiff", seed=2)
    frames = [Image.fromarray(smooth_image(8, 8, seed=s)) for s in range(2)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    bad = {"bomb.png": "megapixels", "huge.png": "input limit", "wide.png": "output limit",
           "full.png": "No space left", "x" * 251 + ".png": "name too long", "c.png": "c.jpg",
           "broken.png": "not an image", "empty.png": "not an image"}
    declared_png(folder / "bomb.png", 60000, 60000)
    Image.new("1", (12000, 12000)).save(folder / "huge.png")
    declared_png(folder / "wide.png", 8000, 5000)
    good_image(folder / "full.png", seed=3)
    good_image(folder / ("x" * 251 + ".png"), seed=4)
    good_image(folder / "c.png", seed=5)
    good_image(folder / "c.jpg", seed=6)  # --format webp: both ask for c.webp; the first (c.jpg) is written
    good.append("c.jpg")
    (folder / "broken.png").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "full" in written_name(fp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code = upscale(folder, "-o", out, "--format", "webp", "--max-output-megapixels", "100")
    err = capsys.readouterr().err
    errors = error_lines(err)
    warnings = [line for line in err.splitlines() if line.startswith("diffsr: warning:")]
    assert len(warnings) == 1 and "anim.gif" in warnings[0]  # and no Pillow warning on the refused huge.png
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(name.rsplit(".", 1)[0] + ".webp" for name in good), errors
    assert len(errors) == len(bad), errors
    for name, why in bad.items():
        assert sum(name in line and why in line for line in errors) == 1, (name, errors)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_in_8_and_16_bit(tmp_path, orientation):
    import cv2
    from PIL import ImageOps

    rgb = smooth_image(6, 9)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "a.png", exif=exif.tobytes())
    with Image.open(tmp_path / "a.png") as image:
        upright = np.asarray(ImageOps.exif_transpose(image))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png").rgb, upright)
    # The same orientation in a 16-bit PNG (read through OpenCV): an eXIf chunk after the header.
    deep = rgb.astype(np.uint16) * 257
    png = cv2.imencode(".png", np.ascontiguousarray(deep[:, :, ::-1]))[1].tobytes()
    body = exif.tobytes()[6:]  # without the "Exif\0\0" mark, as PNG stores it
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    (tmp_path / "d.png").write_bytes(png[:33] + chunk + png[33:])  # 8-byte signature + 25-byte IHDR chunk
    picture = read_image(tmp_path / "d.png")
    assert picture.rgb.dtype == np.uint16
    np.testing.assert_array_equal(picture.rgb, upright.astype(np.uint16) * 257)
