"""Reading, converting, resizing and writing images; walking input folders.

Every image enters the library as a `Picture`: RGB pixels in their native depth (uint8 or uint16) plus
an optional alpha plane. Methods resize with PIL because the authors' pipelines do (their numbers depend
on PIL's bicubic filter and on the uint8 rounding after each resize).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile

from diffsr.errors import ArgumentTypeError, ImageError, OutputError, UsageError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # GIF: read, written as PNG
OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "bmp": ".bmp", "tiff": ".tif", "tif": ".tif"}
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}

# Truncated files must fail loudly, never decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Default pixel limits of an upscale, checked from the file header before anything is decoded. 64 MP
# (8000 x 8000) is above any camera photo and takes about 0.2 GB as 8-bit RGB and 0.8 GB as the float
# tensor the methods see; 256 MP (16000 x 16000) of output already takes hours on a GPU with a diffusion
# method. Beyond them a file is far more likely a mistake or an attack (a 18 KB 1-bit PNG can declare
# 144 MP) than a wish; both limits can be raised.
MAX_INPUT_PIXELS = 64_000_000
MAX_OUTPUT_PIXELS = 256_000_000
EXIF_ORIENTATION = 0x0112


@dataclass
class Picture:
    """RGB pixels (H, W, 3) as uint8 or uint16, and an optional alpha plane (H, W) of the same depth."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    name: str = "image"
    icc_profile: bytes | None = None  # the source's colour profile, carried to the output
    exif: bytes | None = None  # the source's EXIF (orientation already applied to the pixels)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL reports sizes."""
        return self.rgb.shape[1], self.rgb.shape[0]

    @property
    def max_value(self) -> int:
        return 65535 if self.rgb.dtype == np.uint16 else 255

    def to_tensor(self) -> torch.Tensor:
        """(1, 3, H, W) float32 in [0, 1]."""
        return torch.from_numpy(self.rgb.astype(np.float32) / self.max_value).permute(2, 0, 1)[None].contiguous()


def _high_depth(path: Path) -> np.ndarray | None:
    """16-bit colour images, which PIL reduces to 8 bits on open; read them with OpenCV instead."""
    import cv2

    data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if data is None or data.dtype != np.uint16:
        return None
    if data.ndim == 3:
        order = [2, 1, 0, 3][: data.shape[2]]  # BGR(A) -> RGB(A)
        data = data[:, :, order]
    return data


