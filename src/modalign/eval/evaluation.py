"""What evaluating a run on one split gives back, for every recipe. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Evaluation:
    metrics: dict[str, float]  # the split's metrics (each a mean of its per-example column where it has one)
    per_example: dict[str, np.ndarray]  # column -> (N,) scores, in the split's sample order
    modality: np.ndarray | None = None  # (N, D) embeddings (align)
    text: np.ndarray | None = None  # (N, D)
    extra: dict = field(default_factory=dict)  # recipe-specific results, e.g. VQ code counts
