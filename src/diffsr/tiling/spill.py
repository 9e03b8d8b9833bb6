"""Whole feature maps kept outside the compute device's memory budget (the bounded VAE mode), read and written
in row bands. For an accelerator they live in host RAM; for the CPU in an unlinked temporary file (in TMPDIR),
read and written with plain file I/O, so that they sit in the kernel's page cache, which it writes out and drops
when RAM runs short, instead of in the process's own memory. Written by hand: a memory map (numpy, torch) counts
every page it touches as the process's memory, and no library streams row bands of a tensor to a file."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import tempfile
import weakref

import torch

from diffsr.errors import OutputError
from diffsr.tiling.norms import Statistics


class FilePool:
    """Temporary files for spilled maps, each reused once its map is gone: rewriting pages the page cache holds
    already costs a fraction of writing new ones (measured here: 3.3-3.9 against 0.6-1.7 GB/s). `close()` at
    the end of a run closes the idle files; the files of maps that outlive the run close with their maps."""

    def __init__(self):
        self._idle: list = []
        self._open = True

    def take(self, size: int):
        """An open file of at least `size` bytes, its disk space claimed (a full disk fails here, not midway)."""
        file = self._idle.pop() if self._idle else tempfile.TemporaryFile(prefix="diffsr-map-", buffering=0)
        length = os.fstat(file.fileno()).st_size
        if length < size:
            with _space_for(size):
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(file.fileno(), length, size - length)
                else:
                    file.truncate(size)
        return file

    def give_back(self, file) -> None:
        if self._open:
            self._idle.append(file)
            self._idle.sort(key=lambda idle: os.fstat(idle.fileno()).st_size)  # the largest is taken first
        else:
            file.close()

    def close(self) -> None:
        self._open = False
        while self._idle:
            self._idle.pop().close()


class ReadBuffer:
    """Memory for successive band reads. Fresh memory for each band costs page faults where large blocks are
    mapped afresh (the `diffsr` command's 1 MB mmap threshold): the full-size decoder at 512 px in 32-row bands
    took 46.6 CPU s with a fresh buffer per band and 43.6 s with this one."""

    def __init__(self):
        self._memory: torch.Tensor | None = None

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        size = math.prod(shape)
        if self._memory is None or self._memory.dtype != dtype or self._memory.numel() < size:
            self._memory = torch.empty(size, dtype=dtype)
        return self._memory[:size].view(shape)


class SpilledMap:
    """A feature map of `shape` (batch, channels, height, width) and `dtype` for computations on `device`; on
    the CPU in a file of `files` (default: its own)."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device | str, files: FilePool | None = None):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device(device)
        # GroupNorm statistics per group count, measured by the writer as the bands went in (saves reading
        # the whole map back for them)
        self.statistics: dict[int, Statistics] = {}
        batch, channels, height, width = self.shape
        if self.device.type == "cpu":
            self._host = None
            # stored as the tensor is, so that a band's rows of one channel are one run of the file, read and
            # written straight into / from the band's memory (no reordering copy)
            self._row_bytes = width * torch.empty((), dtype=dtype).element_size()
            if files is None:
                files = FilePool()
                files.close()  # a pool of one: the file closes with the map
            self._file_bytes = batch * channels * height * self._row_bytes
            self._file = files.take(self._file_bytes)
            weakref.finalize(self, files.give_back, self._file)  # the file goes back when the map goes
        else:
            self._host = torch.empty(self.shape, dtype=dtype)

    def rows(self, top: int, bottom: int, buffer: ReadBuffer | None = None) -> torch.Tensor:
        """Rows [top, bottom) of the map (clipped to it), on the compute device; read into `buffer`'s memory if
        given (the band is then valid until the buffer's next read)."""
        top, bottom = max(top, 0), min(bottom, self.shape[2])
        if self._host is not None:
            return self._host[:, :, top:bottom].to(self.device)
        shape = (*self.shape[:2], bottom - top, self.shape[3])
        band = buffer.take(shape, self.dtype) if buffer is not None else torch.empty(shape, dtype=self.dtype)
        for offset, part in self._runs(top, band):
            done = 0
            while done < len(part):
                read = os.preadv(self._file.fileno(), [part[done:]], offset + done)
                if not read:
                    raise OSError(f"feature map file ended {len(part) - done} bytes early")
                done += read
        return band

    def write(self, top: int, band: torch.Tensor) -> None:
        """Store `band` as rows [top, top + its height) of the map."""
        if self._host is not None:
            self._host[:, :, top:top + band.shape[2]].copy_(band)
            return
        band = band.detach().to("cpu", self.dtype)
        if band.stride(-1) != 1 or band.stride(-2) != band.shape[-1]:  # rows not whole runs of memory
            band = band.contiguous()
        with _space_for(self._file_bytes):
            for offset, part in self._runs(top, band):
                done = 0
                while done < len(part):
                    done += os.pwritev(self._file.fileno(), [part[done:]], offset + done)

    def _runs(self, top: int, band: torch.Tensor):
        """(file offset, memory of the band) of each channel's rows: one run of the file each, and of memory,
        since the band's rows are whole runs of memory (a contiguous band, or a row slice of a whole map as the
        runner writes them: no copy). The memory is the band's own, so reads land in it."""
        height, rows = self.shape[2], band.shape[2]
        run, item = rows * self._row_bytes, band.element_size()
        # numpy: a writable view of the band's storage (it has no bfloat16)
        storage = torch.empty(0, dtype=torch.uint8).set_(band.untyped_storage()).numpy()
        memory = memoryview(storage).cast("B")
        first, batch_step, channel_step = band.storage_offset(), band.stride(0), band.stride(1)
        starts = [(first + b * batch_step + c * channel_step) * item
                  for b in range(band.shape[0]) for c in range(band.shape[1])]
        return [((plane * height + top) * self._row_bytes, memory[start:start + run])
                for plane, start in enumerate(starts)]


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
