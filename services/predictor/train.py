"""Build a trained length predictor from real datasets and save it for the predictor service.

    python -m services.predictor.train ../shared/data/alpaca_5000.json ../shared/data/sharegpt_sample_1000.json \
        --out ~/.cache/alise/predictor

Formats: see services/predictor/datasets.py. Output lengths are counted with the served model's tokenizer
(`--tokenizer`). k, the similarity threshold and the kNN/MLP blend are chosen on a validation split.
With `--finetune` the encoder is first fine-tuned to rank prompts by output length (finetune.py) and saved
as `<out>/encoder`, which the predictor service then loads instead of the stock MiniLM. With
`--encoder static` the fast static encoder (static_encoder.py) is fine-tuned the same way and saved there.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path


from services.common.model_paths import cache_root, default_model_dir
from services.predictor.encoder import Encoder, load_encoder
from services.predictor.evaluate import embed_dataset, train_tuned
from services.predictor.evaluation import Split
from services.predictor.finetune import RankingData, train_minilm_encoder, train_static_encoder
from services.predictor.static_encoder import StaticEncoder


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument("--tokenizer", default=str(default_model_dir()))
    p.add_argument("--out", type=Path, default=cache_root() / "predictor")
    p.add_argument("--limit", type=int, default=None, help="examples per dataset")
    p.add_argument("--encoder", choices=("minilm", "static"), default="minilm",
                   help="static: the fast static encoder (distilled from MiniLM), always fine-tuned for ranking")
    p.add_argument("--finetune", action="store_true", help="MiniLM: fine-tune the encoder for ranking first")
    p.add_argument("--epochs", type=int, default=3, help="MiniLM fine-tuning epochs")
    a = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    encoder_dir = a.out.with_name(a.out.name + ".encoder")
    if a.encoder == "static":
        predictor, summary, keep = train_static(a, tokenizer, encoder_dir)
    else:
        predictor, summary, keep = train_minilm(a, tokenizer, encoder_dir)
    shutil.rmtree(a.out / "encoder", ignore_errors=True)
    predictor.save(a.out)
    if keep:
        encoder_dir.rename(a.out / "encoder")
    else:
        shutil.rmtree(encoder_dir, ignore_errors=True)
    print(json.dumps({"saved": str(a.out), "encoder": a.encoder, "prompts": predictor.size, **summary}, indent=2))


def train_static(a, tokenizer, encoder_dir: Path):
    """Fine-tune the static encoder for ranking, then fit index + MLP on its embeddings. The distilled base
    encoder is kept instead when it validates better (small data sets can overfit the token table)."""
    base = load_encoder("static")
    data, prompts = embed_all(a.datasets, base, tokenizer, a.limit)
    info = train_static_encoder(RankingData(prompts, data.side, data.lengths), data.groups, encoder_dir)
    tuned_encoder = StaticEncoder(encoder_dir)
    tuned, chosen = train_tuned(tuned_encoder, embed_all(a.datasets, tuned_encoder, tokenizer, a.limit)[0])
    stock, stock_chosen = train_tuned(base, data)
    summary = {**chosen, "encoder_val_kendall_tau": info["best_val_kendall_tau"],
               "base_val_kendall_tau": stock_chosen["val_kendall_tau"],
               "kept_finetuned_encoder": chosen["val_kendall_tau"] >= stock_chosen["val_kendall_tau"]}
    if not summary["kept_finetuned_encoder"]:
        base.save(encoder_dir)                  # the served encoder must be the one the index was built with
        tuned, summary = stock, {**summary, **stock_chosen}
    return tuned, summary, True


def train_minilm(a, tokenizer, encoder_dir: Path):
    """Stock MiniLM; with --finetune also a ranking-tuned copy, kept only if it validates better."""
    encoder = load_encoder("minilm")
    data, prompts = embed_all(a.datasets, encoder, tokenizer, a.limit)
    predictor, chosen = train_tuned(encoder, data)
    if not a.finetune:
        return predictor, chosen, False
    extra = train_minilm_encoder(RankingData(prompts, data.side, data.lengths), data.groups, encoder_dir, a.epochs)
    tuned_encoder = Encoder(model_path=str(encoder_dir), max_tokens=128)
    tuned_data, _ = embed_all(a.datasets, tuned_encoder, tokenizer, a.limit)
    tuned, tuned_chosen = train_tuned(tuned_encoder, tuned_data)
    # keep the fine-tuned encoder only if it ranks the validation split better (not on every data set)
    extra["frozen_val_kendall_tau"] = chosen["val_kendall_tau"]
    keep = extra["kept_finetuned_encoder"] = tuned_chosen["val_kendall_tau"] > chosen["val_kendall_tau"]
    if keep:
        predictor, chosen = tuned, tuned_chosen
    return predictor, {**chosen, **extra}, keep


def embed_all(paths, encoder, tokenizer, limit) -> tuple[Split, list[str]]:
    parts = [embed_dataset(d, encoder, tokenizer, limit) for d in paths]
    return Split.concat([s for s, _ in parts]), [p for _, ps in parts for p in ps]


if __name__ == "__main__":
    main()
