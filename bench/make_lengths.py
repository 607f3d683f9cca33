"""Turn a ShareGPT or Alpaca JSON file into (prompt tokens, output tokens) pairs for engine benchmarks.

The benchmarks run random-weight models, so only lengths matter: the trace decides how long each
request's prompt and output are (ignore_eos). Lengths are counted with the given tokenizer; like
vLLM's ShareGPT benchmark, pairs with a prompt over 1024 or a total over 2048 tokens are dropped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def pairs_from(path: Path):
    data = json.loads(path.read_text())
    for item in data:
        if "conversations" in item:                       # ShareGPT: each human turn + the gpt reply
            turns = item["conversations"]
            for a, b in zip(turns, turns[1:]):
                if a["from"] == "human" and b["from"] == "gpt":
                    yield a["value"], b["value"]
        elif "instruction" in item:                       # Alpaca
            yield (item["instruction"] + "\n" + item.get("input", "")).strip(), item["output"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dataset", type=Path)
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, default=1000)
    a = p.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    out = []
    for prompt, reply in pairs_from(a.dataset):
        n_in, n_out = len(tok.encode(prompt)), len(tok.encode(reply))
        if 4 <= n_in <= 1024 and 4 <= n_out and n_in + n_out <= 2048:
            out.append([n_in, n_out])
        if len(out) >= a.limit:
            break
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out))
    mean_in = sum(x for x, _ in out) / len(out)
    mean_out = sum(y for _, y in out) / len(out)
    print(f"{len(out)} pairs, mean prompt {mean_in:.0f}, mean output {mean_out:.0f} tokens -> {a.out}")


if __name__ == "__main__":
    main()
