"""Gallery-probe evaluation: k-NN search, retrieval, identification and verification metrics."""

from .report import Rate, Report

__all__ = ["Rate", "Report"]
