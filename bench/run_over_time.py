"""A run's requests by tenth of their arrivals: how long each tenth took to get in (admission, as the client saw it)
and to be first placed on a worker (queue), median and p90. A wait that grows through the run is a queue at some
part that serves requests slower than they arrive; session 33 told a machine whose scheduler could not keep up
(admission growing to ~10 s, jobs queued a minute while the worker ran 73 rows a step) from one that kept up.

    python -m bench.run_over_time out/sweep/alise-r48.csv [more.csv or .csv.xz ...]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from bench.serve import open_run_csv
from bench.sweep import saved_result

PARTS = 10


def by_arrival(results: list, parts: int = PARTS) -> list[dict]:
    """Per part of the requests in arrival order: its first arrival, and admit / queue median and p90 (seconds)."""
    ordered = sorted(results, key=lambda r: r.start_s)
    size = max(1, -(-len(ordered) // parts))
    out = []
    for i in range(0, len(ordered), size):
        part = ordered[i:i + size]
        row = {"start_s": part[0].start_s}
        for name in ("admit_s", "queue_s"):
            values = sorted(v for r in part if (v := getattr(r, name)) is not None)
            if values:
                row[name] = {"p50": values[len(values) // 2], "p90": values[int(0.9 * (len(values) - 1))]}
        out.append(row)
    return out


def read_run(path: Path) -> list:
    with open_run_csv(path) as f:
        return [saved_result(row) for row in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="a run's per-request CSV (`alise bench`), or it xz-compressed")
    a = p.parse_args(argv)
    for path in a.runs:
        print(path)
        for row in by_arrival(read_run(path)):
            waits = "  ".join(f"{name[:-2]} p50 {row[name]['p50']:6.3f} p90 {row[name]['p90']:6.3f}"
                              for name in ("admit_s", "queue_s") if name in row)
            print(f"  from {row['start_s']:6.1f} s: {waits}")


if __name__ == "__main__":
    main()
