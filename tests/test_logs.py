"""metrics.csv across versions: a run written with other columns keeps them on resume."""

import csv
from pathlib import Path

from cp3er.logs import METRIC_COLUMNS, MetricsWriter


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_an_older_header_keeps_its_columns_and_gains_the_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    old_columns = ["frame", "phase", "episode_return", "action_std"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, old_columns)
        writer.writeheader()
        writer.writerow({"frame": 1000, "phase": "train", "episode_return": 5,
                         "action_std": 0.25})
        writer.writerow({"frame": 2000, "phase": "eval", "episode_return": 7,
                         "action_std": 0.5})
    metrics = MetricsWriter(path)  # what a resume opens
    metrics.truncate_after(1000)
    metrics.write({"frame": 3000, "phase": "train", "episode_return": 9.0,
                   "action_spread": 0.125})
    header, rows = _read(path)
    assert header[:4] == old_columns
    assert set(METRIC_COLUMNS) <= set(header)
    assert [r["frame"] for r in rows] == ["1000", "3000"]
    assert rows[0]["action_std"] == "0.25"  # recorded values survive the rewrite
    assert rows[1]["action_spread"] == "0.125" and rows[1]["action_std"] == ""


def test_a_new_file_has_exactly_the_metric_columns(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    MetricsWriter(path, fresh=True).write({"frame": 0, "phase": "eval"})
    header, rows = _read(path)
    assert header == METRIC_COLUMNS and len(rows) == 1
