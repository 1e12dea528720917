"""Where two runs' ``metrics.csv`` first differ: a variant against the run it departs from.

A switch that changes nothing until some event (``agent.stability.actor_grad_clip``: the
clip engages only when the actor's gradient norm exceeds it) leaves a run identical to the
unswitched run of the same seed, row for row, until that event. Rows are matched by
(phase, frame), so runs whose rows drift off the 1,000-frame grid line up where they can;
timing columns and cells empty in either run are not compared. Prints JSON: rows compared,
rows without a partner, and the first differing row with its differing columns (null when
every matched row is equal).

    python benchmarks/diagnostics/first_difference.py RUN_DIR REFERENCE_RUN_DIR
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

#: Columns that differ between identical computations (wall clock) or merely count steps.
IGNORED = frozenset({"seconds", "fps", "step"})


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"first_difference: no metrics.csv in {run_dir}")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def first_difference(rows: list[dict[str, str]], reference: list[dict[str, str]]) -> dict:
    """The first row of ``rows`` whose compared cells differ from ``reference``'s row of
    the same phase and frame."""
    by_key = {(r["phase"], r["frame"]): r for r in reference}
    compared = unmatched = 0
    for row in rows:
        other = by_key.get((row["phase"], row["frame"]))
        if other is None:
            unmatched += 1
            continue
        differing = {k: [v, other[k]] for k, v in row.items()
                     if k not in IGNORED and v and other.get(k) and v != other[k]}
        if differing:
            return {"compared": compared, "unmatched": unmatched, "last_frame": None,
                    "first_difference": {"phase": row["phase"], "frame": int(row["frame"]),
                                         "columns": differing}}
        compared += 1
    return {"compared": compared, "unmatched": unmatched,
            "last_frame": int(rows[-1]["frame"]) if rows else None, "first_difference": None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("reference_run_dir", type=Path)
    args = parser.parse_args(argv)
    result = first_difference(read_rows(args.run_dir), read_rows(args.reference_run_dir))
    print(json.dumps({"run": str(args.run_dir), "reference": str(args.reference_run_dir),
                      **result}, indent=1))


if __name__ == "__main__":
    main()
