import numpy as np
import pytest
from PIL import Image

from diffsr.errors import ImageError
from diffsr.images import as_picture, collect_inputs, read_image, resize, write_image
from conftest import smooth_image


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".bmp", ".tif"])
def test_reads_every_supported_format(tmp_path, suffix):
    rgb = smooth_image(20, 30)
    path = tmp_path / f"a{suffix}"
    Image.fromarray(rgb).save(path)
    picture = read_image(path)
    assert picture.rgb.shape == (20, 30, 3) and picture.rgb.dtype == np.uint8
    assert picture.alpha is None
    if suffix in (".png", ".bmp", ".tif"):
        np.testing.assert_array_equal(picture.rgb, rgb)
    else:  # lossy formats come back close
        assert np.abs(picture.rgb.astype(int) - rgb).mean() < 12


def test_grayscale_palette_and_rgba_are_converted(tmp_path):
    gray = smooth_image(10, 12, channels=1)[:, :, 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    picture = read_image(tmp_path / "g.png")
    assert picture.rgb.shape == (10, 12, 3)
    np.testing.assert_array_equal(picture.rgb[:, :, 1], gray)

    rgba = np.dstack([smooth_image(10, 12), np.linspace(0, 255, 120).reshape(10, 12).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    picture = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(picture.rgb, rgba[:, :, :3])
    np.testing.assert_array_equal(picture.alpha, rgba[:, :, 3])

    Image.fromarray(smooth_image(10, 12)).convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").rgb.shape == (10, 12, 3)


def test_16_bit_colour_and_gray_keep_their_depth(tmp_path):
    import cv2

    deep = (np.random.RandomState(0).rand(8, 9, 3) * 65535).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "c16.png"), deep[:, :, ::-1])
    picture = read_image(tmp_path / "c16.png")
    assert picture.rgb.dtype == np.uint16
    np.testing.assert_array_equal(picture.rgb, deep)

    cv2.imwrite(str(tmp_path / "g16.png"), deep[:, :, 0])
    picture = read_image(tmp_path / "g16.png")
    assert picture.rgb.dtype == np.uint16 and picture.rgb.shape == (8, 9, 3)
    np.testing.assert_array_equal(picture.rgb[:, :, 2], deep[:, :, 0])

    write_image(tmp_path / "out.png", picture.rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "out.png").rgb, picture.rgb)


