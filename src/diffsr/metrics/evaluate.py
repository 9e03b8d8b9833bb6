"""Evaluate folders of results: SR images against ground truth matched by file name.

`evaluate(sr_dir, gt_dir, metrics)` scores every SR image that has a GT image of the same name (the
extension may differ), reports images without a partner and size mismatches by name, and computes
FID over the two sets. `evaluate_runs(run_dirs, gt_dir, metrics)` does that for N runs of one method
(different seeds) and adds CCSR's stability measures, G-STD per metric and L-STD.
A metric that cannot run here (weights or pyiqa missing) is reported with its reason; the others run.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffsr.distributed import Processes, pixel_counts
from diffsr.errors import DiffsrError, UsageError
from diffsr.images import collect_inputs, read_image
from diffsr.metrics.registry import (DEFAULT_METRICS, DISTRIBUTION, FULL_REFERENCE, SetFeatures, create_metric,
                                     get_spec)
from diffsr.metrics.stability import g_std, l_std

FORMATS = ("md", "csv", "json")


@dataclass
class Evaluation:
    """Scores of one folder of results."""

    metrics: list[str]  # requested, in order
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # image name -> metric -> value
    set_scores: dict[str, float] = field(default_factory=dict)  # distribution metrics (FID)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why it did not run
    problems: list[str] = field(default_factory=list)  # per-image problems (no GT, size mismatch, unreadable)

    def mean(self, metric: str) -> float | None:
        if metric in self.set_scores:
            return self.set_scores[metric]
        values = [scores[metric] for scores in self.per_image.values() if metric in scores]
        return float(np.mean(values)) if values else None

    def summary(self) -> dict[str, float]:
        """Mean of each metric over the images (FID: the set's score); metrics without values left out."""
        means = {metric: self.mean(metric) for metric in self.metrics}
        return {metric: value for metric, value in means.items() if value is not None}

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "summary": self.summary(), "per_image": self.per_image,
                "unavailable": self.unavailable, "problems": self.problems}

    def table(self) -> tuple[list[str], list[list]]:
        metrics = [m for m in self.metrics if m not in self.unavailable]
        per_image = [m for m in metrics if get_spec(m).kind != DISTRIBUTION]
        rows = [[name] + [scores.get(m) for m in per_image] for name, scores in self.per_image.items()]
        rows.append(["mean"] + [self.mean(m) for m in per_image])
        header = ["image"] + per_image
        set_metrics = [m for m in metrics if m in self.set_scores]
        for metric in set_metrics:  # FID is one number for the set: its own column, filled on the mean row
            header.append(metric)
            for row in rows:
                row.append(self.set_scores[metric] if row[0] == "mean" else None)
        return header, rows


@dataclass
class RunsEvaluation:
    """N runs of one method (different seeds): mean over runs, G-STD per metric, L-STD."""

    runs: list[Evaluation]
    g_std: dict[str, float]
    l_std: float | None

    @property
    def metrics(self) -> list[str]:
        return self.runs[0].metrics

    def summary(self) -> dict[str, float]:
        means = {}
        for metric in self.metrics:
            values = [run.mean(metric) for run in self.runs if run.mean(metric) is not None]
            if values:
                means[metric] = float(np.mean(values))
        return means

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "runs": len(self.runs), "summary": self.summary(), "g_std": self.g_std,
                "l_std": self.l_std, "unavailable": self.runs[0].unavailable,
                "problems": sorted({p for run in self.runs for p in run.problems}),
                "per_run": [run.to_dict() for run in self.runs]}

    def table(self) -> tuple[list[str], list[list]]:
        summary = self.summary()
        rows = [[m, summary[m], self.g_std.get(m)] for m in self.metrics if m in summary]
        if self.l_std is not None:
            rows.append(["l-std", self.l_std, None])
        return ["metric", f"mean of {len(self.runs)} runs", "G-STD"], rows


def column_title(name: str) -> str:
    """'lpips' -> 'LPIPS ↓' for people; other column names unchanged."""
    try:
        spec = get_spec(name)
    except UsageError:
        return "L-STD (pixels in [0, 1])" if name == "l-std" else name
    return f"{spec.name.upper()} {'↓' if spec.lower_better else '↑'}"


