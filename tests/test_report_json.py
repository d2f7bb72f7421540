"""Reports as strict JSON: NaN as null, ±inf as strings, curves included, read back exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedkit.evaluation.report import Rate, Report, from_plain, load_reports, to_plain
from embedkit.evaluation.verification import verification_metrics


def _refuse(token: str) -> None:
    raise ValueError(f"non-standard JSON token {token}")


def strict_load(text: str) -> object:
    return json.loads(text, parse_constant=_refuse)


def test_to_plain_maps_nan_and_both_infinities() -> None:
    assert to_plain(math.nan) is None
    assert to_plain(np.float32("nan")) is None
    assert to_plain(math.inf) == "Infinity"
    assert to_plain(-np.inf) == "-Infinity"
    assert to_plain(np.array([1.5, np.inf, -np.inf, np.nan])) == [1.5, "Infinity", "-Infinity", None]
    assert to_plain({"a": (np.int64(3), np.float64(-np.inf))}) == {"a": [3, "-Infinity"]}
    assert to_plain(Rate(0, 0)) == {"value": None, "hits": 0, "total": 0, "chance": None}
    assert to_plain(Rate(0, 0, chance=math.inf))["chance"] == "Infinity"
    for value in (math.nan, math.inf, -math.inf, 0.25, 3):
        back = from_plain(json.loads(json.dumps(to_plain(value), allow_nan=False)))
        assert back == value or (math.isnan(back) and math.isnan(value))
    with pytest.raises(TypeError, match="expected a number"):
        from_plain("inf")


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=20))
def test_any_floats_round_trip_through_strict_json(values: list[float]) -> None:
    text = json.dumps(to_plain(np.asarray(values, dtype=np.float64)), allow_nan=False)
    loaded = strict_load(text)
    assert isinstance(loaded, list)
    back = np.asarray([from_plain(v) for v in loaded], dtype=np.float64)
    np.testing.assert_array_equal(back, np.asarray(values, dtype=np.float64))


def test_report_round_trips_with_curves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    genuine = rng.random(500) < 0.3
    scores = rng.normal(size=500) + genuine
    report = verification_metrics(scores, genuine, far_targets=(1e-4, 0.01))  # +inf threshold, FAR-0 note
    report = Report(
        report.title, {**report.metrics, "undefined": math.nan}, report.counts, report.notes, report.curves
    )
    text = report.to_json(tmp_path / "r.json", curves=True)
    data = strict_load(text)
    assert data["curves"]["thresholds"][0] == "Infinity" and data["metrics"]["undefined"] is None  # type: ignore[index]
    (back,) = load_reports(tmp_path / "r.json").values()
    assert list(back) == list(report) and back.notes == report.notes and back.counts == report.counts
    for key in report:
        assert back.rate(key) == report.rate(key), key
        np.testing.assert_equal(back[key], report[key])
    assert set(back.curves) == set(report.curves)
    for key, curve in report.curves.items():
        np.testing.assert_array_equal(back.curves[key], curve, err_msg=key)
    assert back.curves["genuine_histogram"].dtype == np.int64
    assert "curves" not in report.to_dict()
    assert set(report.to_dict(curves=["far", "missing"])["curves"]) == {"far"}


def test_load_reports_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text('{"run": {"seconds": 1.0}}')
    with pytest.raises(ValueError, match="holds no report"):
        load_reports(path)
    path.write_text("{")
    with pytest.raises(ValueError, match=r"report\.json is not valid JSON"):
        load_reports(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object of reports"):
        load_reports(path)
    with pytest.raises(ValueError, match="needs 'title' and 'metrics'"):
        Report.from_dict({"title": "x"})
