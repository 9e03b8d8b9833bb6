"""Training configuration: one YAML file (see configs/train/), checked on load with one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from diffsr.errors import UsageError, first_line


@dataclass
class DataConfig:
    hr: list[str] = field(default_factory=list)  # HR folders or files, degraded on the fly
    degradation: str | None = "realesrgan_x4"  # a name under configs/degradation or a YAML path
    lr_dir: str | None = None  # paired data instead: LR and HR folders matched by name
    hr_dir: str | None = None
    crop: int = 512  # HR crop, px
    scale: int = 4
    flip: bool = True
    num_workers: int = 0


@dataclass
class ValidationConfig:
    images: list[str] = field(default_factory=list)  # LR files or folders, upscaled every `every` steps
    every: int = 0  # 0: only at the end
    scale: int = 4


@dataclass
class OptimizerConfig:
    lr: float = 5e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear warm-up, then constant


@dataclass
class LoopConfig:
    steps: int = 1000
    batch_size: int = 1  # per device and micro-batch
    gradient_accumulation: int = 1  # micro-batches per optimiser step
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 1000  # checkpoint for exact resume
    keep_checkpoints: int = 2
    log_every: int = 10
    log_with: str = "tensorboard"  # tensorboard | none (a log.jsonl is always written)


@dataclass
class TrainConfig:
    method: str
    base: str
    output_dir: str
    stage: int = 1
    weights: str | None = None  # start from released (or earlier trained) weights; None: from scratch
    data: DataConfig = field(default_factory=DataConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optimizers: dict[str, OptimizerConfig] = field(default_factory=dict)  # by the trainer's optimiser names
    method_args: dict = field(default_factory=dict)  # the trainer's own keyword arguments (loss weights, ranks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"data": DataConfig, "validation": ValidationConfig, "train": LoopConfig}


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise UsageError(f"{where} must be a mapping, got {values!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UsageError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
    if cls is OptimizerConfig and "betas" in values:
        values = dict(values, betas=tuple(values["betas"]))
    for name in ("lr", "weight_decay"):  # YAML reads 5e-5 (no dot) as a string
        if cls is OptimizerConfig and isinstance(values.get(name), str):
            try:
                values = dict(values, **{name: float(values[name])})
            except ValueError:
                raise UsageError(f"{where}.{name} must be a number, got {values[name]!r}") from None
    return cls(**values)


def config_from_dict(values: dict, where: str = "config") -> TrainConfig:
    values = dict(values)
    for required in ("method", "base", "output_dir"):
        if required not in values:
            raise UsageError(f"{where}: missing {required!r}")
    for section, cls in _SECTIONS.items():
        values[section] = _build(cls, values.get(section) or {}, f"{where}: {section}")
    optimizers = values.get("optimizers") or {}
    values["optimizers"] = {name: _build(OptimizerConfig, opt or {}, f"{where}: optimizers.{name}")
                            for name, opt in optimizers.items()}
    values["method_args"] = dict(values.get("method_args") or {})
    config = _build(TrainConfig, values, where)
    if config.train.mixed_precision not in ("no", "fp16", "bf16"):
        raise UsageError(f"{where}: train.mixed_precision must be no, fp16 or bf16, got {config.train.mixed_precision!r}")
    if config.train.log_with not in ("tensorboard", "none"):
        raise UsageError(f"{where}: train.log_with must be tensorboard or none, got {config.train.log_with!r}")
    for name in ("steps", "batch_size", "gradient_accumulation", "save_every", "log_every"):
        if getattr(config.train, name) < 1:
            raise UsageError(f"{where}: train.{name} must be at least 1")
    _expand_home(config)
    if not config.data.hr and not (config.data.lr_dir and config.data.hr_dir):
        raise UsageError(f"{where}: data needs 'hr' (folders degraded on the fly) or 'lr_dir' and 'hr_dir' (pairs)")
    return config


def _home(value):
    """'~/x' -> the user's home; anything else as it is (hub ids, numbers)."""
    return str(Path(value).expanduser()) if isinstance(value, str) and value.startswith("~") else value


def _expand_home(config: TrainConfig) -> None:
    config.base, config.output_dir, config.weights = map(_home, (config.base, config.output_dir, config.weights))
    config.data.hr = [_home(v) for v in config.data.hr]
    config.data.lr_dir, config.data.hr_dir = _home(config.data.lr_dir), _home(config.data.hr_dir)
    config.validation.images = [_home(v) for v in config.validation.images]
    config.method_args = {k: _home(v) for k, v in config.method_args.items()}


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML training config; `overrides` ({"train.steps": 10, ...}) replace single values. Relative
    paths are relative to the working directory; '~' is the home folder."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as error:
        raise UsageError(f"{path}: cannot read ({error.strerror})") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({first_line(error)})") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: a training config must be a mapping")
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config_from_dict(values, str(path))
