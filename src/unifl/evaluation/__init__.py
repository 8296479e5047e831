"""Evaluation: per-prompt metrics, Fréchet distance, CLIP score, throughput, grids, reports."""

from unifl.evaluation.clip_score import ClipScorer, clip_score
from unifl.evaluation.evaluate import (
    EvaluationError,
    EvaluationResult,
    evaluate_model,
    load_eval_prompts,
    load_reference_images,
    metric_name,
)
from unifl.evaluation.frechet import (
    BackboneFeatureExtractor,
    FeatureExtractor,
    extract_features,
    frechet_distance,
    frechet_distance_from_statistics,
)
from unifl.evaluation.grids import save_comparison_grid
from unifl.evaluation.throughput import Throughput, measure_throughput

__all__ = [
    "BackboneFeatureExtractor",
    "ClipScorer",
    "EvaluationError",
    "EvaluationResult",
    "FeatureExtractor",
    "Throughput",
    "clip_score",
    "evaluate_model",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "load_eval_prompts",
    "load_reference_images",
    "measure_throughput",
    "metric_name",
    "save_comparison_grid",
]
