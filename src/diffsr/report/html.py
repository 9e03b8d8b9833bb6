"""The benchmark as one self-contained HTML file: results table, perception-distortion plot, time and
memory per method, and per-image side-by-side views with a shared zoom. Images are embedded (data
URLs) and the plot is inline SVG, so the file can be mailed or archived as is."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffsr.errors import UsageError

from diffsr.images import read_image, to_pil
from diffsr.metrics.evaluate import column_title
from diffsr.metrics.registry import get_spec
from diffsr.report.tables import dataset_name, paper_rows, reference_label, stability_table

# (x, y) metric pairs for the perception-distortion plot, first available wins
PLOT_AXES = (("psnr", "lpips"), ("psnr", "dists"), ("ssim", "lpips"), ("psnr", "niqe"))
MAX_SHOWN = 8  # images with panels unless --show says otherwise
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1600px; color: #222; padding: 0 16px; }
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
/* every panel of an image on one row at any window width: the ground truth stays beside the outputs */
.panels { display: flex; flex-wrap: nowrap; gap: 8px; }
.panel { flex: 1 1 0; min-width: 0; max-width: 320px; }
.view { width: 100%; aspect-ratio: 1; overflow: hidden; border: 1px solid #ccc; background: #f4f4f4; cursor: crosshair; }
.crops { margin-top: 6px; }
.crop-row { display: flex; flex-wrap: nowrap; gap: 8px; align-items: flex-start; overflow-x: auto; margin: 4px 0; }
.crop-row figure { margin: 0; flex: none; }
.crop-row img { display: block; image-rendering: pixelated; border: 2px solid; }
.crop-row figcaption { font-size: 11px; color: #444; }
.plot-caption { color: #444; max-width: 640px; }
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
  var rows = 0;  // the most rows any image's panels take (1: the ground truth is beside the outputs)
  document.querySelectorAll('.panels').forEach(function (panels) {
    var tops = {};
    panels.querySelectorAll('.panel').forEach(function (p) { tops[Math.round(p.getBoundingClientRect().top)] = 1; });
    rows = Math.max(rows, Object.keys(tops).length);
  });
  var crops = document.querySelectorAll('.crop-row img').length;
  document.getElementById('self-check').textContent =
    'images ' + decoded + '/' + imgs.length + '; plot points ' + points + '; panel rows ' + rows + '; crops ' + crops;
});
"""


def data_url(picture, max_side: int | None = None) -> str:
    image = to_pil(picture.rgb)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.BICUBIC)
    return _png_url(image)


