"""Build a trained length predictor from real datasets and save it for the predictor service.

    python -m services.predictor.train ../shared/data/alpaca_5000.json ../shared/data/sharegpt_sample_1000.json \
        --out ~/.cache/alise/predictor

Formats: see services/predictor/datasets.py. Output lengths are counted with the served model's tokenizer
(`--tokenizer`). k, the similarity threshold and the kNN/MLP blend are chosen on a validation split.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from services.common.model_paths import cache_root, default_model_dir
from services.predictor.encoder import Encoder
from services.predictor.evaluate import embed_dataset, train_tuned
from services.predictor.evaluation import Split


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument("--tokenizer", default=str(default_model_dir()))
    p.add_argument("--out", type=Path, default=cache_root() / "predictor")
    p.add_argument("--limit", type=int, default=None, help="examples per dataset")
    a = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    encoder = Encoder()
    parts = [embed_dataset(d, encoder, tokenizer, a.limit)[0] for d in a.datasets]
    data = Split(np.concatenate([s.vecs for s in parts]), np.concatenate([s.chars for s in parts]),
                 np.concatenate([s.lengths for s in parts]), [k for s in parts for k in s.keys])
    predictor, chosen = train_tuned(encoder, data)
    predictor.save(a.out)
    print(json.dumps({"saved": str(a.out), "prompts": predictor.size, **chosen}, indent=2))


if __name__ == "__main__":
    main()
