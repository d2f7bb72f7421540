"""Gallery-probe evaluation: k-NN search, retrieval, identification and verification metrics.

Every accuracy is a :class:`Rate` with its counts and chance level, and every result a
:class:`Report` (a read-only mapping that renders to dict, JSON and markdown).
"""

from .gallery import Gallery
from .report import Rate, Report
from .retrieval import retrieval_metrics
from .search import knn
from .verification import (
    best_threshold_accuracy,
    equal_error_rate,
    kfold_accuracy,
    make_pairs,
    pair_scores,
    roc_auc,
    roc_curve,
    tar_at_far,
    val_far_at_threshold,
    verification_metrics,
)

__all__ = [
    "Gallery",
    "Rate",
    "Report",
    "best_threshold_accuracy",
    "equal_error_rate",
    "kfold_accuracy",
    "knn",
    "make_pairs",
    "pair_scores",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "val_far_at_threshold",
    "verification_metrics",
]
