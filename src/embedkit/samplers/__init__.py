"""Batch samplers and triplet construction for metric learning.

* :class:`PKSampler` — ``p`` distinct classes × ``k`` samples per batch, for
  ``DataLoader(batch_sampler=...)``: vectorised, deterministic for ``(seed, epoch)``,
  resumable mid-epoch, sharded across ``torch.distributed`` ranks.
* :func:`build_triplets` and :func:`count_triplets` — (anchor, positive, negative)
  index triplets for offline triplet training, with random or offline semi-hard
  negatives.
"""

from .pk import PKSampler, SmallClassPolicy
from .triplets import TripletSet, build_triplets, count_triplets

__all__ = ["PKSampler", "SmallClassPolicy", "TripletSet", "build_triplets", "count_triplets"]
