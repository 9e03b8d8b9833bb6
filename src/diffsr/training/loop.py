"""The one training loop, on accelerate: every method's trainer runs through it.

Single GPU, several GPUs or nodes (`accelerate launch -m diffsr.cli train CONFIG`), mixed precision, gradient
accumulation, gradient checkpointing, checkpoints with exact resume, TensorBoard and a log.jsonl, validation
images. Each iteration runs the trainer's phases in order; each phase back-propagates over all micro-batches
and then steps its optimiser once.

Exact resume without saving random-number states: every random draw of step s (data order, crops,
degradations, timesteps, noise) comes from generators seeded by (seed, s, process), so a run resumed at step
s draws what the uninterrupted run drew.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from diffsr.checkpoints import read_weights
from diffsr.errors import UsageError, WeightsError
from diffsr.training import trainer_class
from diffsr.training.config import OptimizerConfig, TrainConfig

CHECKPOINTS = "checkpoints"
TRAINED_FILE = "trained.pt"  # trained tensors (our format), optimisers, schedulers, step, run id
RUN_FILE = "run.json"  # the id of the run the checkpoints in checkpoints/ belong to
LOG_FILE = "log.jsonl"
RELEASE = "release"  # the trained weights in the authors' format


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, process, ...), well mixed (splitmix64)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return value >> 1


# -- data ---------------------------------------------------------------------------------------------


def build_dataset(config: TrainConfig) -> Dataset:
    from diffsr.data import HRImages, PairedImages

    data = config.data
    if data.hr:
        return HRImages(data.hr, crop=data.crop, flip=data.flip, degradation=data.degradation)
    return PairedImages(data.lr_dir, data.hr_dir, scale=data.scale, crop=data.crop, flip=data.flip)


class _SeededItems(Dataset):
    """Items loaded under a given seed: index (position, seed) -> dataset[position] drawn with that seed, in
    whichever process loads it (so worker processes change nothing)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        torch.manual_seed(seed)
        item = self.dataset[index]
        return {k: v for k, v in item.items() if isinstance(v, torch.Tensor)}


class StepBatches(Sampler):
    """Batches from `start_step` on: micro-batch m of step s on process r takes the next `batch` positions of
    an endless stream of epochs, each a permutation seeded by (seed, epoch)."""

    def __init__(self, size: int, batch: int, micro_batches: int, processes: int, process: int, seed: int,
                 start_step: int, steps: int):
        self.size, self.batch, self.micro, self.processes, self.process = size, batch, micro_batches, processes, process
        self.seed, self.start_step, self.steps = seed, start_step, steps

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(derived_seed(self.seed, epoch)))

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.micro

    def __iter__(self):
        epoch, order = -1, None
        for step in range(self.start_step, self.steps):
            for micro in range(self.micro):
                first = ((step * self.micro + micro) * self.processes + self.process) * self.batch
                keys = []
                for position in range(first, first + self.batch):
                    if position // self.size != epoch:
                        epoch = position // self.size
                        order = self.order(epoch)
                    keys.append((int(order[position % self.size]), derived_seed(self.seed, position, 1)))
                yield keys


class Batch:
    """One micro-batch on the device: tensors by name ("lr", "hr"); a phase may store tensors for later phases
    of the iteration. Deliberately not a dict: DistributedDataParallel rebuilds dict arguments on every call,
    which would drop what a phase stored."""

    def __init__(self, tensors: dict):
        self._items = dict(tensors)

    def __getitem__(self, key: str):
        return self._items[key]

    def __setitem__(self, key: str, value) -> None:
        self._items[key] = value

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str, default=None):
        return self._items.get(key, default)

    def keys(self):
        return self._items.keys()

    def items(self):
        return self._items.items()


# -- checkpoints --------------------------------------------------------------------------------------


