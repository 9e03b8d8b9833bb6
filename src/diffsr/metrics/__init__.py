"""Image quality metrics as the SR papers report them, and evaluation of result folders.

    from diffsr.metrics import create_metric, evaluate, render
    lpips = create_metric("lpips")            # built in, or pyiqa where it has the metric
    value = lpips(sr_tensor, gt_tensor)       # (1, 3, H, W) in [0, 1]
    result = evaluate("results/", "gt/", ["psnr", "ssim", "lpips", "fid"])
    print(render(result, "md"))
"""

from diffsr.metrics.evaluate import Evaluation, RunsEvaluation, evaluate, evaluate_runs, render
from diffsr.metrics.registry import (DEFAULT_METRICS, DISTRIBUTION, FULL_REFERENCE, NO_REFERENCE, PAPER_METRICS,
                                     Metric, MetricSpec, MetricUnavailable, create_metric, get_spec, list_metrics,
                                     pyiqa_available)
from diffsr.metrics.stability import g_std, l_std, pixel_std

__all__ = ["create_metric", "list_metrics", "get_spec", "Metric", "MetricSpec", "MetricUnavailable",
           "DEFAULT_METRICS", "PAPER_METRICS", "FULL_REFERENCE", "NO_REFERENCE", "DISTRIBUTION", "pyiqa_available",
           "evaluate", "evaluate_runs", "render", "Evaluation", "RunsEvaluation", "g_std", "l_std", "pixel_std"]
