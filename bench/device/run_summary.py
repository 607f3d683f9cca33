"""Each run of a device sweep in a few lines (the diagnosis scripts run it on the lent GPU): its decode-only steps'
device time against session 30's fitted cost, where its waits were, its latency, throughput and cores.

    python3 bench/device/run_summary.py out/NAME/*.json          # with bench importable (env.sh sets PYTHONPATH)
    python3 bench/device/run_summary.py --max-admit-s 0.3 out/NAME/RUN.json ...  # exit 3: the machine lags
"""
import json
import sys

from bench.run_timeline import while_arriving
from bench.simulator.cost import IterationCost, load_cost

COST = "docs/results/h100_chat_2026-12-06_s30/sim/cost_h100_s30.json"


def summary(path: str, cost: IterationCost) -> str:
    d = json.load(open(path))
    s = d["step_times"]["worker-0"]
    m, dev = s["made_of"], s["device_s"]
    model = cost.steps(m["decode_steps"], m["decode_rows"], 0, m["decode_context_tokens"], 0)
    lat = d["normalized_latency_s"]
    arrivals_end_s = d["requests"] / d["request_rate"]
    arriving = {k: round(v, 3) for k, v in while_arriving(d.get("timeline", []), arrivals_end_s).items()}
    return "\n".join((
        f"{path} decode steps {m['decode_steps']} rows/step {m['decode_rows'] / m['decode_steps']:.0f} "
        f"ctx/step {m['decode_context_tokens'] / m['decode_steps']:.0f} device/modelled {dev['decode'] / model:.4f} "
        f"waited {dev['waited']:.2f} mean {lat['mean']:.4f} p99 {lat['p99']:.3f} tok/s {d['output_throughput']:.0f} "
        f"admit {d['admit_s']['mean']:.3f} ttft {d['ttft_s']['mean']:.3f} ttft p99 {d['ttft_s']['p99']:.2f}",
        f"  scheduler's waits {d.get('scheduler_waits')} worker's {s.get('assignment_wait_s')}",
        f"  client's event-loop lag {d.get('client_loop_lag_s')}",
        f"  timeline while arriving (bench/run_timeline.py) {arriving}",
        f"  cores {d['cpu_share']}"))


def lagging(path: str, max_admit_s: float) -> bool:
    """Whether a run's requests took longer than max_admit_s to get in, at the mean: a machine whose CPU side lags
    (0.4-3.4 s where the others took 0.09 s, session 33), whose runs compare with nothing."""
    return json.load(open(path))["admit_s"]["mean"] > max_admit_s


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--max-admit-s"]:     # exit 3 if a run lagged (the diagnosis scripts stop there)
        sys.exit(3 if any(lagging(path, float(args[1])) for path in args[2:]) else 0)
    cost = load_cost(COST)
    for path in args:
        try:
            print(summary(path, cost))
        except (KeyError, TypeError, ZeroDivisionError) as e:     # not a run, or one that failed part way
            print(path, "no summary:", repr(e))
