"""The Redis commands a stack's services sent during a run, by command (Redis's own INFO commandstats): how many
round trips and how much of Redis's time each kind of job-store call costs per request. The scheduler's one
event loop pays a Python client's encoding and a socket write for each call, so their number is where its CPU
goes under load (session 44: its loop near a full core at 64 req/s)."""
from __future__ import annotations


def read_commandstats(redis_url: str) -> dict[str, dict[str, float]]:
    """{command: {"calls", "usec"}} since Redis started (scripts count as evalsha / fcall)."""
    import redis                  # the bench loads it only when a stack is measured

    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): {"calls": float(v["calls"]), "usec": float(v["usec"])}
            for name, v in stats.items()}


def commands_during(before: dict, after: dict, requests: int) -> dict[str, dict[str, float]]:
    """Each command's calls and Redis microseconds between two readings, and its calls per request; busiest first."""
    out = {}
    for name, now in after.items():
        if name == "info":             # the benchmark's own reading of these counts
            continue
        then = before.get(name, {"calls": 0.0, "usec": 0.0})
        if (calls := now["calls"] - then["calls"]) > 0:
            out[name] = {"calls": int(calls), "usec": int(now["usec"] - then["usec"]),
                         "per_request": round(calls / max(1, requests), 2)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["calls"]))
