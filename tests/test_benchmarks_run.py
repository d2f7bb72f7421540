"""benchmarks/run.py: the markdown tables every benchmark prints are read back into its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _table import markdown_table, parse_tables  # noqa: E402


def test_a_table_reads_back_with_its_title_and_cells() -> None:
    text = (
        "noise\n" + markdown_table(("n", "ratio"), [(1000, 1.23456), (20, "slow")], title="speed") + "\ntail"
    )
    (table,) = parse_tables(text)
    assert table["title"] == "speed"
    assert table["columns"] == ["n", "ratio"]
    assert table["rows"] == [{"n": "1,000", "ratio": "1.235"}, {"n": "20", "ratio": "slow"}]


def test_two_tables_and_a_table_without_title() -> None:
    text = markdown_table(("a",), [(1,)]) + "\n\n" + markdown_table(("b",), [(2,)], title="second")
    first, second = parse_tables(text)
    assert (first["title"], first["rows"]) == (None, [{"a": "1"}])
    assert (second["title"], second["rows"]) == ("second", [{"b": "2"}])


def test_a_row_with_the_wrong_number_of_cells_is_refused() -> None:
    with pytest.raises(ValueError, match="2 cells for 1 columns"):
        markdown_table(("a",), [(1, 2)])


def test_run_writes_json_and_markdown_with_the_machine(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--only",
            "triplets",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "benchmarks.json").read_text())
    assert result["machine"]["torch_threads"] >= 1 and result["machine"]["torch"] != "not installed"
    (record,) = result["benchmarks"]
    assert record["name"] == "triplets" and record["returncode"] == 0
    (table,) = record["tables"]
    assert table["rows"][0]["same triplets"] == "True"
    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "## triplets" in markdown
    if result["machine"]["gpu"] is None:
        assert "Not measured: no CUDA device" in markdown
