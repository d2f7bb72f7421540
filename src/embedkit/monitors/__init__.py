"""Training monitors that name the failure while it happens.

* :class:`ClassCollapseMonitor` — logits of a classifier head: top-k accuracy with
  counts and chance, prediction histogram, confidence and logit spread
  (``class_collapse``, ``at_chance``, ``below_chance``, ``overconfident``).
* :class:`EmbeddingHealthMonitor` — embeddings: norms, effective rank, spread,
  separation of same- and different-identity pairs, paired shortcut
  (``complete_collapse``, ``dimensional_collapse``, ``no_separation``,
  ``paired_shortcut``).
* :class:`LossMonitor` — a loss's value and statistics over steps
  (``loss_at_margin``, ``no_positive_pairs``, ``no_active_triplets``,
  ``loss_falling_at_chance``).

Every ``compute()`` returns a :class:`MonitorReport` — a mapping of statistics with a
list of :class:`Diagnosis` — and every monitor reports ``non_finite`` inputs. The
guide "Reading the diagnoses" explains each diagnosis and its thresholds.
"""

from .chance import chance_verdict, describe_rate, wilson_interval
from .collapse import ClassCollapseMonitor
from .diagnosis import Diagnosis, docs_link
from .health import EmbeddingHealthMonitor
from .history import TrainingHistory
from .report import MonitorReport
from .signals import LossMonitor

__all__ = [
    "ClassCollapseMonitor",
    "Diagnosis",
    "EmbeddingHealthMonitor",
    "LossMonitor",
    "MonitorReport",
    "TrainingHistory",
    "chance_verdict",
    "describe_rate",
    "docs_link",
    "wilson_interval",
]
