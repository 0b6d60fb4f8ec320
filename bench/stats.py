"""Summaries of repeated timings: median and spread."""

from __future__ import annotations

import numpy as np

SUMMARY_FIELDS = ("median", "q1", "q3", "min", "max", "n")


def summarize(values) -> dict:
    """``{median, q1, q3, min, max, n, values}`` of a list of numbers (``None`` fields when empty)."""
    values = [float(v) for v in values]
    if not values:
        return {**{k: None for k in SUMMARY_FIELDS}, "n": 0, "values": []}
    arr = np.asarray(values)
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": float(arr.min()),
            "max": float(arr.max()), "n": len(values), "values": values}


def ratio(numerator, denominator):
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)