def _png_url(image) -> str:
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


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k apart) covering [low, high]: readable axis labels. (Hand-written:
    matplotlib is not a dependency and the plot is inline SVG.)"""
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]
    digits = max(0, -math.floor(math.log10(step)))
    return [round(t, digits) for t in ticks]


def _tick_text(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{digits}f}"


def scatter_plot(bench) -> str:
    """Inline SVG of the methods' mean scores: distortion (x) against perception (y), better towards top right,
    with a caption naming the two metrics it uses."""
    for x_name, y_name in PLOT_AXES:
        points = [(m.name, m.summary().get(x_name), m.summary().get(y_name)) for m in bench.methods]
        points = [(n, x, y) for n, x, y in points if x is not None and y is not None]
        if points:
            break
    else:
        return '<p class="notes">No perception-distortion plot: it needs PSNR or SSIM and LPIPS, DISTS or NIQE.</p>'
    width, height, pad = 640, 400, 64
    xs, ys = [p[1] for p in points], [p[2] for p in points]

    def span(values):
        low, high = min(values), max(values)
        margin = (high - low) * 0.15 or abs(high) * 0.05 or 1.0
        low = low - margin if low - margin > 0 or low < 0 else 0.0  # no negative axis for scores >= 0
        return nice_ticks(low, high + margin)

    x_ticks, y_ticks = span(xs), span(ys)
    (x0, x1), (y0, y1) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
    y_lower_better = get_spec(y_name).lower_better

    def sx(v):
        return pad + (v - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(v):  # perception axis drawn so that "better" is up
        t = (v - y0) / (y1 - y0)
        return pad + (t if y_lower_better else 1 - t) * (height - 2 * pad)

    parts = [f'<svg id="pd-plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="perception-distortion plot">',
             f'<rect x="{pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" fill="#fafafa" stroke="#bbb"/>']
    for xv in x_ticks:
        parts.append(f'<line x1="{sx(xv):.1f}" y1="{pad}" x2="{sx(xv):.1f}" y2="{height - pad}" stroke="#e4e4e4"/>')
        parts.append(f'<text class="tick" x="{sx(xv):.1f}" y="{height - pad + 18}" text-anchor="middle">'
                     f'{_tick_text(xv, x_ticks)}</text>')
    for yv in y_ticks:
        parts.append(f'<line x1="{pad}" y1="{sy(yv):.1f}" x2="{width - pad}" y2="{sy(yv):.1f}" stroke="#e4e4e4"/>')
        parts.append(f'<text class="tick" x="{pad - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">'
                     f'{_tick_text(yv, y_ticks)}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 18}" text-anchor="middle">{html.escape(column_title(x_name))} '
                 '(distortion: right is better)</text>')
    parts.append(f'<text transform="translate(16 {height / 2}) rotate(-90)" text-anchor="middle">'
                 f'{html.escape(column_title(y_name))} (perception: {"lower" if y_lower_better else "higher"} is '
                 'better, drawn up)</text>')
    for i, (name, x, y) in enumerate(points):
        color = COLORS[i % len(COLORS)]
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="6" fill="{color}"><title>{html.escape(name)}: '
                     f'{x_name} {x:.4f}, {y_name} {y:.4f}</title></circle>')
        parts.append(f'<text x="{sx(x) + 9:.1f}" y="{sy(y) + 4:.1f}" fill="{color}">{html.escape(name)}</text>')
    parts.append("</svg>")
    caption = (f'<p class="plot-caption" id="pd-caption">Each point is one method\'s mean over the images: '
               f'<b>{html.escape(column_title(x_name))}</b> (x, a distortion metric) against '
               f'<b>{html.escape(column_title(y_name))}</b> (y, a perception metric). The plot uses the first pair '
               f'computed of {", ".join(f"{a.upper()}/{b.upper()}" for a, b in PLOT_AXES)}.</p>')
    return "\n".join(parts) + "\n" + caption


# -- side by side ---------------------------------------------------------------------------------------

CROP_COLORS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4")
AUTO_CROPS, AUTO_CROP_SIZE = 2, 96


@dataclass(frozen=True)
class Crop:
    """A square region in the pixels of the ground truth (or of the outputs where there is none)."""

    x: int
    y: int
    size: int

    def scaled(self, factor_x: float, factor_y: float) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in a picture `factor` times the reference size."""
        return (round(self.x * factor_x), round(self.y * factor_y), round((self.x + self.size) * factor_x),
                round((self.y + self.size) * factor_y))


def parse_crop(text: str) -> Crop:
    """'X,Y,SIZE' (pixels of the ground truth / outputs) -> Crop; one UsageError line otherwise."""
    try:
        x, y, size = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--crop {text}: expected X,Y,SIZE in pixels, e.g. 120,80,96") from None
    if x < 0 or y < 0 or size < 4:
        raise UsageError(f"--crop {text}: X and Y must be >= 0 and SIZE at least 4")
    return Crop(x, y, size)


