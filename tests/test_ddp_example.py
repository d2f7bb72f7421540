"""examples/ddp_supcon.py under torchrun: two gloo processes on the CPU, the report of rank 0.

Runs the documented command, ``python -m torch.distributed.run --standalone
--nproc_per_node=2 examples/ddp_supcon.py --quick``, with a timeout (a stuck collective
fails the test rather than hanging it), and reads what a user reads: the printed report,
once, and report.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="starts two gloo processes with torchrun")
def test_torchrun_quick_trains_and_reports_on_rank_0(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "examples/ddp_supcon.py", "--quick", "--out", str(tmp_path),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish within 240 s:\n{error.stdout}\n{error.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("# ddp_supcon: 2 process(es), backend gloo, cpu") == 1  # rank 0 alone prints
    assert "gathered batch 64" in out and "held-out retrieval" in out and "precision@1" in out

    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["world_size"], report["backend"], report["gathered_batch"]) == (2, "gloo", 64)
    # An epoch of 48 identities × 8 images is 12 batches of 8×4: each process takes 6 of them.
    assert report["steps"] == 6 * report["config"]["epochs"]
    untrained, trained = report["retrieval_untrained"], report["retrieval_trained"]
    assert trained["counts"]["queries"] == 24 * 8  # every held-out image, over both shards
    assert trained["metrics"]["precision@1"]["hits"] > untrained["metrics"]["precision@1"]["hits"]
    assert trained["metrics"]["map@r"] > untrained["metrics"]["map@r"]
    assert report["loss"]["last_epoch"] < report["loss"]["first_epoch"]
    assert (tmp_path / "report.md").read_text().startswith("# ddp_supcon")
