"""Gallery-probe evaluation: k-NN search, retrieval, identification and verification metrics.

Every accuracy is a :class:`Rate` with its counts and chance level, and every result a
:class:`Report` (a read-only mapping that renders to dict, JSON and markdown).
"""

from .gallery import Gallery
from .report import Rate, Report, load_reports
from .retrieval import retrieval_metrics
from .search import knn
from .sharded import ShardedGallery, sharded_knn, sharded_retrieval_metrics
from .verification import (
    PairsFile,
    all_pairs_verification,
    best_threshold_accuracy,
    equal_error_rate,
    kfold_accuracy,
    make_pairs,
    pair_scores,
    read_pairs_file,
    roc_auc,
    roc_curve,
    tar_at_far,
    val_far_at_threshold,
    verification_metrics,
)

__all__ = [
    "Gallery",
    "PairsFile",
    "Rate",
    "Report",
    "ShardedGallery",
    "all_pairs_verification",
    "best_threshold_accuracy",
    "equal_error_rate",
    "kfold_accuracy",
    "knn",
    "load_reports",
    "make_pairs",
    "pair_scores",
    "read_pairs_file",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "sharded_knn",
    "sharded_retrieval_metrics",
    "tar_at_far",
    "val_far_at_threshold",
    "verification_metrics",
]
