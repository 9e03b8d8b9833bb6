"""The benchmark as one self-contained HTML file: results table, perception-distortion plot, time and
memory per method, and per-image side-by-side views with a shared zoom. Images are embedded (data
URLs) and the plot is inline SVG, so the file can be mailed or archived as is."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image

from diffsr.images import read_image, to_pil
from diffsr.metrics.evaluate import column_title
from diffsr.metrics.registry import get_spec
from diffsr.report.tables import dataset_name, paper_rows, reference_label, stability_table

# (x, y) metric pairs for the perception-distortion plot, first available wins
PLOT_AXES = (("psnr", "lpips"), ("psnr", "dists"), ("ssim", "lpips"), ("psnr", "niqe"))
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 32px; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.best { font-weight: 700; background: #eef6ee; }
tr.paper td { color: #777; font-style: italic; }
.notes { color: #8a5a00; }
.compare { margin: 18px 0 30px; }
.compare h3 { font-size: 15px; margin: 6px 0; }
.panels { display: flex; flex-wrap: wrap; gap: 8px; }
.panel { width: 260px; }
.view { width: 260px; height: 260px; overflow: hidden; border: 1px solid #ccc; background: #f4f4f4; cursor: crosshair; }
.view img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; transform-origin: 50% 50%; }
.label { font-size: 12px; color: #444; margin-top: 2px; }
.controls { font-size: 13px; color: #555; margin: 4px 0; }
svg text { font: 12px system-ui, sans-serif; }
"""

SCRIPT = """
// One zoom level and focus point per image row: every panel shows the same region.
document.querySelectorAll('.compare').forEach(function (row) {
  var slider = row.querySelector('input[type=range]');
  var images = row.querySelectorAll('.view img');
  var focus = [50, 50];
  function apply() {
    images.forEach(function (img) {
      img.style.transformOrigin = focus[0] + '% ' + focus[1] + '%';
      img.style.transform = 'scale(' + slider.value + ')';
    });
    row.querySelector('.zoom').textContent = slider.value + 'x';
  }
  slider.addEventListener('input', apply);
  row.querySelectorAll('.view').forEach(function (view) {
    view.addEventListener('click', function (event) {
      var box = view.getBoundingClientRect();
      focus = [100 * (event.clientX - box.left) / box.width, 100 * (event.clientY - box.top) / box.height];
      if (slider.value === '1') { slider.value = '4'; }
      apply();
    });
  });
});
// Self-check, read by the headless-browser test: did every image decode, did the plot draw?
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var decoded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var points = document.querySelectorAll('#pd-plot circle').length;
  document.getElementById('self-check').textContent =
    'images ' + decoded + '/' + imgs.length + '; plot points ' + points;
});
"""


