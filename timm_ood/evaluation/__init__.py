"""Evaluation and tuning: many detectors, many OOD sets, one forward per batch."""

from __future__ import annotations

from ..detectors.odin import naive_odin_grid_scores, odin_grid_scores  # ODIN's fast grid
from ..scoring import ScoredSets, detector_labels, score_sets
from .evaluate import DEFAULT_DETECTORS, evaluate, evaluate_loaders, make_detectors
from .results import EvaluationResults
from .tuning import TuningResult, grid_search, tune

__all__ = [
    "DEFAULT_DETECTORS",
    "EvaluationResults",
    "ScoredSets",
    "TuningResult",
    "detector_labels",
    "evaluate",
    "evaluate_loaders",
    "grid_search",
    "make_detectors",
    "naive_odin_grid_scores",
    "odin_grid_scores",
    "score_sets",
    "tune",
]
