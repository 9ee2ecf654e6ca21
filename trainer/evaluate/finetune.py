"""Few-shot fine-tuning protocol: backbone + linear classifier trained end to end on a subset.

(The training part lands below once the trainer's model API is in.)
"""

from __future__ import annotations

import hashlib


def select_subset(tokens: list[str], fraction: float, seed: int = 0) -> list[str]:
    """The labelled scans of a ``fraction`` run: deterministic, nested, at least one scan.

    Every token is ranked by ``sha256(f"{seed}:{token}")``; the first ``max(1, round(fraction·n))``
    are kept, returned in their original order. The choice depends only on the token set and the
    seed (not on file order or the machine), and a smaller fraction is a subset of a larger one.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not tokens:
        raise ValueError("no scans to choose from")
    n = max(1, round(fraction * len(tokens)))
    ranked = sorted(tokens, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    chosen = set(ranked[:n])
    return [t for t in tokens if t in chosen]
