#!/bin/bash
# Deep-overload CPU pair with the model's own lengths: fcfs vs alise+probe (interleaved), then alise without the probe.
cd /work/main
A=".venv/bin/alise bench sweep --dataset-name alpaca --dataset-path ../shared/data/alpaca_cleaned_1000.json --num-prompts 80 --chat --max-tokens 256 --rates 1.4 1.5 --prime 4 --alternate --predictor-arg=--model-dir=.bench-data/predictor"
date
$A --policies fcfs alise --worker-arg=--length-probe-path=/tmp/s18/probe.npz --out /tmp/s18/probe
date
$A --policies alise --worker-arg=--length-probe-layer=-2 --out /tmp/s18/noprobe
date
