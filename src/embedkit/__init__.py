"""embedkit: metric learning for PyTorch that tells you why training fails.

The public face of the package. Sub-packages:

* :mod:`embedkit.losses` — composable losses (margin-softmax, pair, proxy);
* :mod:`embedkit.similarity` — all pairwise similarity and distance math;
* :mod:`embedkit.mining` — pair and triplet mining as tensor functions;
* :mod:`embedkit.samplers` — P×K batch sampler and offline triplet construction;
* :mod:`embedkit.evaluation` — k-NN search, retrieval, identification and
  verification metrics reported with counts and chance levels.
"""

from . import evaluation, losses, mining, samplers, similarity
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
    SubCenterArcFaceLoss,
    SupConLoss,
    TripletMarginLoss,
)
from .samplers import PKSampler, TripletSet, build_triplets, count_triplets
from .similarity import pairwise_distance, pairwise_similarity

__version__ = "0.1.0.dev0"

__all__ = [
    "ArcFaceLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "Loss",
    "LossSum",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "NormalizedSoftmaxLoss",
    "PKSampler",
    "ProxyAnchorLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "TripletSet",
    "__version__",
    "build_triplets",
    "count_triplets",
    "evaluation",
    "losses",
    "mining",
    "pairwise_distance",
    "pairwise_similarity",
    "samplers",
    "similarity",
]
