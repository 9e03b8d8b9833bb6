"""Benchmark: upscale one LR folder with several methods, evaluate each against the GT, keep time and memory.

Methods run through the public API (`diffsr.load_upscaler`, `Upscaler.upscale`); 'bicubic' is a
baseline (PIL bicubic), and finished results from other tools can be included as folders.
Outputs: OUT/<method>/ (or OUT/<method>/seed<k>/ with several runs), results.md/.csv/.json, report.html.
"""

from __future__ import annotations

import json
import resource
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from diffsr.batch import Display, plan_share, upscale_all
from diffsr.distributed import Processes
from diffsr.errors import DiffsrError, UsageError, first_line
from diffsr.images import MAX_INPUT_PIXELS, check_output_folder, collect_inputs, read_image, resize_picture
from diffsr.metrics.evaluate import Evaluation, RunsEvaluation, build_metrics, evaluate, evaluate_runs, parse_metric_names

BASELINE = "bicubic"


@dataclass
class MethodResult:
    name: str
    folders: list[Path]  # one per run
    seconds_per_image: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = ""  # what peak_memory_mb measured (GPU_PEAK, RSS_PEAK or RSS_SO_FAR)
    evaluation: Evaluation | RunsEvaluation | None = None
    error: str | None = None  # why the method could not run

    def summary(self) -> dict[str, float]:
        return self.evaluation.summary() if self.evaluation else {}


@dataclass
class Benchmark:
    methods: list[MethodResult]
    metrics: list[str]
    lr_dir: Path
    gt_dir: Path | None
    output: Path
    scale: float
    runs: int
    device: str
    dataset: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    def table(self) -> tuple[list[str], list[list]]:
        metrics = [m for m in self.metrics if m not in self.unavailable]
        stability = ["l-std"] if self.runs > 1 else []
        rows = []
        for method in self.methods:
            summary = method.summary()
            l_std = [getattr(method.evaluation, "l_std", None)] if stability else []
            rows.append([method.name] + [summary.get(m) for m in metrics] + l_std
                        + [method.seconds_per_image, method.peak_memory_mb])
        return ["method"] + metrics + stability + ["s/image", "peak MB"], rows

    def to_dict(self) -> dict:
        return {
            "lr_dir": str(self.lr_dir), "gt_dir": str(self.gt_dir) if self.gt_dir else None, "scale": self.scale,
            "runs": self.runs, "device": self.device, "dataset": self.dataset, "metrics": self.metrics,
            "unavailable": self.unavailable,
            "methods": [{"name": m.name, "folders": [str(f) for f in m.folders], "seconds_per_image": m.seconds_per_image,
                         "peak_memory_mb": m.peak_memory_mb, "memory_kind": m.memory_kind, "error": m.error,
                         "evaluation": m.evaluation.to_dict() if m.evaluation else None} for m in self.methods],
        }


def parse_assignments(items: list[str], what: str) -> tuple[dict[str, str], str | None]:
    """['osediff=a.pkl', 'DIR'] -> ({'osediff': 'a.pkl'}, 'DIR') (a bare value applies to every method)."""
    per_method, default = {}, None
    for item in items:
        if "=" in item:
            name, value = item.split("=", 1)
            per_method[name.strip().lower()] = value
        elif default is None:
            default = item
        else:
            raise UsageError(f"{what}: give one value for all methods or METHOD=VALUE pairs, not '{item}'")
    return per_method, default


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


GPU_PEAK = "GPU allocated, peak while upscaling"
RSS_PEAK = "process RSS, peak while upscaling (reset per method)"
RSS_SO_FAR = "process RSS, process-wide peak so far (not resettable here: only grows across methods)"


def start_peak_memory(device) -> str:
    """Reset the peak-memory counter before a method upscales; returns what peak_memory_mb will measure.
    CUDA: torch's peak allocation. CPU on Linux: the process's peak resident size (VmHWM), reset through
    /proc/self/clear_refs, so each method's figure is its own (the loaded model and the process's baseline
    included; freed memory goes back to the system first where the command line's allocator setting is on,
    tiling.return_freed_memory); elsewhere the process-wide peak."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return GPU_PEAK
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return RSS_SO_FAR
    return RSS_PEAK


def peak_memory_mb(device, kind: str) -> float:
    import torch

    if kind == GPU_PEAK:
        return torch.cuda.max_memory_allocated(device) / 2**20
    if kind == RSS_PEAK:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return _peak_rss_mb()


def upscale_folder(upscale, lr_paths: list[Path], out_dir: Path, seed: int, failures: list[str],
                   processes: Processes | None = None, display: Display | None = None, title: str = "") -> float:
    """Upscale every LR image into out_dir (PNG, same stem) through diffsr.batch, each process its part
    (`upscale(picture, seed, callback)`; `display`: its progress); returns the seconds all processes spent
    reading and upscaling, once every process is done (the outputs are all there)."""
    processes = processes or Processes()
    plan = plan_share(lr_paths, out_dir, "png", True, processes)

    def read_and_upscale(path, callback):
        return upscale(read_image(path, MAX_INPUT_PIXELS), seed, callback)

    report = upscale_all(plan, read_and_upscale, display=display, title=title)
    for line in report.warnings:
        warnings.warn(line, stacklevel=2)
    done = processes.gather((report.seconds, report.failures))
    failures.extend(line for _, lines in done for line in lines)
    return sum(seconds for seconds, _ in done)


def bicubic(scale: float):
    def upscale(picture, seed, callback=None):
        width, height = picture.size
        return resize_picture(picture, (round(width * scale), round(height * scale)), "bicubic")
    return upscale


def run_method(name: str, lr_paths: list[Path], output: Path, scale: float, seeds: list[int], device: str,
               dtype: str, base: str | None, weights: str | None, options: dict, failures: list[str],
               knobs: dict | None = None, processes: Processes | None = None,
               display: Display | None = None) -> MethodResult:
    """Upscale the LR images once per seed; in a launched job each process loads the model once, on its own
    device, and upscales its part. seconds_per_image is the time of one process per image. `knobs`: upscale
    knobs (steps, fidelity, tile_size, ...); the method gets those it takes, checked before any image.
    `display`: the progress of each image (diffsr.batch.Display)."""
    import diffsr
    from diffsr.tiling import TILING_KNOBS

    processes = processes or Processes()
    device = processes.device(device)
    folders = [output / name] if len(seeds) == 1 else [output / name / f"seed{s}" for s in seeds]
    for folder in folders:  # before the model is loaded
        check_output_folder(folder)
    if name == BASELINE:
        upscale = bicubic(scale)
    else:
        try:
            upscaler, error = diffsr.load_upscaler(name, base=base, weights=weights, device=device, dtype=dtype,
                                                   **options), None
            own = {key: value for key, value in (knobs or {}).items()
                   if key in upscaler.knob_names() or key in TILING_KNOBS}
            upscaler.check_arguments(scale, seeds[0], None, own)
        except (DiffsrError, TypeError, RuntimeError) as raised:
            upscaler, error = None, raised
        # All processes go on together or stop together (one that stops alone would leave the others waiting).
        others = [line for line in processes.gather(first_line(error) if error else None) if line]
        if error:
            raise error
        if others:
            raise UsageError(f"another process: {others[0]}")

        def upscale(picture, seed, callback):
            return upscaler.upscale(picture, scale=scale, seed=seed, callback=callback, **own)
    memory_kind = start_peak_memory(device)
    spent = sum(upscale_folder(upscale, lr_paths, folder, seed, failures, processes, display,
                               f"{name} x{scale:g}" + (f" seed {seed}" if len(seeds) > 1 else ""))
                for folder, seed in zip(folders, seeds))
    done = len(lr_paths) * len(seeds)
    result = MethodResult(name, folders, seconds_per_image=spent / done if done else None)
    result.memory_kind = memory_kind
    result.peak_memory_mb = max(processes.gather(peak_memory_mb(device, memory_kind)))  # the largest process's
    return result


def check_knobs_taken(knobs: dict, methods: list[str]) -> None:
    """Refuse knobs that none of `methods` takes (a typo or a forgotten method must not silently do nothing)."""
    from diffsr.methods import METHODS
    from diffsr.tiling import TILING_KNOBS

    takes = set(TILING_KNOBS).union(*(METHODS[m].knob_names() for m in methods if m in METHODS))
    unused = [name for name in knobs if name not in takes]
    if unused:
        raise UsageError(f"no method of {', '.join(methods)} takes {', '.join(unused)}")


def run_benchmark(methods: list[str], lr_dir, gt_dir, output, metrics=None, scale: float = 4, seed: int = 0,
                  runs: int = 1, device: str = "cpu", dtype: str = "auto", bases: list[str] = (),
                  weights: list[str] = (), de_nets: list[str] = (), results: list[str] = (), metric_device=None,
                  metric_backend: str = "auto", metric_weights=None, download: bool = True, crop_border: int = 0,
                  dataset: str | None = None, knobs: dict | None = None, progress=None, log=print,
                  processes: Processes | None = None, display: Display | None = None) -> Benchmark:
    """`knobs`: upscale knobs, each passed to the methods that take it (one no listed method takes is refused).
    `display`: the progress of each image while upscaling (diffsr.batch.Display); `progress`: evaluation's."""
    lr_dir, output = Path(lr_dir), Path(output)
    gt_dir = Path(gt_dir) if gt_dir else None
    lr_paths = collect_inputs([lr_dir])
    if not lr_paths:
        raise UsageError(f"{lr_dir}: no images found")
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    names = parse_metric_names(metrics)
    base_for, default_base = parse_assignments(list(bases), "--base")
    weights_for, _ = parse_assignments(list(weights), "--weights")
    de_net_for, _ = parse_assignments(list(de_nets), "--de-net")
    external, _ = parse_assignments(list(results), "--results")
    seeds = [seed + k for k in range(runs)]
    names_of_methods = [m.strip().lower() for m in methods if m.strip()]
    check_knobs_taken(knobs or {}, names_of_methods)
    processes = processes or Processes()
    built = build_metrics(names, processes.device(metric_device or device), metric_backend, metric_weights, download,
                          crop_border, has_gt=gt_dir is not None)
    bench = Benchmark([], names, lr_dir, gt_dir, output, scale, runs, device, dataset, unavailable=dict(built[1]))
    for name in names_of_methods:
        failures: list[str] = []
        log(f"{name}: upscaling {len(lr_paths)} image(s) x {runs} run(s)")
        try:
            options = {"de_net": de_net_for[name]} if name in de_net_for else {}
            result = run_method(name, lr_paths, output, scale, seeds, device, dtype, base_for.get(name, default_base),
                                weights_for.get(name), options, failures, knobs, processes, display)
        except (DiffsrError, TypeError, RuntimeError) as error:
            bench.methods.append(MethodResult(name, [], error=first_line(error)))
            log(f"{name}: cannot run: {bench.methods[-1].error}")
            continue
        for failure in failures:
            log(f"{name}: {failure}")
        bench.methods.append(result)
    for name, folder in external.items():
        bench.methods.append(MethodResult(name, [Path(folder)]))
    for method in bench.methods:
        if not method.folders:
            continue
        log(f"{method.name}: evaluating")
        if len(method.folders) > 1:
            method.evaluation = evaluate_runs(method.folders, gt_dir, names, built=built, progress=progress,
                                              processes=processes)
        else:
            method.evaluation = evaluate(method.folders[0], gt_dir, names, built=built, progress=progress,
                                         processes=processes)
    return bench


def write_outputs(bench: Benchmark, title: str = "diffsr benchmark", show=None, crops=None) -> dict[str, Path]:
    """results.md, results.csv, results.json and report.html in the benchmark's output folder (`show` and
    `crops`: see report.html.write_report)."""
    from diffsr.report.html import write_report
    from diffsr.report.tables import benchmark_csv, benchmark_markdown

    bench.output.mkdir(parents=True, exist_ok=True)
    paths = {"md": bench.output / "results.md", "csv": bench.output / "results.csv",
             "json": bench.output / "results.json", "html": bench.output / "report.html"}
    paths["md"].write_text(f"# {title}\n\n" + benchmark_markdown(bench))
    paths["csv"].write_text(benchmark_csv(bench))
    paths["json"].write_text(json.dumps(bench.to_dict(), indent=1, default=float) + "\n")
    write_report(bench, paths["html"], title, show=show, crops=crops)
    return paths

