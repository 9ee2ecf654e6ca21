"""Evaluation protocols: metrics, linear probe, fine-tuning, robustness, pictures, ablations."""
