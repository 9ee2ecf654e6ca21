"""Procedural synthetic driving world written as a nuScenes-lidarseg release (``v1.0-synthetic``).

See docs/synthetic.md. Entry point: :func:`make_synthetic` (``python cli.py make-synthetic``).
"""

from pipeline.synthetic.nuscenes_writer import VERSION, SyntheticConfig, make_synthetic

__all__ = ["VERSION", "SyntheticConfig", "make_synthetic"]