def trained_state(trainer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: every trainable parameter, and the buffers of the modules that own one (e.g. a
    discriminator's normalisation statistics). The frozen networks are not saved: they come from the base."""
    state = {}
    for module_name, module in trainer.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own:
            prefix = f"{module_name}." if module_name else ""
            state.update({prefix + n: p.detach() for n, p in own})
            state.update({prefix + n: b.detach() for n, b in module.named_buffers(recurse=False)})
    return state


def _step_folders(out: Path) -> list[Path]:
    """checkpoints/step-N folders, oldest first."""
    folders = [p for p in (out / CHECKPOINTS).glob("step-*") if p.name[len("step-"):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len("step-"):]))


def start_run(out: Path) -> str:
    """Begin a new run in `out` and return its id. An earlier run's checkpoints (and its log.jsonl) are moved
    aside to checkpoints.old-TIME/, so they are never resumed, never mixed with this run's, never deleted."""
    checkpoints = out / CHECKPOINTS
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside, number = out / f"{CHECKPOINTS}.old-{stamp}", 1
        while aside.exists():
            number += 1
            aside = out / f"{CHECKPOINTS}.old-{stamp}-{number}"
        checkpoints.rename(aside)
        if (out / LOG_FILE).is_file():
            (out / LOG_FILE).rename(aside / LOG_FILE)
        warnings.warn(f"starting a new run: the checkpoints of the earlier run in {out} are moved to {aside}",
                      stacklevel=2)
    run = uuid.uuid4().hex
    (out / RUN_FILE).write_text(json.dumps({"run": run}) + "\n")
    return run


def resume_point(out: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of this output folder's run that reads, and what it holds. Damaged ones (a crash
    or a full disk while saving) and other runs' are skipped with a warning."""
    run_file = out / RUN_FILE
    try:
        run = json.loads(run_file.read_text())["run"] if run_file.is_file() else None
    except (ValueError, KeyError, TypeError):
        run = "unreadable"  # then no checkpoint matches it: a new run starts
    for folder in reversed([p for p in _step_folders(out) if (p / TRAINED_FILE).is_file()]):
        try:  # trained.pt holds tensors and plain values only: the weights reader's weights_only load
            saved = read_weights(folder / TRAINED_FILE)
        except WeightsError as error:
            warnings.warn(f"skipping checkpoint {error}", stacklevel=2)
            continue
        if saved.get("run") != run:
            warnings.warn(f"skipping {folder}: a checkpoint of another run (not the one {run_file} names)",
                          stacklevel=2)
            continue
        return folder, saved
    return None


def save_checkpoint(folder: Path, run: str, step: int, trainer, optimizers: dict, schedulers: dict, scaler) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({
        "run": run,
        "step": step,
        "trained": {k: v.cpu() for k, v in trained_state(trainer).items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "schedulers": {name: sched.state_dict() for name, sched in schedulers.items()},
        "scaler": scaler.state_dict() if scaler is not None else None,
    }, folder / (TRAINED_FILE + ".tmp"))
    (folder / (TRAINED_FILE + ".tmp")).replace(folder / TRAINED_FILE)  # a crash never leaves half a file


def load_checkpoint(folder: Path, saved: dict, trainer, optimizers: dict, schedulers: dict, scaler) -> int:
    """Put what resume_point read from `folder` into the trainer, optimisers and schedulers; the step it is at."""
    own = trained_state(trainer)
    missing = sorted(set(own) - set(saved["trained"]))
    if missing or set(saved["optimizers"]) != set(optimizers):
        raise UsageError(f"{folder}: this checkpoint was made by another configuration "
                         f"({'missing ' + missing[0] if missing else 'other optimisers'}); use a new output_dir")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(saved["trained"][name])
    for name, opt in optimizers.items():
        opt.load_state_dict(saved["optimizers"][name])
    for name, sched in schedulers.items():
        sched.load_state_dict(saved["schedulers"][name])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    return saved["step"]


# -- the loop -----------------------------------------------------------------------------------------


def _warmup(steps: int):
    return lambda step: min(1.0, (step + 1) / steps) if steps > 0 else 1.0


def train(config: TrainConfig, resume: bool = True, progress: bool = True) -> dict:
    """Train as `config` says; continue from the latest checkpoint in output_dir when `resume`.

    Returns {"step": last step, "losses": {name: [per-step value]} of this run, "release": [files],
    "trainer": the trained trainer}."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    out = Path(config.output_dir)
    loop = config.train
    log_with = _tracker(loop.log_with)
    # accelerate keeps one precision per process; a later train() call (a notebook, tests) may want another.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    no_gpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(
        # cpu=True where there is no GPU anyway: it is what lets accelerate run several CPU processes (torchrun).
        cpu=no_gpu, mixed_precision=loop.mixed_precision, log_with=log_with, project_dir=str(out),
        # Phases train different parts: each backward leaves the other parts' parameters unused.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(derived_seed(loop.seed, 3))  # the trainer's initial weights (e.g. LoRA A)
    trainer = trainer_class(config.method, config.stage).from_config(config)
    if loop.gradient_checkpointing:
        trainer.enable_gradient_checkpointing()
    if accelerator.mixed_precision != "no":
        trainer.cast_frozen(torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16)
    groups = trainer.parameter_groups()
    unknown = sorted(set(config.optimizers) - set(groups))
    if unknown:
        raise UsageError(f"{config.method} stage {config.stage} has no optimiser {unknown[0]!r} "
                         f"(its optimisers: {', '.join(groups)})")
    optimizers, schedulers = {}, {}
    for name, params in groups.items():
        settings = config.optimizers.get(name, OptimizerConfig())
        optimizers[name] = torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas,
                                             weight_decay=settings.weight_decay)
        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(optimizers[name], _warmup(settings.warmup_steps))

    model, *prepared = accelerator.prepare(trainer, *optimizers.values())
    optimizers = dict(zip(optimizers, prepared))
    trainer = accelerator.unwrap_model(model)

    start, run = 0, None
    found = resume_point(out) if resume else None
    if found is not None:
        checkpoint, saved = found
        start = load_checkpoint(checkpoint, saved, trainer, optimizers, schedulers, accelerator.scaler)
        run = saved.get("run")  # None in checkpoints older than run ids
        accelerator.print(f"resuming from {checkpoint} (step {start})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if found is None:
            run = start_run(out)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
    if log_with:
        accelerator.init_trackers("train", config={"method": config.method, "stage": config.stage})

    dataset = build_dataset(config)
    sampler = StepBatches(len(dataset), loop.batch_size, loop.gradient_accumulation, accelerator.num_processes,
                          accelerator.process_index, loop.seed, start, loop.steps)
    batches = iter(DataLoader(_SeededItems(dataset), batch_sampler=sampler, num_workers=config.data.num_workers,
                              pin_memory=accelerator.device.type == "cuda"))
    history: dict[str, list[float]] = {}
    bar = tqdm(range(start, loop.steps), initial=start, total=loop.steps, desc=f"train {config.method}",
               disable=not (progress and accelerator.is_local_main_process))
    log_file = _open_log(out / LOG_FILE, start) if accelerator.is_main_process else None
    model.train()
    for step in bar:
        torch.manual_seed(derived_seed(loop.seed, step, accelerator.process_index, 2))
        micro = [Batch({k: v.to(accelerator.device) for k, v in next(batches).items()})
                 for _ in range(loop.gradient_accumulation)]
        trainer.global_step = step
        logs = run_step(accelerator, model, trainer, micro, optimizers, groups, loop.max_grad_norm)
        if accelerator.num_processes > 1:  # log the mean over all processes, not the main process's share
            names = sorted(logs)
            means = accelerator.reduce(torch.tensor([logs[n] for n in names], device=accelerator.device), "mean")
            logs = dict(zip(names, means.tolist()))
        for sched in schedulers.values():
            sched.step()
        done = step + 1
        for name, value in logs.items():
            history.setdefault(name, []).append(value)
        if log_file is not None:
            log_file.write(json.dumps({"step": done, **logs}) + "\n")
            log_file.flush()
        if done % loop.log_every == 0 or done == loop.steps:
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith("loss")})
            if log_with:
                accelerator.log(logs, step=done)
        if done % loop.save_every == 0 or done == loop.steps:
            _save(accelerator, out, run, done, trainer, optimizers, schedulers, loop.keep_checkpoints)
        if config.validation.images and config.validation.every and done % config.validation.every == 0:
            validate(accelerator, trainer, config, done)
    if log_file is not None:
        log_file.close()

    release = []
    if accelerator.is_main_process:
        if config.validation.images and not (config.validation.every and loop.steps % config.validation.every == 0):
            validate(accelerator, trainer, config, loop.steps)
        release = trainer.save_release(out / RELEASE)
        accelerator.print(f"trained weights in the release format: {', '.join(map(str, release))}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": loop.steps, "losses": history, "release": release, "trainer": trainer}


def run_step(accelerator, model, trainer, micro: list[dict], optimizers: dict, groups: dict,
             max_grad_norm: float) -> dict[str, float]:
    """One iteration: every phase in order; back-propagate each micro-batch's loss / count, then clip and step
    that phase's optimiser. Gradients are cleared before each phase, so a phase's step sees only its own loss
    (the releases let a generator's GAN loss leak into the discriminator's gradients; we do not)."""
    logs: dict[str, float] = {}
    for phase, optimizer_name in trainer.phases:
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(micro):
            last = index == len(micro) - 1
            with (nullcontext() if last else accelerator.no_sync(model)), accelerator.autocast():
                loss, values = model(batch, phase)
            accelerator.backward(loss / len(micro))
            for name, value in values.items():
                logs[name] = logs.get(name, 0.0) + float(value) / len(micro)
        if max_grad_norm:
            accelerator.clip_grad_norm_(groups[optimizer_name], max_grad_norm)
        optimizers[optimizer_name].step()
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    return logs


def _open_log(path: Path, start: int):
    """log.jsonl keeps one line per step: on resume the lines past the checkpoint (a crashed run's) go, and so
    does a line a crash left half-written."""
    kept = []
    if start and path.exists():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{path}: dropping line {number}, not a complete log entry (written when a run "
                              "stopped?)", stacklevel=2)
                continue
            if step <= start:
                kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def _save(accelerator, out: Path, run: str, step: int, trainer, optimizers, schedulers, keep: int) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(out / CHECKPOINTS / f"step-{step}", run, step, trainer, optimizers, schedulers,
                        accelerator.scaler)
        for old in _step_folders(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def validate(accelerator, trainer, config: TrainConfig, step: int) -> list[Path]:
    """Upscale the validation images with the model as trained so far; save them (and show them in TensorBoard)."""
    if not accelerator.is_main_process:
        return []
    from diffsr.batch import plan_outputs, upscale_all
    from diffsr.images import collect_inputs

    folder = Path(config.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    trainer.eval()
    try:
        upscaler = trainer.upscaler()

        def upscale(path, callback):
            with accelerator.autocast():
                picture = upscaler.upscale(path, scale=config.validation.scale, seed=0)
            if accelerator.trackers:  # TensorBoard, when asked for and installed
                writer = accelerator.get_tracker("tensorboard", unwrap=True)
                writer.add_image(f"validation/{path.stem}", picture.rgb, step, dataformats="HWC")
            return picture

        report = upscale_all(plan_outputs(collect_inputs(config.validation.images), folder, "png", overwrite=True),
                             upscale)
        # a bad validation image must not stop a long training run
        for line in report.failures:
            warnings.warn(f"validation skipped {line}", stacklevel=2)
        for line in report.warnings:
            warnings.warn(line, stacklevel=2)
    finally:
        trainer.train()
    return report.written


def _tracker(log_with: str) -> str | None:
    """'tensorboard' if asked for and installed (pip install 'diffsr[train]'), else None with a note."""
    if log_with != "tensorboard":
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        warnings.warn("tensorboard is not installed (pip install 'diffsr[train]'): losses go to log.jsonl only",
                      stacklevel=3)
        return None
    return "tensorboard"