def _may_be_16_bit_colour(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".png":
        with open(path, "rb") as f:
            header = f.read(26)
        return len(header) >= 26 and header[24] == 16  # IHDR bit depth
    return suffix in (".tif", ".tiff")


def _from_pil(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        gray = np.asarray(image, dtype=np.uint16)
        return np.repeat(gray[:, :, None], 3, axis=2), None
    if mode in ("I", "F"):
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if data.max() > 255 else 255.0
        gray = (np.clip(data, 0, top) / top * 65535).round().astype(np.uint16)
        return np.repeat(gray[:, :, None], 3, axis=2), None
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
    return np.asarray(image.convert("RGB")), None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) read from the file header only, without decoding the pixels; one ImageError line
    (naming the file) for a missing or unreadable file."""
    with opened_image(path) as image:  # the callers' own pixel limits apply
        width, height = image.size
    return height, width


@contextlib.contextmanager
def opened_image(path: str | Path):
    """PIL's Image.open(path), with every way a file can fail to open or decode turned into one ImageError line
    naming it. Pillow's decompression-bomb warning is off: diffsr checks its own pixel limits."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image") from None
    except PermissionError:
        raise ImageError(f"{path}: cannot read the file (permission denied)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (or an unsupported format)") from None
    except Image.DecompressionBombError:
        raise ImageError(_bomb_message(path)) from None
    except (OSError, SyntaxError, ValueError) as error:
        message = str(error).strip() or type(error).__name__
        if "truncated" in message.lower() or "broken" in message.lower():
            raise ImageError(f"{path}: truncated or damaged image ({message})") from None
        raise ImageError(f"{path}: cannot decode image ({message})") from None


def _bomb_message(path) -> str:
    bound = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # where Pillow refuses to decode
    return f"{path}: over {bound / 1e6:.0f} megapixels, which Pillow refuses to decode (a possible decompression bomb)"


def check_pixels(name, width: int, height: int, limit: int | None, what: str = "input") -> None:
    """One ImageError line when the `what` ('input' or 'output') of width x height is over `limit` pixels
    (None: no limit)."""
    if limit is not None and width * height > limit:
        subject = f"its {width}x{height} output" if what == "output" else f"{width}x{height}"
        raise ImageError(f"{name}: {subject} is {width * height / 1e6:.1f} megapixels, over the {what} limit of "
                         f"{limit / 1e6:g} megapixels (raise it with --max-{what}-megapixels or max_{what}_pixels)")


def read_image(path: str | Path, max_pixels: int | None = None) -> Picture:
    """Read any supported image as a Picture; one clear ImageError line for anything unreadable.

    `max_pixels` is checked from the header, before decoding. EXIF orientation is applied to the pixels
    (a portrait phone photo comes out upright); the ICC profile and EXIF travel with the Picture. Of an
    animated image, only the first frame is read (with a warning)."""
    path = Path(path)
    with opened_image(path) as image:  # max_pixels applies, checked before decoding
        check_pixels(path, *image.size, max_pixels)
        frames = getattr(image, "n_frames", 1)
        image.seek(0)
        image.load()
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        # A profile describes the colours it came with: only an RGB one fits the RGB output.
        icc_profile = image.info.get("icc_profile") if image.mode in ("RGB", "RGBA", "RGBX") else None
        exif = _exif_bytes(image) if image.format != "TIFF" else None  # (a TIFF's are its own tags)
        rgb, alpha = _from_pil(image)
    if frames > 1:
        warnings.warn(f"{path}: an animation of {frames} frames; only the first frame is used", stacklevel=2)
    if rgb.dtype == np.uint8 and _may_be_16_bit_colour(path):
        deep = _high_depth(path)
        if deep is not None:
            if deep.ndim == 2:
                rgb, alpha = np.repeat(deep[:, :, None], 3, axis=2), None
            else:
                rgb = np.ascontiguousarray(deep[:, :, :3])
                alpha = np.ascontiguousarray(deep[:, :, 3]) if deep.shape[2] == 4 else None
    if orientation in _ORIENT:
        rgb = np.ascontiguousarray(_ORIENT[orientation](rgb))
        alpha = None if alpha is None else np.ascontiguousarray(_ORIENT[orientation](alpha))
    if min(rgb.shape[:2]) < 1:
        raise ImageError(f"{path}: image is empty")
    return Picture(rgb, alpha, name=path.name, icc_profile=icc_profile, exif=exif)


# EXIF orientation -> what turns the stored pixels upright, as ImageOps.exif_transpose does; done on the
# arrays because PIL cannot hold the 16-bit colour images that are read through OpenCV.
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1], 5: lambda a: a.swapaxes(0, 1),
           6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1), 8: lambda a: np.rot90(a, 1)}


def _exif_bytes(image: Image.Image) -> bytes | None:
    """The image's EXIF with the orientation reset to 1 (the pixels are already upright), or None."""
    exif = image.getexif()
    if not exif:
        return None
    if EXIF_ORIENTATION in exif:
        exif[EXIF_ORIENTATION] = 1
    return exif.tobytes()


# Float pixels may overshoot [0, 1] by rounding; by more than one 8-bit step they are in another range.
_FLOAT_SLACK = 1 / 255


def _check_float_range(values: np.ndarray | torch.Tensor, what: str) -> None:
    low, high = float(values.min()), float(values.max())
    if np.isnan(low) or np.isnan(high):
        raise ImageError(f"the {what} holds NaN values")
    if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
        raise ImageError(f"a float {what} must hold values in [0, 1], this one holds {low:g} to {high:g} "
                         "(divide 8-bit values by 255)")


