"""embedkit: metric learning for PyTorch that tells you why training fails.

The public face of the package. Sub-packages:

* :mod:`embedkit.losses` — composable losses (margin-softmax, pair, proxy);
* :mod:`embedkit.similarity` — all pairwise similarity and distance math;
* :mod:`embedkit.mining` — pair and triplet mining as tensor functions.
"""

from . import losses, mining, similarity
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
    "ProxyAnchorLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "TripletMarginLoss",
    "__version__",
    "losses",
    "mining",
    "pairwise_distance",
    "pairwise_similarity",
    "similarity",
]
