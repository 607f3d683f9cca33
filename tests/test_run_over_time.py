"""bench/run_over_time.py: a run's admission and queue waits by tenth of its arrivals, from the per-request CSV
(plain or xz), so a wait that grows through a run shows as one."""
from __future__ import annotations

import csv
import lzma

from bench.run_over_time import by_arrival, main, read_run

FIELDS = ("index,expected_output_tokens,start_s,ok,error,prompt_tokens,output_tokens,ttft_s,e2e_s,queue_s,admit_s,"
          "preemptions,predicted_output_tokens,repredicted_output_tokens,finish_reason").split(",")


def write_run(path, n=40):
    rows = [dict(index=i, expected_output_tokens=10, start_s=(n - i) * 0.5, ok=True, error="", prompt_tokens=5,
                 output_tokens=10, ttft_s=1.0, e2e_s=2.0, queue_s=0.01 * (n - i), admit_s=0.1 * (n - i),
                 preemptions=0, predicted_output_tokens=10, repredicted_output_tokens=0,
                 finish_reason="FINISH_REASON_LENGTH") for i in range(n)]       # written out of arrival order
    rows[0]["admit_s"] = ""                                                     # a run from before admit_s
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def test_waits_by_tenth_of_arrivals_grow_as_they_grew(tmp_path, capsys):
    for name in ("run.csv", "run.csv.xz"):
        write_run(tmp_path / name)
        parts = by_arrival(read_run(tmp_path / name))
        assert len(parts) == 10 and [p["start_s"] for p in parts] == sorted(p["start_s"] for p in parts)
        admits = [p["admit_s"]["p50"] for p in parts]
        assert admits == sorted(admits) and admits[0] < 0.5 < 3.5 < admits[-1]
        assert all(p["queue_s"]["p50"] <= p["queue_s"]["p90"] for p in parts)
    main([str(tmp_path / "run.csv.xz")])
    assert capsys.readouterr().out.count(" s: admit p50") == 10
