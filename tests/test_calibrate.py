"""`bench.simulator.calibrate --replay`: the CPU engine serves a small workload and every one of its steps is fitted."""
from __future__ import annotations

import json
import re

import pytest

from bench.simulator.calibrate import main


def test_replay_fits_every_step_of_a_served_workload(tmp_path, model_dir, capsys):
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps([[20, 5], [30, 6], [10, 4]]))
    out = tmp_path / "cost.json"
    main(["--model-dir", str(model_dir), "--replay", str(lengths), "--rate", "50", "--out", str(out)])
    steps = int(re.search(r"(\d+) steps fitted", capsys.readouterr().out).group(1))
    # every request's prompt and each of its tokens after the first need a step of their own at least once: at
    # least the longest output's steps, at most one step per token of the whole workload
    assert 6 <= steps <= 20 + 30 + 10 + 5 + 6 + 4
    cost = json.loads(out.read_text())
    assert cost["base_s"] + cost["per_seq_s"] > 0 and all(cost[k] >= 0 for k in cost if k.endswith("_s"))


@pytest.mark.parametrize("rows,rate", [([], "5"), ([[10, 0]], "5"), ([[10, 3]], "0")])
def test_replay_refuses_an_empty_workload_or_no_rate_before_building_a_model(tmp_path, rows, rate):
    lengths = tmp_path / "lengths.json"
    lengths.write_text(json.dumps(rows))
    with pytest.raises(SystemExit, match="--replay needs"):
        main(["--model-dir", str(tmp_path / "no-model-here"), "--replay", str(lengths), "--rate", rate,
              "--out", str(tmp_path / "cost.json")])