def as_picture(image, max_pixels: int | None = None) -> Picture:
    """Accept a path, a PIL image, a uint8/uint16 HxW(x3/4) array, or a [0,1] tensor (3,H,W) / (1,3,H,W)."""
    if isinstance(image, Picture):
        picture = image
    elif isinstance(image, (str, Path)):
        return read_image(image, max_pixels)
    elif isinstance(image, Image.Image):
        picture = Picture(*_from_pil(image))
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        picture = _from_array(image)
    else:
        raise ArgumentTypeError(f"image must be a path, PIL image, numpy array or tensor, not {type(image).__name__}")
    if min(picture.rgb.shape[:2]) < 1:
        raise ImageError(f"{picture.name}: image is empty ({picture.size[0]}x{picture.size[1]})")
    check_pixels(picture.name, *picture.size, max_pixels)
    return picture


def _from_array(image: np.ndarray | torch.Tensor) -> Picture:
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise ImageError(f"expected one image, got a batch of {tensor.shape[0]}")
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ImageError(f"expected a tensor shaped (3, H, W) in [0, 1], got {tuple(image.shape)}")
        if tensor.numel():
            _check_float_range(tensor, "tensor")
        image = (tensor.clamp(0, 1) * 65535).round().to(torch.int32).permute(1, 2, 0).numpy().astype(np.uint16)
    array = image
    if array.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(array.dtype, np.floating):
            if array.size:
                _check_float_range(array, "array")
            array = (np.clip(array, 0, 1) * 65535).round().astype(np.uint16)
        else:
            raise ImageError(f"unsupported array dtype {array.dtype} (use uint8, uint16 or float in [0, 1])")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an HxWx3 array, got shape {array.shape}")
    alpha = np.ascontiguousarray(array[:, :, 3]) if array.shape[2] == 4 else None
    rgb = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else np.ascontiguousarray(array[:, :, :3])
    return Picture(rgb, alpha)


