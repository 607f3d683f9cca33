#!/bin/bash
# Deep overload on CPU with bursty arrivals (the Azure code trace's gaps scaled to the rate): fcfs vs alise + probe.
cd /work/main
date
.venv/bin/alise bench sweep --dataset-name alpaca --dataset-path ../shared/data/alpaca_cleaned_1000.json --num-prompts 80 --chat --max-tokens 256 --rates 1.4 1.5 --prime 4 --alternate --predictor-arg=--model-dir=.bench-data/predictor --worker-arg=--length-probe-path=/tmp/s19/probe/probe.npz --policies fcfs alise --arrival-trace ../shared/data/azure_llm_trace_2023/AzureLLMInferenceTrace_code.csv --out /tmp/s19/bursty/out
date