def data_url(picture, max_side: int | None = None) -> str:
    image = to_pil(picture.rgb)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def results_table(bench) -> str:
    header, rows = bench.table()
    best = {}
    for column, name in enumerate(header[1:], start=1):
        try:
            lower_better = get_spec(name).lower_better
        except Exception:
            lower_better = name in ("s/image", "peak MB", "l-std")
        values = [row[column] for row in rows if isinstance(row[column], float)]
        if len(set(values)) > 1:
            best[column] = min(values) if lower_better else max(values)
    out = ["<table><tr>" + "".join(f"<th>{html.escape(column_title(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = [f"<td>{html.escape(str(row[0]))}</td>"]
        for column, value in enumerate(row[1:], start=1):
            mark = ' class="best"' if column in best and value == best[column] else ""
            cells.append(f"<td{mark}>{fmt(value, 2 if header[column] in ('s/image', 'peak MB') else 4)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    references = paper_rows(bench.dataset, [m.name for m in bench.methods])
    for ref in references:
        label = f"{ref['method']} ({reference_label(ref)}, paper)"
        cells = [f"<td>{html.escape(label)}</td>"] + [f"<td>{fmt(ref['metrics'].get(h))}</td>" for h in header[1:]]
        out.append('<tr class="paper">' + "".join(cells) + "</tr>")
    out.append("</table>")
    if references:
        out.append(f'<p class="meta">Grey rows: the papers\' numbers on {html.escape(dataset_name(bench.dataset))} '
                   f"({html.escape('; '.join(sorted({r['source'] for r in references})))}).</p>")
    return "\n".join(out)


def stability_html(bench) -> str:
    table = stability_table(bench)
    if table is None:
        return ""
    header, rows = table
    out = [f'<p class="meta">G-STD over the {bench.runs} runs per image (CCSR eq. 4; lower is more stable):</p><table><tr>'
           + "".join(f"<th>{html.escape(column_title(h))}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + f"<td>{html.escape(row[0])}</td>" + "".join(f"<td>{fmt(v)}</td>" for v in row[1:]) + "</tr>"
            for row in rows]
    return "\n".join(out) + "</table>"


def scatter_plot(bench) -> str:
    """Inline SVG of the methods' mean scores: distortion (x) against perception (y), better towards top right."""
    for x_name, y_name in PLOT_AXES:
        points = [(m.name, m.summary().get(x_name), m.summary().get(y_name)) for m in bench.methods]
        points = [(n, x, y) for n, x, y in points if x is not None and y is not None]
        if points:
            break
    else:
        return '<p class="notes">No perception-distortion plot: it needs PSNR or SSIM and LPIPS, DISTS or NIQE.</p>'
    width, height, pad = 640, 400, 60
    xs, ys = [p[1] for p in points], [p[2] for p in points]

    def span(values):
        low, high = min(values), max(values)
        margin = (high - low) * 0.15 or abs(high) * 0.05 or 1.0
        return (low - margin if low - margin > 0 or low < 0 else 0.0), high + margin  # no negative axis for scores >= 0

    (x0, x1), (y0, y1) = span(xs), span(ys)
    y_lower_better = get_spec(y_name).lower_better

    def sx(v):
        return pad + (v - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(v):  # perception axis drawn so that "better" is up
        t = (v - y0) / (y1 - y0)
        return pad + (t if y_lower_better else 1 - t) * (height - 2 * pad)

    parts = [f'<svg id="pd-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="perception-distortion plot">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="#fafafa" stroke="#bbb"/>']
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - pad + 18}" text-anchor="middle">{xv:.3g}</text>')
        parts.append(f'<text x="{pad - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 14}" text-anchor="middle">{html.escape(column_title(x_name))} '
                 '(distortion: right is better)</text>')
    parts.append(f'<text transform="translate(16 {height / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(column_title(y_name))} (perception: up is better)</text>')
    for i, (name, x, y) in enumerate(points):
        color = COLORS[i % len(COLORS)]
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{color}"><title>{html.escape(name)}: '
                     f'{x_name} {x:.4f}, {y_name} {y:.4f}</title></circle>')
        parts.append(f'<text x="{sx(x) + 9:.1f}" y="{sy(y) + 4:.1f}" fill="{color}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def comparisons(bench, max_images: int) -> str:
    from diffsr.images import collect_inputs

    def by_stem(folder) -> dict:
        """Each folder is listed once: file by name stem (the first, as collect_inputs sorts them)."""
        found: dict = {}
        for path in collect_inputs([folder]):
            found.setdefault(path.stem, path)
        return found

    methods = [(m, by_stem(m.folders[0])) for m in bench.methods if m.folders]
    gt_files = by_stem(bench.gt_dir) if bench.gt_dir is not None else {}
    blocks = []
    for lr_path in collect_inputs([bench.lr_dir])[:max_images]:
        panels = [("LR input", read_image(lr_path), "")]
        gt_path = gt_files.get(lr_path.stem)
        gt_picture = read_image(gt_path) if gt_path else None
        for method, files in methods:
            result = files.get(lr_path.stem)
            if result is None:
                continue
            scores = method.evaluation.runs[0].per_image if hasattr(method.evaluation, "runs") else \
                method.evaluation.per_image if method.evaluation else {}
            caption = ", ".join(f"{k} {v:.3f}" for k, v in scores.get(result.name, {}).items())
            panels.append((method.name, read_image(result), caption))
        if gt_picture is not None:
            panels.append(("ground truth", gt_picture, ""))
        cells = "".join(
            f'<div class="panel"><div class="view"><img alt="{html.escape(label)}" src="{data_url(picture)}"></div>'
            f'<div class="label"><b>{html.escape(label)}</b> {html.escape(caption)}</div></div>'
            for label, picture, caption in panels)
        blocks.append(f'<div class="compare"><h3>{html.escape(lr_path.name)}</h3>'
                      f'<div class="controls">zoom <input type="range" min="1" max="8" step="1" value="1"> '
                      f'<span class="zoom">1x</span> · click a panel to zoom there (all panels follow)</div>'
                      f'<div class="panels">{cells}</div></div>')
    return "\n".join(blocks)


def write_report(bench, path: Path, title: str = "diffsr benchmark", max_images: int = 8) -> Path:
    notes = [f"{metric}: not computed: {why}" for metric, why in bench.unavailable.items()]
    notes += [f"{m.name}: not run: {m.error}" for m in bench.methods if m.error]
    memory = sorted({m.memory_kind for m in bench.methods if m.memory_kind})
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">LR {html.escape(str(bench.lr_dir))} · GT {html.escape(str(bench.gt_dir))} · '
        f"x{bench.scale:g} · device {html.escape(bench.device)} · {bench.runs} run(s) per method"
        + (f" · dataset {html.escape(dataset_name(bench.dataset))}" if bench.dataset else "") + "</p>",
        "<h2>Results</h2>", results_table(bench), stability_html(bench),
        f'<p class="meta">s/image: upscaling time per image (model loading excluded). peak MB: '
        f"{html.escape(', '.join(memory) or 'n/a')}"
        + (" (process-wide peak so far, so it only grows across methods)" if "process RSS" in memory else "") + ".</p>",
    ]
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body += ["<h2>Perception vs distortion</h2>", scatter_plot(bench),
             "<h2>Side by side</h2>", comparisons(bench, max_images),
             '<p class="meta">Self-check: <output id="self-check">not run (JavaScript off)</output></p>']
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    path.write_text(page)
    return path