def detailed_regions(picture, count: int = AUTO_CROPS, size: int | None = None) -> list[Crop]:
    """The `count` most detailed square regions (most Laplacian energy), not overlapping: where methods
    differ most. Size: AUTO_CROP_SIZE, or a third of a smaller image's short side. (cv2 filters; the
    selection is a few lines of numpy.)"""
    import cv2

    gray = to_pil(picture.rgb).convert("L")
    width, height = gray.size
    size = max(4, min(size or min(AUTO_CROP_SIZE, min(width, height) // 3), width, height))
    energy = np.abs(cv2.Laplacian(np.asarray(gray, dtype=np.float32), cv2.CV_32F))
    summed = cv2.boxFilter(energy, -1, (size, size), normalize=False, anchor=(0, 0),
                           borderType=cv2.BORDER_CONSTANT)[: height - size + 1, : width - size + 1]
    crops = []
    for _ in range(count):
        if not np.isfinite(summed).any() or summed.max() < 0:
            break
        y, x = np.unravel_index(int(np.argmax(summed)), summed.shape)
        crops.append(Crop(int(x), int(y), size))
        summed[max(0, y - size + 1): y + size, max(0, x - size + 1): x + size] = -1  # no overlap with this one
    return crops


def _boxed(picture, crops: list[Crop], reference_size: tuple[int, int]):
    """The picture with each crop's box drawn on it (8-bit PIL, for the report)."""
    from PIL import ImageDraw

    image = to_pil(picture.rgb).convert("RGB")
    factor_x, factor_y = image.width / reference_size[0], image.height / reference_size[1]
    draw = ImageDraw.Draw(image)
    line = max(1, round(min(image.size) / 200))
    for i, crop in enumerate(crops):
        left, top, right, bottom = crop.scaled(factor_x, factor_y)
        draw.rectangle((left, top, right - 1, bottom - 1), outline=CROP_COLORS[i % len(CROP_COLORS)], width=line)
    return image


def _crop_of(picture, crop: Crop, reference_size: tuple[int, int]):
    """The crop's region of `picture` at 1:1 in reference pixels (a smaller picture, the LR input, is enlarged
    by nearest neighbour to the reference's scale)."""
    image = to_pil(picture.rgb).convert("RGB")
    factor_x, factor_y = image.width / reference_size[0], image.height / reference_size[1]
    region = image.crop(crop.scaled(factor_x, factor_y))
    return region.resize((crop.size, crop.size), Image.NEAREST) if region.size != (crop.size, crop.size) else region


def chosen_images(lr_paths: list[Path], show) -> list[Path]:
    """The LR images that get panels: `show` None -> the first MAX_SHOWN, "all", a number N (the first N), or
    names (file names or stems; an unknown one is a UsageError)."""
    if show is None:
        return lr_paths[:MAX_SHOWN]
    if isinstance(show, int):
        return lr_paths[:show]
    if show == "all":
        return lr_paths
    wanted = list(show)
    by_name = {**{p.stem: p for p in lr_paths}, **{p.name: p for p in lr_paths}}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise UsageError(f"--show: no LR image named {', '.join(unknown)} (images: "
                         f"{', '.join(p.name for p in lr_paths[:10])}{', ...' if len(lr_paths) > 10 else ''})")
    return list(dict.fromkeys(by_name[w] for w in wanted))


def parse_show(text: str | None):
    """--show: None, 'all', a number, or comma-separated image names."""
    if text is None:
        return None
    text = text.strip()
    if text == "all":
        return "all"
    if text.isdigit():
        return int(text)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError("--show: give image names (comma-separated), a number or 'all'")
    return names


def comparisons(bench, show=None, crops: list[Crop] | None = None) -> str:
    """Per chosen image: every panel on one row (LR, each method, the ground truth) with a shared zoom, the
    crop boxes drawn on them, and below, each crop at 1:1 from every panel side by side. Crops: the given
    ones (ground-truth pixels), else the AUTO_CROPS most detailed regions of the ground truth (or the first
    output)."""
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
    for lr_path in chosen_images(collect_inputs([bench.lr_dir]), show):
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
        reference = gt_picture if gt_picture is not None else panels[-1][1]
        reference_size = reference.size
        regions = list(crops) if crops else detailed_regions(reference)
        cells = "".join(
            f'<div class="panel"><div class="view"><img alt="{html.escape(label)}" '
            f'src="{_png_url(_boxed(picture, regions, reference_size))}"></div>'
            f'<div class="label"><b>{html.escape(label)}</b> {html.escape(caption)}</div></div>'
            for label, picture, caption in panels)
        rows = []
        for i, crop in enumerate(regions):
            color = CROP_COLORS[i % len(CROP_COLORS)]
            figures = "".join(
                f'<figure><img alt="{html.escape(label)} crop {i + 1}" width="{crop.size}" height="{crop.size}" '
                f'style="border-color: {color}" src="{_png_url(_crop_of(picture, crop, reference_size))}">'
                f"<figcaption>{html.escape(label)}</figcaption></figure>"
                for label, picture, _ in panels)
            rows.append(f'<div class="crop-row" title="crop {i + 1}: x {crop.x}, y {crop.y}, {crop.size} px">'
                        f"{figures}</div>")
        where = "given" if crops else "picked automatically: the most detailed regions"
        blocks.append(f'<div class="compare"><h3>{html.escape(lr_path.name)}</h3>'
                      f'<div class="controls">zoom <input type="range" min="1" max="8" step="1" value="1"> '
                      f'<span class="zoom">1x</span> · click a panel to zoom there (all panels follow)</div>'
                      f'<div class="panels">{cells}</div>'
                      f'<div class="crops"><div class="meta">1:1 crops ({where}; boxes on the images above)'
                      f'</div>{"".join(rows)}</div></div>')
    return "\n".join(blocks)


def write_report(bench, path: Path, title: str = "diffsr benchmark", show=None,
                 crops: list[Crop] | None = None) -> Path:
    """`show`: which LR images get panels (chosen_images); `crops`: 1:1 regions (default: picked per image)."""
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
        + ".</p>",
    ]
    if notes:
        body.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    body += ["<h2>Perception vs distortion</h2>", scatter_plot(bench),
             "<h2>Side by side</h2>", comparisons(bench, show, crops),
             '<p class="meta">Self-check: <output id="self-check">not run (JavaScript off)</output></p>']
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n")
    path.write_text(page)
    return path
