"""Networks that are not part of Stable Diffusion (e.g. S3Diff's degradation estimator)."""
