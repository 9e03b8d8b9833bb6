"""Image-quality and stability metrics."""