def resize(plane: np.ndarray, size: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """Resize an HxW or HxWxC uint8/uint16 array to size=(width, height) with PIL's filter.

    uint8 stays in uint8 (PIL rounds after filtering, as the authors' pipelines do); uint16 is
    filtered per channel in float ('F' mode) and rounded back to uint16.
    """
    if (plane.shape[1], plane.shape[0]) == tuple(size):
        return plane
    resample = _RESAMPLE[method]
    if plane.dtype == np.uint8:
        return np.asarray(Image.fromarray(plane).resize(size, resample))
    channels = plane[:, :, None] if plane.ndim == 2 else plane
    out = [np.asarray(Image.fromarray(channels[:, :, c].astype(np.float32), mode="F").resize(size, resample))
           for c in range(channels.shape[2])]
    result = np.clip(np.stack(out, axis=2), 0, 65535).round().astype(np.uint16)
    return result[:, :, 0] if plane.ndim == 2 else result


def resize_picture(picture: Picture, size: tuple[int, int], method: str = "bicubic") -> Picture:
    alpha = None if picture.alpha is None else resize(picture.alpha, size, method)
    return Picture(resize(picture.rgb, size, method), alpha, picture.name)


def tensor_to_array(image: torch.Tensor, dtype=np.uint8) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> HxWx3 uint8/uint16, rounded (not truncated)."""
    top = 65535 if dtype == np.uint16 else 255
    image = image.detach().float().cpu()
    if image.ndim == 4:
        image = image[0]
    return image.clamp(0, 1).mul_(top).round_().permute(1, 2, 0).numpy().astype(dtype)


def to_pil(rgb: np.ndarray, alpha: np.ndarray | None = None) -> Image.Image:
    """An 8-bit PIL image (RGB or RGBA); 16-bit data is reduced with rounding."""
    def eight(a):
        return a if a.dtype == np.uint8 else np.round(a.astype(np.float64) / 257).astype(np.uint8)

    if alpha is None:
        return Image.fromarray(eight(rgb), "RGB")
    return Image.fromarray(np.dstack([eight(rgb), eight(alpha)]), "RGBA")


def write_image(path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None, icc_profile: bytes | None = None,
                exif: bytes | None = None) -> None:
    """Write rgb (+alpha) to `path`; 16-bit data stays 16-bit in PNG and TIFF, alpha is dropped for JPEG/BMP.
    The ICC profile is kept in 8-bit PNG, JPEG, WebP and TIFF, the EXIF in 8-bit PNG, JPEG and WebP.
    Written through a temporary (see write_atomically); one OutputError line when it cannot be written."""
    write_atomically(path, image_encoder(path, rgb, alpha, icc_profile, exif))


def image_encoder(path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None, icc_profile: bytes | None = None,
                  exif: bytes | None = None) -> Callable[[BinaryIO], None]:
    """write_image's encoder for `path`'s type, to pass to write_atomically. Its warnings (an alpha plane that
    the format drops) are said here, by the caller's thread; the encoding itself warns of nothing, so a batch
    can run it in another thread (diffsr.batch) and still name each warning's image."""
    suffix = path.suffix.lower()
    if alpha is not None and suffix in (".jpg", ".jpeg", ".bmp"):
        warnings.warn(f"{path.name}: {suffix[1:].upper()} has no alpha channel; the alpha plane is dropped", stacklevel=3)
        alpha = None
    if rgb.dtype == np.uint16 and suffix in (".png", ".tif", ".tiff"):
        def encode(file):
            import cv2

            data = rgb[:, :, ::-1] if alpha is None else np.dstack([rgb[:, :, ::-1], alpha])
            encoded, buffer = cv2.imencode(suffix, np.ascontiguousarray(data))
            if not encoded:
                raise OutputError(f"{path}: cannot encode the image as {suffix}")
            file.write(buffer.tobytes())
        return encode
    options = {"quality": 95} if suffix in (".jpg", ".jpeg", ".webp") else {}
    if icc_profile and suffix != ".bmp":
        options["icc_profile"] = icc_profile
    if exif and suffix in (".png", ".jpg", ".jpeg", ".webp"):  # (in a TIFF, EXIF would mix with its own tags)
        options["exif"] = exif
    return lambda file: to_pil(rgb, alpha).save(file, format=Image.registered_extensions()[suffix], **options)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: reading it means setting it, which races with other threads


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` (making its folder) through a temporary created exclusively beside it (a random name opened
    with O_EXCL: a file or link planted there is never followed), renamed over `path` once complete (a link at
    `path` is replaced, not written through). On any failure the temporary is removed and `path` is untouched;
    a file-system failure (disk full, name too long, read-only) is one OutputError line naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.stem[:32]}.", suffix=f".partial{path.suffix[:16]}",
                                                 dir=path.parent)
    except OSError as error:
        raise OutputError(_cannot_write(path, error)) from None
    try:
        with open(descriptor, "wb") as file:
            if hasattr(os, "fchmod"):
                os.fchmod(file.fileno(), 0o666 & ~_UMASK)  # as a plainly created file (mkstemp makes it 0600)
            write(file)
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise OutputError(_cannot_write(path, error)) from None
        raise


def _cannot_write(path: Path, error: OSError) -> str:
    return f"{path}: cannot write it ({error.strerror or first_line(error)})"


def check_output_folder(folder: Path) -> None:
    """Make `folder` if needed and prove a file can be created in it; one UsageError line if not (a file in
    the way, a read-only folder or mount): found before any work, as it would fail every output."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".diffsr-probe.", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{folder}: cannot write there ({error.strerror or first_line(error)})") from None


def is_image_name(path: Path) -> bool:
    """An image file's name in a folder: a known suffix, and neither hidden (.x: other tools' side files,
    our own temporaries) nor a partial download or write (*.partial.*)."""
    name = path.name
    return path.suffix.lower() in IMAGE_SUFFIXES and not name.startswith(".") and ".partial." not in name


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand folders (sorted, non-recursive) into their image files; keep explicit files as given."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.is_file() and is_image_name(p)))
        else:
            paths.append(item)  # missing files are reported when read, with the others still processed
    return paths


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad right and bottom to a multiple of `multiple` (as S3Diff's release does). A reflection must be shorter
    than the side, so small images are reflected repeatedly (1-pixel sides are replicated)."""
    while True:
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if not (pad_h or pad_w):
            return image
        if min(height, width) < 2:
            return torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        image = torch.nn.functional.pad(image, (0, min(pad_w, width - 1), 0, min(pad_h, height - 1)), mode="reflect")