def match_images(sr_dir: Path, gt_dir: Path | None) -> tuple[list[tuple[Path, Path | None]], list[str]]:
    """Pair each SR image with the GT image of the same name (stem); name the ones without a partner, and
    the ambiguous ones (two files of one name on either side: none of them is scored, never a silent pick)."""
    if not sr_dir.is_dir():
        raise UsageError(f"{sr_dir}: no such result folder")
    sr_paths = collect_inputs([sr_dir])
    if not sr_paths:
        raise UsageError(f"{sr_dir}: no images found")
    if gt_dir is None:
        return [(path, None) for path in sr_paths], []
    if not gt_dir.is_dir():
        raise UsageError(f"{gt_dir}: no such ground-truth folder")
    gt_paths = collect_inputs([gt_dir])
    if not gt_paths:
        raise UsageError(f"{gt_dir}: no ground-truth images found")
    sr_by_stem, gt_by_stem = _by_stem(sr_paths), _by_stem(gt_paths)
    pairs, problems = [], []
    for stem, results in sr_by_stem.items():
        truths = gt_by_stem.pop(stem, [])
        names = ", ".join(path.name for path in results)
        if len(results) > 1:
            problems.append(f"{names}: several results of one name in {sr_dir}, none is scored; keep one")
        elif len(truths) > 1:
            problems.append(f"{names}: ambiguous ground truth {', '.join(p.name for p in truths)} in {gt_dir}, "
                            "not scored; keep one")
        elif truths:
            pairs.append((results[0], truths[0]))
        else:
            problems.append(f"{names}: no ground truth named {stem}.* in {gt_dir}")
    problems += [f"{path.name}: ground truth without a result in {sr_dir}" for paths in gt_by_stem.values()
                 for path in paths]
    if not pairs:
        raise UsageError(f"no image in {sr_dir} has a ground truth of the same name in {gt_dir}")
    return pairs, problems


def _by_stem(paths: list[Path]) -> dict[str, list[Path]]:
    grouped: dict[str, list[Path]] = {}
    for path in paths:
        grouped.setdefault(path.stem, []).append(path)
    return grouped


def build_metrics(names, device="cpu", backend="auto", weights_dir=None, download=True, crop_border=0,
                  has_gt=True) -> tuple[dict, dict[str, str]]:
    """Create the metrics that can run; return them and {name: reason} for the others."""
    built, unavailable = {}, {}
    for name in names:
        spec = get_spec(name)
        if not has_gt and spec.kind in (FULL_REFERENCE, DISTRIBUTION):
            unavailable[spec.name] = "needs ground truth (--gt)"
            continue
        options = {"crop_border": crop_border} if crop_border and spec.name in ("psnr", "ssim", "niqe") else {}
        try:
            built[spec.name] = create_metric(spec.name, device=device, backend=backend, weights_dir=weights_dir,
                                             download=download, **options)
        except DiffsrError as error:
            unavailable[spec.name] = str(error)
    return built, unavailable


def parse_metric_names(text: str | list[str] | None) -> list[str]:
    if text is None:
        return list(DEFAULT_METRICS)
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [get_spec(name).name for name in names if name.strip()]
    if not names:
        raise UsageError("no metric given")
    return list(dict.fromkeys(names))


def evaluate(sr_dir, gt_dir=None, metrics=None, device="cpu", backend="auto", weights_dir=None,
             download=True, crop_border: int = 0, built: tuple | None = None, progress=None,
             processes: Processes | None = None) -> Evaluation:
    """Score the images of `sr_dir` against `gt_dir` (same names). See the module docstring. In a launched job
    (`processes`) each process scores its part of the images and every process gets the whole result."""
    processes = processes or Processes()
    sr_dir, gt_dir = Path(sr_dir), (Path(gt_dir) if gt_dir is not None else None)
    names = parse_metric_names(metrics)
    pairs, problems = match_images(sr_dir, gt_dir)
    metric_objects, unavailable = built or build_metrics(names, device, backend, weights_dir, download, crop_border,
                                                         has_gt=gt_dir is not None)
    result = Evaluation(names, unavailable=dict(unavailable), problems=problems)
    image_metrics = {n: m for n, m in metric_objects.items() if m.kind != DISTRIBUTION}
    mine = processes.part(list(enumerate(pairs)), pixel_counts([sr_path for sr_path, _ in pairs]))
    scored = [(index, *_score_pair(sr_path, gt_path, image_metrics))
              for index, (sr_path, gt_path) in (progress(mine) if progress else mine)]
    scored = sorted(item for share in processes.gather(scored) for item in share)  # in the order of the pairs
    for index, scores, pair_problems in scored:
        result.problems += pair_problems
        if scores is not None:
            result.per_image[pairs[index][0].name] = scores
    done = [pairs[index] for index, scores, _ in scored if scores is not None]
    scored_sr = [sr_path for sr_path, _ in done]
    scored_gt = [gt_path for _, gt_path in done if gt_path is not None]
    for name, metric in metric_objects.items():
        if metric.kind == DISTRIBUTION:
            try:
                if isinstance(metric.compute, SetFeatures):  # each process its share of the features
                    result.set_scores[name] = _gathered_distance(metric.compute, scored_sr, scored_gt, processes)
                else:  # (pyiqa) the whole set in every process
                    result.set_scores[name] = metric.score(scored_sr, scored_gt)
            except (DiffsrError, ValueError) as error:
                result.unavailable[name] = str(error)
    return result


