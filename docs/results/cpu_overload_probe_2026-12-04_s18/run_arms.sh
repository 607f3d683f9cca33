#!/bin/bash
cd /work/main
date
.venv/bin/alise bench sweep --dataset-name alpaca --dataset-path ../shared/data/alpaca_cleaned_1000.json --num-prompts 80 --chat --max-tokens 256 --rates 1.4 1.5 --prime 4 --alternate --predictor-arg=--model-dir=.bench-data/predictor --worker-arg=--length-probe-path=/tmp/s18/probe.npz --policies fcfs alise alise@noprobe --variant-worker-arg=noprobe=--length-probe-layer=-2 --out /tmp/s18/arms
date
