"""Whole feature maps kept outside the compute device's memory budget (the bounded VAE mode), read and written
in row bands. For an accelerator they live in host RAM; for the CPU in an unlinked temporary file (in TMPDIR),
read and written with plain file I/O, so that they sit in the kernel's page cache, which it writes out and drops
when RAM runs short, instead of in the process's own memory. Written by hand: a memory map (numpy, torch) counts
every page it touches as the process's memory, and no library streams row bands of a tensor to a file."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import weakref

import torch

from diffsr.errors import OutputError


class SpilledMap:
    """A feature map of `shape` (batch, channels, height, width) and `dtype` for computations on `device`."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device | str):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)
        batch, channels, height, width = self.shape
        if self.device.type == "cpu":
            self._host = None
            # stored row by row, (height, batch, channels, width), so that a band of rows is one read
            self._row_bytes = batch * channels * width * torch.empty((), dtype=dtype).element_size()
            self._file = tempfile.TemporaryFile(prefix="diffsr-map-", buffering=0)
            weakref.finalize(self, self._file.close)  # the file goes when the map does
            with _space_for(height * self._row_bytes):
                if hasattr(os, "posix_fallocate"):  # claim the disk space now: a full disk fails here, not midway
                    os.posix_fallocate(self._file.fileno(), 0, height * self._row_bytes)
                else:
                    self._file.truncate(height * self._row_bytes)
        else:
            self._host = torch.empty(self.shape, dtype=dtype)

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        """Rows [top, bottom) of the map (clipped to it), on the compute device."""
        top, bottom = max(top, 0), min(bottom, self.shape[2])
        if self._host is not None:
            return self._host[:, :, top:bottom].to(self.device)
        batch, channels, _, width = self.shape
        buffer = torch.empty((bottom - top, batch, channels, width), dtype=self.dtype)
        view, done = memoryview(_bytes(buffer)), 0
        self._file.seek(top * self._row_bytes)
        while done < len(view):
            read = self._file.readinto(view[done:])
            if not read:
                raise OSError(f"feature map file ended {len(view) - done} bytes early")
            done += read
        return buffer.permute(1, 2, 0, 3).contiguous()

    def write(self, top: int, band: torch.Tensor) -> None:
        """Store `band` as rows [top, top + its height) of the map."""
        if self._host is not None:
            self._host[:, :, top:top + band.shape[2]].copy_(band)
            return
        view, done = memoryview(_bytes(band.detach().to("cpu", self.dtype).permute(2, 0, 1, 3).contiguous())), 0
        self._file.seek(top * self._row_bytes)
        with _space_for(self.shape[2] * self._row_bytes):
            while done < len(view):
                done += self._file.write(view[done:])


@contextlib.contextmanager
def _space_for(size: int):
    """A full disk as one clear line (caught per image in a batch, like any result that cannot be written)."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OutputError(f"no space in {tempfile.gettempdir()} for the bounded VAE mode's feature maps "
                          f"({size / 1e9:.1f} GB each): set TMPDIR to a larger disk, or allow more memory "
                          f"(--max-memory)") from error


def _bytes(tensor: torch.Tensor):
    """The bytes of a contiguous CPU tensor, as a writable numpy array (numpy has no bfloat16)."""
    return tensor.view(torch.uint8).numpy()
