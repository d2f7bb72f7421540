"""Test-wide settings: hypothesis runs derandomized in CI so a submission never fails by chance.

Locally hypothesis explores new examples on every run (its ``dev`` profile here); when the
``CI`` environment variable is set the ``ci`` profile derives every example from the test's
name, so two CI runs of one commit try identical examples. A failure found locally prints the
seed to rerun it with: ``pytest --hypothesis-seed=<seed> tests/test_x.py::test_y``.
"""

from __future__ import annotations

import os

from hypothesis import settings

# Per-test @settings (max_examples, deadline) still apply on top of the loaded profile.
settings.register_profile("dev", print_blob=True)
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
