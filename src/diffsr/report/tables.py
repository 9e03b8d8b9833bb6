"""Benchmark tables (markdown, CSV) and the papers' reference numbers beside ours."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from diffsr.metrics.evaluate import csv_table, markdown_table

DATASET_ALIASES = {"div2k": "DIV2K-Val", "div2k-val": "DIV2K-Val", "div2kval": "DIV2K-Val", "realsr": "RealSR",
                   "drealsr": "DRealSR"}


@lru_cache(maxsize=1)
def paper_results() -> dict:
    return json.loads((resources.files("diffsr.report") / "data" / "paper_results.json").read_text())


def dataset_name(name: str | None) -> str | None:
    if not name:
        return None
    return DATASET_ALIASES.get(name.strip().lower().replace("_", "-"), name.strip())


def paper_rows(dataset: str | None, methods: list[str]) -> list[dict]:
    """The papers' rows for these methods on this dataset (none when the dataset is not one of theirs)."""
    dataset = dataset_name(dataset)
    return [row for row in paper_results()["rows"] if row["dataset"] == dataset and row["method"] in methods]


def reference_label(row: dict) -> str:
    if "variant" in row:
        return row["variant"]
    return f"{row['steps']} step{'s' if row['steps'] != 1 else ''}" if "steps" in row else "paper"


def benchmark_markdown(bench) -> str:
    header, rows = bench.table()
    text = markdown_table(header, rows)
    text += f"\n{len(bench.methods)} method(s) on {bench.lr_dir} (x{bench.scale:g}), ground truth {bench.gt_dir}, " \
            f"device {bench.device}" + (f", {bench.runs} runs per method (means)" if bench.runs > 1 else "") + "\n"
    deviations = stability_table(bench)
    if deviations:
        text += f"\nG-STD over the {bench.runs} runs (CCSR eq. 4; lower is more stable):\n\n" + markdown_table(*deviations)
    notes = [f"- {metric}: not computed: {why}" for metric, why in bench.unavailable.items()]
    notes += [f"- {m.name}: not run: {m.error}" for m in bench.methods if m.error]
    for method in bench.methods:
        if method.evaluation is not None:
            problems = method.evaluation.to_dict()["problems"]
            notes += [f"- {method.name}: {p}" for p in problems]
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    references = paper_rows(bench.dataset, [m.name for m in bench.methods])
    if references:
        metrics = [m for m in bench.metrics if any(m in r["metrics"] for r in references)]
        ref_rows = [[f"{r['method']} ({reference_label(r)}, paper)"]
                    + [r["metrics"].get(m) for m in metrics] for r in references]
        ours = [[f"{m.name} (ours)"] + [m.summary().get(x) for x in metrics] for m in bench.methods]
        text += f"\n## Beside the papers ({dataset_name(bench.dataset)})\n\n" + markdown_table(["method"] + metrics, ours + ref_rows)
        text += "\nSources: " + "; ".join(sorted({r["source"] for r in references})) + "\n"
    return text


def stability_table(bench) -> tuple[list[str], list[list]] | None:
    """G-STD per method and metric when each method ran several times; None otherwise."""
    if bench.runs < 2:
        return None
    metrics = [m for m in bench.metrics if any(m in getattr(r.evaluation, "g_std", {}) for r in bench.methods)]
    rows = [[r.name] + [getattr(r.evaluation, "g_std", {}).get(m) for m in metrics] for r in bench.methods]
    return (["method"] + metrics, rows) if metrics else None


def benchmark_csv(bench) -> str:
    return csv_table(*bench.table())
