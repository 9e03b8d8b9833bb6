"""Reading, converting, resizing and writing images; walking input folders.

Every image enters the library as a `Picture`: RGB pixels in their native depth (uint8 or uint16) plus
an optional alpha plane. Methods resize with PIL because the authors' pipelines do (their numbers depend
on PIL's bicubic filter and on the uint8 rounding after each resize).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from diffsr.errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "bmp": ".bmp", "tiff": ".tif", "tif": ".tif"}
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}

# Truncated files must fail loudly, never decode as half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class Picture:
    """RGB pixels (H, W, 3) as uint8 or uint16, and an optional alpha plane (H, W) of the same depth."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    name: str = "image"

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
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except Exception as error:  # any header problem: reported, the file is left out
        raise ImageError(f"{path}: not a readable image ({str(error).strip() or type(error).__name__})") from None
    return height, width


def read_image(path: str | Path) -> Picture:
    """Read any supported image as a Picture; one clear ImageError line for anything unreadable."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        with Image.open(path) as image:
            image.load()
            rgb, alpha = _from_pil(image)
    except PermissionError:
        raise ImageError(f"{path}: cannot read the file (permission denied)") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        message = str(error).strip() or type(error).__name__
        if "truncated" in message.lower() or "broken" in message.lower():
            raise ImageError(f"{path}: truncated or damaged image ({message})") from None
        raise ImageError(f"{path}: cannot decode image ({message})") from None
    if rgb.dtype == np.uint8 and _may_be_16_bit_colour(path):
        deep = _high_depth(path)
        if deep is not None:
            if deep.ndim == 2:
                rgb, alpha = np.repeat(deep[:, :, None], 3, axis=2), None
            else:
                rgb = np.ascontiguousarray(deep[:, :, :3])
                alpha = np.ascontiguousarray(deep[:, :, 3]) if deep.shape[2] == 4 else None
    if min(rgb.shape[:2]) < 1:
        raise ImageError(f"{path}: image is empty")
    return Picture(rgb, alpha, name=path.name)


def as_picture(image) -> Picture:
    """Accept a path, a PIL image, a uint8/uint16 HxW(x3/4) array, or a [0,1] tensor (3,H,W) / (1,3,H,W)."""
    if isinstance(image, Picture):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        rgb, alpha = _from_pil(image)
        return Picture(rgb, alpha)
    if isinstance(image, torch.Tensor):
        tensor = image.detach().float().cpu()
        if tensor.ndim == 4:
            if tensor.shape[0] != 1:
                raise ImageError(f"expected one image, got a batch of {tensor.shape[0]}")
            tensor = tensor[0]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
            raise ImageError(f"expected a tensor shaped (3, H, W) in [0, 1], got {tuple(image.shape)}")
        array = (tensor.clamp(0, 1) * 65535).round().to(torch.int32).permute(1, 2, 0).numpy().astype(np.uint16)
        image = array
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype not in (np.uint8, np.uint16):
            if np.issubdtype(array.dtype, np.floating):
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
    raise ImageError(f"unsupported image type {type(image).__name__}")


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


def write_image(path: Path, rgb: np.ndarray, alpha: np.ndarray | None = None) -> None:
    """Write rgb (+alpha) to `path`; 16-bit data stays 16-bit in PNG and TIFF, alpha is dropped for JPEG/BMP."""
    suffix = path.suffix.lower()
    if alpha is not None and suffix in (".jpg", ".jpeg", ".bmp"):
        warnings.warn(f"{path.name}: {suffix[1:].upper()} has no alpha channel; the alpha plane is dropped", stacklevel=2)
        alpha = None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial{suffix}")
    if rgb.dtype == np.uint16 and suffix in (".png", ".tif", ".tiff"):
        import cv2

        data = rgb[:, :, ::-1] if alpha is None else np.dstack([rgb[:, :, ::-1], alpha])
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(data)):
            raise ImageError(f"{path}: cannot write image")
    else:
        options = {"quality": 95} if suffix in (".jpg", ".jpeg", ".webp") else {}
        to_pil(rgb, alpha).save(tmp, **options)
    tmp.replace(path)  # never leave a half-written output under the real name


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand folders (sorted, non-recursive) into their image files; keep explicit files as given."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(item)  # missing files are reported when read, with the others still processed
    return paths
