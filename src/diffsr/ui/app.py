"""The gradio layout of `diffsr ui`: an Upscale tab and a Compare tab over diffsr.ui.service.

Every run event shares one concurrency group of size 1: requests queue on the one device (no two models
running at once run it out of memory), and each one completes in turn.
"""

from __future__ import annotations

import html
import tempfile
import uuid
from pathlib import Path

import gradio as gr

from diffsr.color import COLOR_FIXES
from diffsr.errors import DiffsrError, first_line
from diffsr.methods import list_methods
from diffsr.ui import service
from diffsr.ui.service import CONTROLS, RELEASE_DEFAULT, TILING_CONTROLS, ModelCache, Settings

DEVICE_QUEUE = "device"  # the concurrency id every run event shares
COMPARE_METRICS = ("psnr", "ssim", "lpips")

CSS = """
.pixelated img { image-rendering: pixelated; }
.diffsr-compare .panels { display: flex; flex-wrap: nowrap; gap: 8px; }
.diffsr-compare .panel { flex: 1 1 0; min-width: 0; }
.diffsr-compare .view { aspect-ratio: 1; overflow: hidden; border: 1px solid #ccc; background: #f4f4f4; cursor: crosshair; }
.diffsr-compare .view img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
                            transform-origin: 50% 50%; }
.diffsr-compare .label { font-size: 13px; margin-top: 2px; }
"""

# One zoom level and focus point for every panel of the comparison (click a panel to zoom there).
COMPARE_JS = """
let focus = [50, 50];
function apply() {
  const slider = element.querySelector('input.zoom');
  if (!slider) return;
  element.querySelectorAll('.view img').forEach(img => {
    img.style.transformOrigin = focus[0] + '% ' + focus[1] + '%';
    img.style.transform = 'scale(' + slider.value + ')';
  });
  element.querySelector('.zoom-value').textContent = slider.value + 'x';
}
element.addEventListener('input', event => { if (event.target.matches('input.zoom')) apply(); });
element.addEventListener('click', event => {
  const view = event.target.closest('.view');
  if (!view) return;
  const box = view.getBoundingClientRect();
  focus = [100 * (event.clientX - box.left) / box.width, 100 * (event.clientY - box.top) / box.height];
  const slider = element.querySelector('input.zoom');
  if (slider.value === '1') slider.value = '4';
  apply();
});
"""


def _fail(error: BaseException):
    """One clear line in the browser; the app goes on serving."""
    return gr.Error(first_line(error), print_exception=False)


def _slider_update(control, **extra):
    return gr.update(value=control.default, **extra)


