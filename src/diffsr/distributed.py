"""Data-parallel runs: the processes of a `torchrun` / `accelerate launch` job, and `--shard I/N`.

One split of the inputs serves both: `split(weights, parts)` puts the largest inputs first, each into the
lightest part so far, so no process gets all the large images. A shard is split from all the inputs (its
share never depends on what other shards have done yet); the processes of one job then split the shard.
Outputs do not depend on the split: every seed follows the image, never the process.

The processes come from accelerate's `PartialState` (it reads torchrun's environment, picks each process's
device and opens the process group: NCCL on GPUs, gloo on CPUs); results are gathered with torch.distributed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffsr.errors import ImageError, UsageError


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (1-based, as SLURM array indices are usually given) -> (I - 1, N); UsageError otherwise."""
    index, sep, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise UsageError(f"{text}: expected I/N with whole numbers, e.g. 1/4") from None
    if not sep or count < 1 or not 1 <= index <= count:
        raise UsageError(f"{text}: expected I/N with 1 <= I <= N, e.g. 1/4")
    return index - 1, count


def split(weights: Sequence[float], parts: int) -> list[list[int]]:
    """The indices of each of `parts` parts, balanced by weight: largest first, each into the lightest part
    (ties: the lower index, the lower part), each part's indices in their original order. Deterministic.
    Written here: accelerate's split_between_processes cuts by count, in order, not by weight."""
    loads = [0.0] * parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    for index in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        part = min(range(parts), key=lambda p: (loads[p], p))
        shares[part].append(index)
        loads[part] += weights[index]
    return [sorted(share) for share in shares]


def pixel_counts(paths: Sequence[Path]) -> list[int]:
    """Each image's pixel count from its header (cheap); an unreadable one counts 1 (it fails fast, and its
    process reports it)."""
    from diffsr.images import image_size

    counts = []
    for path in paths:
        try:
            height, width = image_size(path)
        except ImageError:
            height, width = 1, 1
        counts.append(height * width)
    return counts


@dataclass(frozen=True)
class Processes:
    """This process's place in the job: rank of count (1 of 1 outside a launch), and the --shard, if any."""

    rank: int = 0
    count: int = 1
    local_rank: int = 0
    shard: tuple[int, int] | None = None  # (index from 0, count)

    @classmethod
    def launched(cls, shard: tuple[int, int] | None = None) -> "Processes":
        """The processes torchrun / accelerate launch started (one process otherwise); opens the process group."""
        import torch
        from accelerate import PartialState

        # cpu=True where there is no GPU: it is what makes accelerate open a gloo group for CPU processes.
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, state.local_process_index, shard)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.count > 1

    def device(self, requested: str) -> str:
        """`--device cuda` (no index) means this process's own GPU, cuda:LOCAL_RANK, in a launched job."""
        return f"cuda:{self.local_rank}" if self.parallel and requested == "cuda" else requested

    def shard_of(self, items: Sequence, weights: Sequence[float]) -> list:
        """The items of this process's --shard (all of them without one), split from all the items by weight."""
        if not self.shard:
            return list(items)
        return [items[i] for i in split(weights, self.shard[1])[self.shard[0]]]

    def part(self, items: Sequence, weights: Sequence[float]) -> list:
        """This process's part of `items`, split over the processes of the job by weight."""
        return [items[i] for i in split(weights, self.count)[self.rank]]

    def gather(self, value) -> list:
        """Every process's `value`, in rank order, on every process."""
        if not self.parallel:
            return [value]
        import torch.distributed as dist

        values = [None] * self.count
        dist.all_gather_object(values, value)
        return values

    def from_main(self, make):
        """`make()` run on the main process only, its result (or its DiffsrError, raised again) on every process.
        For work that must see the files before any process writes (planning), or that writes once."""
        from diffsr.errors import DiffsrError

        value, error = None, None
        if self.is_main:
            try:
                value = make()
            except DiffsrError as raised:
                if not self.parallel:
                    raise
                error = raised
        if self.parallel:
            import torch.distributed as dist

            box = [(value, error)]
            dist.broadcast_object_list(box, src=0)
            value, error = box[0]
        if error is not None:
            raise error
        return value

    def wait(self) -> None:
        """Until every process gets here (e.g. all outputs are written before they are evaluated)."""
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()

    def say(self, line: str) -> None:
        """A line on stderr: as is from the main process, prefixed with the rank from the others."""
        print(line if not self.parallel else f"[rank {self.rank}] {line}", file=sys.stderr)

    def close(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
