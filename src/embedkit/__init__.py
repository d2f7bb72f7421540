"""embedkit: metric learning for PyTorch that tells you why training fails.

The public face of the package. Sub-packages:

* :mod:`embedkit.losses` — composable losses (margin-softmax, pair, proxy);
* :mod:`embedkit.similarity` — all pairwise similarity and distance math;
* :mod:`embedkit.mining` — pair and triplet mining as tensor functions;
* :mod:`embedkit.samplers` — P×K batch sampler and offline triplet construction;
* :mod:`embedkit.evaluation` — k-NN search, retrieval, identification and
  verification metrics reported with counts and chance levels;
* :mod:`embedkit.monitors` — class-collapse, embedding-health and loss-signal
  monitors that name failures while training runs;
* :mod:`embedkit.distributed` — ``torch.distributed`` pieces: losses over every
  process's embeddings (:class:`GatheredLoss`); with
  :mod:`embedkit.losses.partial_fc` (class centres sharded) and
  :mod:`embedkit.evaluation.sharded` (reference shards searched in place).
"""

from importlib.metadata import PackageNotFoundError, version

from . import distributed, evaluation, losses, mining, monitors, samplers, similarity
from .distributed import GatheredLoss
from .evaluation import Gallery, Rate, Report, knn, retrieval_metrics, verification_metrics
from .losses import (
    ArcFaceLoss,
    CircleLoss,
    ContrastiveLoss,
    CosFaceLoss,
    Loss,
    LossSum,
    MultiSimilarityLoss,
    NormalizedSoftmaxLoss,
    NTXentLoss,
    ProxyAnchorLoss,
    ShardedArcFaceLoss,
    ShardedCosFaceLoss,
    SubCenterArcFaceLoss,
    SupConLoss,
    TripletMarginLoss,
)
from .monitors import (
    ClassCollapseMonitor,
    Diagnosis,
    EmbeddingHealthMonitor,
    LossMonitor,
    MonitorReport,
    TrainingHistory,
)
from .samplers import PKSampler, TripletSet, build_triplets, count_triplets
from .similarity import pairwise_distance, pairwise_similarity

try:
    # The one version source is pyproject.toml, read back from the installed metadata.
    __version__ = version("embedkit")
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

__all__ = [
    "ArcFaceLoss",
    "CircleLoss",
    "ClassCollapseMonitor",
    "ContrastiveLoss",
    "CosFaceLoss",
    "Diagnosis",
    "EmbeddingHealthMonitor",
    "Gallery",
    "GatheredLoss",
    "Loss",
    "LossMonitor",
    "LossSum",
    "MonitorReport",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "NormalizedSoftmaxLoss",
    "PKSampler",
    "ProxyAnchorLoss",
    "Rate",
    "Report",
    "ShardedArcFaceLoss",
    "ShardedCosFaceLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "TrainingHistory",
    "TripletMarginLoss",
    "TripletSet",
    "__version__",
    "build_triplets",
    "count_triplets",
    "distributed",
    "evaluation",
    "knn",
    "losses",
    "mining",
    "monitors",
    "pairwise_distance",
    "pairwise_similarity",
    "retrieval_metrics",
    "samplers",
    "similarity",
    "verification_metrics",
]