def build_app(models: ModelCache, local_weights: dict[str, str], out_root: Path, registry=None) -> gr.Blocks:
    out_root = Path(out_root)
    methods = list_methods()
    first = next((m for m in ("osediff", *methods) if m in local_weights), "osediff")

    def choices_for(method):
        found = service.model_choices(method, local_weights, registry)
        return [(c.label, c.value) for c in found], (found[0].value if found else None)

    with gr.Blocks(title="diffsr") as app:
        gr.Markdown("## diffsr: real-world super-resolution with diffusion priors")
        with gr.Tab("Upscale"):
            with gr.Row():
                with gr.Column(scale=1):
                    method = gr.Dropdown(methods, value=first, label="method")
                    options, chosen = choices_for(first)
                    variant = gr.Dropdown(options, value=chosen, label="weights (variant · size · downloaded?)")
                    fetch = gr.Button("download the selected weights", size="sm")
                    files = gr.File(file_count="multiple", label="images (one or many)")
                    folder = gr.File(file_count="directory", label="or a folder of images", height=120)
                    scale = gr.Slider(1, 8, value=4, step=0.5, label="scale")
                    seed = gr.Number(0, precision=0, label="seed")
                    color_fix = gr.Dropdown([RELEASE_DEFAULT, *COLOR_FIXES], value=RELEASE_DEFAULT, label="colour fix")
                    groups, controls = {}, {}
                    for name in methods:
                        with gr.Group(visible=name == first) as groups[name]:
                            for control in CONTROLS.get(name, ()):
                                controls[name, control.knob] = _control(control, name)
                            if name == "s3diff":
                                edit_scores = gr.Checkbox(False, label="edit the scores (else each image's estimate)")
                                estimate = gr.Button("estimate the scores of the first image", size="sm")
                    with gr.Accordion("Advanced", open=False):
                        tiling = {c.knob: gr.Number(None, label=c.label, info=c.info, minimum=c.minimum, step=c.step)
                                  for c in TILING_CONTROLS}
                    run = gr.Button("Upscale", variant="primary")
                with gr.Column(scale=2):
                    status = gr.Markdown(elem_id="status")
                    # gradio's slider zooms (scroll) and pans (drag) both images together; CSS draws pixels sharp
                    slider = gr.ImageSlider(type="pil", format="png", max_height=800,
                                            label="before / after · scroll to zoom, drag to pan",
                                            buttons=["fullscreen"], elem_classes=["pixelated"], elem_id="result")
                    shown = gr.Dropdown([], label="result shown", visible=False)
                    downloads = gr.File(file_count="multiple", label="download (full resolution, with its settings)",
                                        elem_id="downloads")
                    previews = gr.State({})

        with gr.Tab("Compare"):
            with gr.Row():
                compare_image = gr.File(label="image", elem_id="compare-image")
                reference = gr.File(label="reference (optional: per-panel metrics)", elem_id="compare-reference")
            with gr.Row():
                compare_methods = gr.CheckboxGroup(methods, value=methods[:2], label="methods (two to four)")
                compare_scale = gr.Slider(1, 8, value=4, step=0.5, label="scale")
                compare_seed = gr.Number(0, precision=0, label="seed")
            compare_run = gr.Button("Compare", variant="primary")
            compare_view = gr.HTML("", js_on_load=COMPARE_JS, elem_classes=["diffsr-compare"], elem_id="compare")

        # -- events ---------------------------------------------------------------------------------
        knob_components = list(controls.values())

        def pick_method(name):
            options, value = choices_for(name)
            return [gr.update(choices=options, value=value)] + [gr.update(visible=m == name) for m in methods]

        method.change(pick_method, method, [variant, *groups.values()])

        def pick_variant(name, weights):
            defaults = service.release_defaults(name, weights or "")
            return [gr.update(value=defaults[knob]) if m == name and knob in defaults else gr.update()
                    for (m, knob) in controls]

        variant.change(pick_variant, [method, variant], knob_components)

        def fetch_weights(name, weights, progress=gr.Progress(track_tqdm=True)):
            try:
                progress(0, desc=f"downloading {weights}")
                service.fetch_variant(weights, registry)
            except DiffsrError as error:
                raise _fail(error) from None
            options, _ = choices_for(name)
            return gr.update(choices=options, value=weights)

        fetch.click(fetch_weights, [method, variant], variant, concurrency_limit=1, concurrency_id="fetch")

        def estimate_scores(weights, uploaded):
            if not uploaded:
                raise gr.Error("upload an image first", print_exception=False)
            try:
                upscaler = models.get("s3diff", weights)
                from diffsr.images import MAX_INPUT_PIXELS, read_image

                blur, noise = upscaler.degradation_scores(read_image(_paths(uploaded)[0], MAX_INPUT_PIXELS))
            except Exception as error:  # noqa: BLE001 (the app's boundary)
                raise _fail(error) from None
            return round(blur, 4), round(noise, 4), True

        estimate.click(estimate_scores, [variant, files],
                       [controls["s3diff", "degradation_blur"], controls["s3diff", "degradation_noise"], edit_scores],
                       concurrency_limit=1, concurrency_id=DEVICE_QUEUE)

        def upscale(data, progress=gr.Progress()):
            name, weights = data[method], data[variant]
            inputs = service.upload_paths(_paths(data[files]) if data[files] else [],
                                          _paths(data[folder]) if data[folder] else [])
            if not inputs:
                raise gr.Error("upload one or more images (or a folder of them) first", print_exception=False)
            values = {knob: data[component] for (m, knob), component in controls.items() if m == name}
            settings = Settings(name, weights, float(data[scale]), int(data[seed] or 0),
                                None if data[color_fix] == RELEASE_DEFAULT else data[color_fix],
                                service.method_knobs(name, values, bool(data[edit_scores])))
            run_folder = out_root / f"run-{uuid.uuid4().hex[:12]}"
            try:
                outcome = service.upscale_files(models, settings, inputs, run_folder,
                                                service.tiling_knobs({k: data[c] for k, c in tiling.items()}),
                                                lambda fraction, text: progress(fraction, desc=text))
            except Exception as error:  # noqa: BLE001 (the app's boundary: one line to the browser, the app goes on)
                raise _fail(error) from None
            if not outcome.results:
                raise gr.Error(outcome.errors[0] if outcome.errors else "nothing was written", print_exception=False)
            for line in outcome.errors + outcome.warnings:
                gr.Warning(line)
            shown_previews = {r.output.name: (service.preview(r.before), service.preview(r.after))
                              for r in outcome.results}
            first_result = outcome.results[0]
            failed = f", {len(outcome.errors)} failed" if outcome.errors else ""
            lines = [f"**{len(outcome.results)} written**{failed}"]
            for r in outcome.results:
                width, height = r.after.size
                line = f"- {r.output.name}: {width}x{height}"
                if r.degradation is not None:
                    line += f" · degradation blur {r.degradation[0]:.4f}, noise {r.degradation[1]:.4f}"
                lines.append(line)
            lines += [f"- failed: {html.escape(e)}" for e in outcome.errors]
            names = list(shown_previews)
            return {slider: shown_previews[first_result.output.name],
                    downloads: [str(p) for r in outcome.results for p in (r.output, r.settings_file)],
                    status: "\n".join(lines), previews: shown_previews,
                    shown: gr.update(choices=names, value=names[0], visible=len(names) > 1)}

        run.click(upscale, {method, variant, files, folder, scale, seed, color_fix, edit_scores, *knob_components,
                            *tiling.values()}, [slider, downloads, status, previews, shown],
                  concurrency_limit=1, concurrency_id=DEVICE_QUEUE)
        shown.change(lambda name, stored: stored.get(name), [shown, previews], slider)

        def compare(image, ref, picked, scale_value, seed_value, progress=gr.Progress()):
            if not image:
                raise gr.Error("upload an image to compare on", print_exception=False)
            try:
                service.check_method_count(picked or [])
                panels = service.compare_methods(
                    models, picked, local_weights, Path(_paths(image)[0]), Path(_paths(ref)[0]) if ref else None,
                    float(scale_value), int(seed_value or 0), out_root / f"compare-{uuid.uuid4().hex[:12]}",
                    COMPARE_METRICS, lambda fraction, text: progress(fraction, desc=text))
            except Exception as error:  # noqa: BLE001 (the app's boundary: one line to the browser, the app goes on)
                raise _fail(error) from None
            return compare_html(panels)

        compare_run.click(compare, [compare_image, reference, compare_methods, compare_scale, compare_seed],
                          compare_view, concurrency_limit=1, concurrency_id=DEVICE_QUEUE)
    return app


