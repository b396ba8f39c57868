"""Pareto front of a metric against a cost (trainable parameters, wall time). No torch."""

from __future__ import annotations

import numpy as np


def pareto_front(cost, value, larger_is_better: bool = True) -> np.ndarray:
    """Boolean mask [n] of the points no other point dominates.

    cost [n] (smaller is better), value [n]. A point is dominated when another has cost <= and
    value at least as good, with one of the two strictly better. NaN points are never on the front.
    """
    c = np.asarray(cost, dtype=np.float64)
    v = np.asarray(value, dtype=np.float64)
    if c.shape != v.shape or c.ndim != 1:
        raise ValueError(f"cost and value must be 1-D of one length, got {c.shape} and {v.shape}")
    if not larger_is_better:
        v = -v
    ok = np.isfinite(c) & np.isfinite(v)
    front = np.zeros(c.size, dtype=bool)
    for i in np.flatnonzero(ok):
        others = ok.copy()
        others[i] = False
        dominated = (c[others] <= c[i]) & (v[others] >= v[i]) & ((c[others] < c[i]) | (v[others] > v[i]))
        front[i] = not dominated.any()
    return front