def test_bad_files_give_one_clear_line(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        read_image(tmp_path / "notes.png")
    Image.fromarray(smooth_image(64, 64)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: truncated"):
        read_image(tmp_path / "cut.png")
    Image.fromarray(smooth_image(64, 64)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg: truncated"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        read_image(tmp_path)
    for error in (ImageError,):
        assert "\n" not in str(error("x"))


def test_as_picture_accepts_arrays_tensors_and_pil():
    import torch

    rgb = smooth_image(6, 7)
    np.testing.assert_array_equal(as_picture(rgb).rgb, rgb)
    np.testing.assert_array_equal(as_picture(Image.fromarray(rgb)).rgb, rgb)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    picture = as_picture(tensor[None])
    assert picture.rgb.dtype == np.uint16
    np.testing.assert_allclose(picture.rgb / 65535, rgb / 255, atol=1e-4)
    with pytest.raises(ImageError, match="batch"):
        as_picture(torch.zeros(2, 3, 4, 4))


def test_resize_uint8_matches_pil_and_uint16_is_close():
    rgb = smooth_image(17, 23)
    ours = resize(rgb, (46, 34), "bicubic")
    np.testing.assert_array_equal(ours, np.asarray(Image.fromarray(rgb).resize((46, 34), Image.BICUBIC)))
    deep = rgb.astype(np.uint16) * 257
    np.testing.assert_allclose(resize(deep, (46, 34)) / 65535, ours / 255, atol=2 / 255)


def test_write_keeps_no_partial_file_and_collect_walks_folders(tmp_path):
    rgb = smooth_image(5, 5)
    write_image(tmp_path / "x" / "a.png", rgb)
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["a.png"]
    (tmp_path / "x" / "b.txt").write_text("skip me")
    Image.fromarray(rgb).save(tmp_path / "x" / "c.JPG")
    assert [p.name for p in collect_inputs([tmp_path / "x"])] == ["a.png", "c.JPG"]
    assert collect_inputs([tmp_path / "nope.png"]) == [tmp_path / "nope.png"]


def test_a_batch_names_the_input_of_each_warning(tmp_path):
    """A warning raised while one image is upscaled (e.g. a float16 VAE pass redone in float32) is that image's
    line; one that names its file already is kept as it is."""
    import warnings

    from diffsr.batch import plan_outputs, upscale_all

    sources = []
    for name in ("a.png", "b.png"):
        Image.fromarray(smooth_image(8, 8)).save(tmp_path / name)
        sources.append(tmp_path / name)

    def upscale(path, callback):
        warnings.warn("the float16 VAE decode overflowed (inf or NaN values): redone in float32" if path.name == "a.png"
                      else f"{path.name}: an animation of 3 frames; only the first frame is used")
        return as_picture(smooth_image(16, 16))

    report = upscale_all(plan_outputs(sources, tmp_path / "out"), upscale)
    assert len(report.written) == 2
    assert report.warnings == [f"{sources[0]}: the float16 VAE decode overflowed (inf or NaN values): redone in "
                               "float32", "b.png: an animation of 3 frames; only the first frame is used"]


def _batch_inputs(folder, names):
    sources = []
    for name in names:
        Image.fromarray(smooth_image(8, 8)).save(folder / name)
        sources.append(folder / name)
    return sources


def test_a_batch_writes_each_output_while_the_next_image_upscales(tmp_path, monkeypatch):
    """The write of one output overlaps the upscale of the next: the first write here waits (at most 10 s) for
    the second upscale to begin, which a write done before it would never see."""
    import threading

    from diffsr import batch

    second_upscale = threading.Event()
    overlapped = []
    write = batch.write_atomically

    def slow_write(path, encode):
        if path.stem == "a":
            overlapped.append(second_upscale.wait(timeout=10))
        write(path, encode)

    monkeypatch.setattr(batch, "write_atomically", slow_write)
    outputs = {"a": smooth_image(16, 16), "b": smooth_image(16, 24)}

    def upscale(path, callback):
        if path.stem == "b":
            second_upscale.set()
        return as_picture(outputs[path.stem])

    report = batch.upscale_all(batch.plan_outputs(_batch_inputs(tmp_path, ["a.png", "b.png"]), tmp_path / "out"),
                               upscale)
    assert overlapped == [True]
    assert report.written == [tmp_path / "out" / "a.png", tmp_path / "out" / "b.png"]
    for name, rgb in outputs.items():  # complete when upscale_all returns
        np.testing.assert_array_equal(read_image(tmp_path / "out" / f"{name}.png").rgb, rgb)


def test_a_batch_writes_large_outputs_before_the_next_image_upscales(tmp_path, monkeypatch):
    from diffsr import batch

    monkeypatch.setattr(batch, "BACKGROUND_WRITE_PIXELS", 16 * 16 - 1)  # the outputs below are 16 x 16
    seen = []

    def upscale(path, callback):
        seen.append(sorted(p.name for p in (tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else [])
        return as_picture(smooth_image(16, 16))

    report = batch.upscale_all(batch.plan_outputs(_batch_inputs(tmp_path, ["a.png", "b.png", "c.png"]),
                                                  tmp_path / "out"), upscale)
    assert seen == [[], ["a.png"], ["a.png", "b.png"]]  # each output there, complete, before the next upscale
    assert len(report.written) == 3


def test_an_interrupted_batch_completes_the_write_under_way(tmp_path):
    from diffsr.batch import plan_outputs, upscale_all

    def upscale(path, callback):
        if path.stem == "b":
            raise KeyboardInterrupt
        return as_picture(smooth_image(16, 16))

    with pytest.raises(KeyboardInterrupt):
        upscale_all(plan_outputs(_batch_inputs(tmp_path, ["a.png", "b.png"]), tmp_path / "out"), upscale)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # no temporary left
    np.testing.assert_array_equal(read_image(tmp_path / "out" / "a.png").rgb, smooth_image(16, 16))


def test_a_batch_reports_a_failed_write_in_order_and_goes_on(tmp_path):
    """a's output cannot be written (a folder is in its place), b cannot be upscaled, c is written: one line
    each for a and b, in the inputs' order, though a's write ends while b upscales."""
    from diffsr.batch import plan_outputs, upscale_all
    from diffsr.errors import ImageError

    sources = _batch_inputs(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "out" / "a.png").mkdir(parents=True)

    def upscale(path, callback):
        if path.stem == "b":
            raise ImageError(f"{path}: not an image")
        return as_picture(smooth_image(16, 16))

    said = []
    report = upscale_all(plan_outputs(sources, tmp_path / "out", overwrite=True), upscale,
                         lambda kind, line: said.append((kind, line)))
    assert report.written == [tmp_path / "out" / "c.png"]
    assert [line.split(":")[0] for line in report.failures] == [str(sources[0]), str(sources[1])]
    assert report.failures[0].startswith(f"{sources[0]}: not written: {tmp_path / 'out' / 'a.png'}: cannot write it")
    assert said == [("error", line) for line in report.failures]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]  # (a.png: the folder)