def _control(control, method: str):
    label = control.label
    if control.is_text:
        return gr.Textbox(control.default, label=label, info=control.info)
    return gr.Slider(control.minimum, control.maximum, value=control.default, step=control.step, label=label,
                     info=control.info, elem_id=f"{method}-{control.knob}")


def _paths(uploaded) -> list[str]:
    """Gradio gives a file path (str), an object with .name, or a list of either."""
    items = uploaded if isinstance(uploaded, list) else [uploaded]
    return [item if isinstance(item, str) else item.name for item in items]


def compare_html(panels: list[service.Panel]) -> str:
    """The methods side by side on one row, with a shared zoom (COMPARE_JS)."""
    from diffsr.report.html import data_url

    cells = []
    for panel in panels:
        caption = " · ".join(f"{name} {value:.4f}" for name, value in panel.scores.items())
        if panel.note:
            caption += (" · " if caption else "") + panel.note
        cells.append(f'<div class="panel"><div class="view"><img alt="{html.escape(panel.label)}" '
                     f'src="{data_url(panel.picture)}"></div><div class="label"><b>{html.escape(panel.label)}</b> '
                     f'<span class="scores">{html.escape(caption)}</span></div></div>')
    return ('<div class="controls">zoom <input class="zoom" type="range" min="1" max="16" step="1" value="1"> '
            '<span class="zoom-value">1x</span> · click a panel to zoom there (all panels follow)</div>'
            f'<div class="panels">{"".join(cells)}</div>')


def launch(models: ModelCache, local_weights: dict[str, str], host: str = "127.0.0.1", port: int | None = None,
           share: bool = False, auth: tuple[str, str] | None = None, output: Path | None = None,
           block: bool = True):
    """Build and serve the app; returns the gradio app (serving in a thread when not `block`)."""
    out_root = Path(output) if output else Path(tempfile.mkdtemp(prefix="diffsr-ui-"))
    out_root.mkdir(parents=True, exist_ok=True)
    app = build_app(models, local_weights, out_root)
    app.queue(default_concurrency_limit=1)
    _, local_url, share_url = app.launch(server_name=host, server_port=port, share=share, auth=auth,
                                         allowed_paths=[str(out_root)], prevent_thread_lock=True, css=CSS,
                                         footer_links=[], quiet=True)
    print(f"diffsr ui: serving on {local_url}" + (f" and {share_url}" if share_url else "")
          + f" (results in {out_root}); Ctrl+C stops it", flush=True)
    if block:
        app.block_thread()
    return app