def _score_pair(sr_path: Path, gt_path: Path | None, image_metrics: dict) -> tuple[dict | None, list[str]]:
    """One image's scores (None if it cannot be read) and its problems."""
    try:
        sr = read_image(sr_path)
        gt = read_image(gt_path) if gt_path is not None else None
    except DiffsrError as error:
        return None, [str(error)]
    sr_tensor, gt_tensor = sr.to_tensor(), (gt.to_tensor() if gt is not None else None)  # once per pair
    scores, problems = {}, []
    for name, metric in image_metrics.items():
        if metric.kind == FULL_REFERENCE:
            if gt is None:
                continue
            if gt.size != sr.size:
                message = f"{sr_path.name}: size {sr.size[0]}x{sr.size[1]} differs from ground truth " \
                          f"{gt.size[0]}x{gt.size[1]}; full-reference metrics skipped"
                if message not in problems:
                    problems.append(message)
                continue
        try:
            scores[name] = metric(sr_tensor, gt_tensor) if metric.kind == FULL_REFERENCE else metric(sr_tensor)
        except (DiffsrError, ValueError) as error:  # e.g. an image too small for NIQE's blocks
            problems.append(f"{sr_path.name}: {name}: {error}")
    return scores, problems


def _gathered_distance(metric: SetFeatures, sr_paths: list[Path], gt_paths: list[Path],
                       processes: Processes) -> float:
    """The distance between the two sets' features, each process extracting its part; the features are put
    back in the order of the images, so the result is one process's to float precision."""
    def features(paths):
        mine = processes.part(list(enumerate(paths)), [1] * len(paths))
        try:
            found, error = metric.features([path for _, path in mine]), None
        except (DiffsrError, ValueError) as raised:  # said by every process alike, after the gathering
            found, error = None, str(raised)
        shares = processes.gather(([index for index, _ in mine], found, error))
        for _, _, error in shares:
            if error:
                raise ValueError(error)
        order = np.argsort(np.concatenate([indices for indices, _, _ in shares]), kind="stable")
        return np.concatenate([array for _, array, _ in shares])[order]

    return metric.distance(features(sr_paths), features(gt_paths))


def evaluate_runs(run_dirs, gt_dir=None, metrics=None, device="cpu", backend="auto", weights_dir=None,
                  download=True, crop_border: int = 0, built: tuple | None = None, progress=None,
                  processes: Processes | None = None) -> RunsEvaluation:
    """Evaluate N result folders of one method (same image names, different seeds) with stability measures."""
    run_dirs = [Path(d) for d in run_dirs]
    if len(run_dirs) < 2:
        raise UsageError("stability needs at least 2 runs")
    names = parse_metric_names(metrics)
    built = built or build_metrics(names, device, backend, weights_dir, download, crop_border,
                                   has_gt=gt_dir is not None)
    runs = [evaluate(d, gt_dir, names, built=built, progress=progress, processes=processes) for d in run_dirs]
    common = sorted(set.intersection(*(set(run.per_image) for run in runs)))
    deviations = {}
    for metric in names:
        table = [[run.per_image[image].get(metric, math.nan) for image in common] for run in runs]
        if common and not np.isnan(table).any():
            deviations[metric] = g_std(table)
    pixel_runs = []
    for image in common:
        pictures = [read_image(d / image).rgb for d in run_dirs]
        if len({p.shape for p in pictures}) == 1:
            pixel_runs.append(pictures)
    by_run = [list(run) for run in zip(*pixel_runs)]  # l_std takes outputs[run][image]
    return RunsEvaluation(runs, deviations, l_std(by_run) if pixel_runs else None)


def render(result: Evaluation | RunsEvaluation, fmt: str = "md", digits: int = 4) -> str:
    """The result as a markdown table, CSV, or JSON (with per-image scores and the problems found)."""
    if fmt == "json":
        return json.dumps(result.to_dict(), indent=1, default=float) + "\n"
    header, rows = result.table()
    if fmt == "csv":
        return csv_table(header, rows)
    if fmt != "md":
        raise UsageError(f"unknown format '{fmt}' (choose {', '.join(FORMATS)})")
    return markdown_table(header, rows, digits) + notes(result)


def csv_table(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row] for row in rows])
    return buffer.getvalue()


def markdown_table(header: list[str], rows: list[list], digits: int = 4) -> str:
    def cell(value):
        if value is None:
            return ""
        return f"{value:.{digits}f}" if isinstance(value, float) else column_title(str(value))

    lines = ["| " + " | ".join(column_title(h) for h in header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def notes(result) -> str:
    data = result.to_dict()
    lines = [f"- {metric}: not computed: {why}" for metric, why in data["unavailable"].items()]
    lines += [f"- {problem}" for problem in data["problems"]]
    return ("\n" + "\n".join(lines) + "\n") if lines else ""
