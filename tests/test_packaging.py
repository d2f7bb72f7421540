"""What a user meets on install and first call: import cost, version, the command line's edges."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import numpy as np
import torch

import embedkit
from embedkit.similarity import _autocast_enabled


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout


def test_import_embedkit_leaves_out_the_heavy_optional_modules() -> None:
    # A fresh interpreter: this test session has imported scipy and friends already.
    out = _python(
        "import sys, embedkit\n"
        "heavy = ('scipy.stats', 'scipy.special', 'matplotlib', 'faiss')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    assert out.strip() == "[]"


def test_version_comes_from_the_package_metadata() -> None:
    assert embedkit.__version__ == version("embedkit")


def test_cli_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "embedkit", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert out.stdout.strip() == f"embedkit {version('embedkit')}"


def test_cli_exits_quietly_on_a_closed_pipe(tmp_path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "e.npz"
    embeddings = rng.normal(size=(200, 16)).astype(np.float32)
    np.savez(path, embeddings=embeddings, labels=np.repeat(np.arange(20), 10))
    # Read one line, then close the pipe while the command still writes: `... | head -1`.
    process = subprocess.Popen(
        [sys.executable, "-m", "embedkit", "doctor", str(path), "--format", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(1)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr
    assert process.returncode in (0, 141)


def test_autocast_query_works_inside_and_outside_autocast() -> None:
    assert not _autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _autocast_enabled("cpu")
    assert not _autocast_enabled("cpu")
