"""Metric-learning losses that add and scale like tensors.

Every loss is called as ``loss(embeddings, labels)``; pair losses also take
``ref_embeddings=``/``ref_labels=``. After a call, ``loss.last_value`` and
``loss.last_stats`` describe it. See :mod:`embedkit.losses.base` for the contract.
"""

from .base import ClassifierLoss, Loss, LossSum, PairBatch, PairLoss
from .circle import CircleLoss
from .contrastive import ContrastiveLoss
from .infonce import NTXentLoss, SupConLoss
from .margin_softmax import ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, SubCenterArcFaceLoss
from .multi_similarity import MultiSimilarityLoss
from .partial_fc import ShardedArcFaceLoss, ShardedCosFaceLoss, ShardedMarginSoftmaxLoss
from .proxy_anchor import ProxyAnchorLoss
from .triplet import TripletMarginLoss

__all__ = [
    "ArcFaceLoss",
    "CircleLoss",
    "ClassifierLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "Loss",
    "LossSum",
    "MultiSimilarityLoss",
    "NTXentLoss",
    "NormalizedSoftmaxLoss",
    "PairBatch",
    "PairLoss",
    "ProxyAnchorLoss",
    "ShardedArcFaceLoss",
    "ShardedCosFaceLoss",
    "ShardedMarginSoftmaxLoss",
    "SubCenterArcFaceLoss",
    "SupConLoss",
    "TripletMarginLoss",
]
