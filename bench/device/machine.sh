# Sourced by the diagnosis scripts on the lent GPU (bash): the machine's GPU, CPUs and clocks printed, and `rate`
# set to the chat3000 rate that loads this GPU at ~1.3x fcfs's capacity (RATE overrides it).
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) rate=${RATE:-55} ;; *) rate=${RATE:-48} ;; esac
echo "gpu: $gpu, rate $rate, cpus: $(nproc), $(lscpu | grep "Model name" | head -1)"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv
