"""Worker settings: one validated dataclass, from flags or ALISE_WORKER_* environment variables."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from services.common.batch_limits import DEFAULT_EARLY_ROWS, MAX_STEP_ROWS
from services.common.config_args import config_from_args
from services.common.model_paths import DEFAULT_MODEL_NAME, default_model_dir
from services.common.tls import TlsFiles


@dataclass(frozen=True)
class WorkerConfig:
    scheduler: str = "127.0.0.1:50061"   # the scheduler's worker gateway (not its client port)
    service_token_file: str = ""         # the internal service token; else $ALISE_SERVICE_TOKEN
    tls_ca: str = ""                     # dial the scheduler over TLS, verifying it with this CA
    tls_cert: str = ""                   # and present this certificate (mTLS gateway)
    tls_key: str = ""
    listen: str = "127.0.0.1:0"          # health + reflection
    metrics_port: int = 0                # Prometheus /metrics on this port; 0 = off
    worker_id: str = ""                  # default: hostname-pid
    model_name: str = DEFAULT_MODEL_NAME
    model_dir: str = str(default_model_dir())
    device: str = "cpu"
    dtype: str = "float32"
    random_weights: bool = False
    block_size: int = 16
    num_blocks: int = 0                  # KV pool size; 0 = auto (CPU: 1024, GPU: gpu_memory_utilization)
    gpu_memory_utilization: float = 0.90 # share of GPU memory for weights + activations + KV pool
    enforce_eager: bool = False          # GPU: no CUDA graphs for decode steps
    # GPU: time each decode graph once captured and replay a larger one for a bucket whose own is slower
    # (cuBLAS's GEMM algorithm choice by row count: cuda_graphs.py)
    timed_graph_buckets: bool = True
    prefix_caching: bool = True          # reuse the KV of full blocks whose token prefix was seen before
    overlap_steps: bool = True           # GPU: plan and launch step N+1 while step N runs (engine.py)
    # decode rows that share prefix blocks (turns of one conversation) launch next to each other, so the GPU reads
    # their shared KV about at once and the second read may come from L2 (step_scheduler._prefix_grouped). Off until
    # a live run shows it faster: the attention kernel alone is 0-7% faster so on rebuilt live batches, while an
    # earlier form of it (rows by block id) changed no live step's speed (docs/BENCHMARKS.md, session 32)
    group_prefix_rows: bool = False
    num_host_blocks: int = 512           # swap space in host memory
    max_batch: int = 0                   # sequences per step; 0 = auto (CPU 48; GPU from the KV pool's room)
    # jobs sent to be prefilled early decode their early tokens beside a full batch, at most this many at once
    # (it says this number when it registers, and the scheduler sends no more); the graphs cover max_batch + this
    early_rows: int = DEFAULT_EARLY_ROWS
    token_budget: int = 0                # tokens per step (prefill chunks + decodes); 0 = auto (CPU 512, GPU 4096)
    max_model_len: int = 0               # 0: the model's context, capped by the KV pool
    stream_updates_per_step: int = 128   # job token updates sent per step on average (token_batcher.py); 0 = all
    length_probe_layer: int = -1         # layer whose hidden state estimates output lengths (length_probe.py);
                                         # -1 = the middle layer, -2 = off
    length_probe_path: str = ""          # where the probe keeps what it learned across restarts ("" = in memory)
    length_probe_read_only: bool = False # load the path but never write it (benchmark runs must not teach each other)
    load_report_s: float = 0.2
    # a load report at least this often even when nothing changed: the scheduler takes a worker silent for longer
    # than its worker_silence_s for hung or cut off (sent by the engine loop, so a stuck engine goes silent too)
    heartbeat_s: float = 5.0
    drain_timeout_s: float = 30.0

    def __post_init__(self):
        if self.block_size <= 0:
            raise ValueError("block_size must be > 0")
        if self.device.startswith("cuda") and self.block_size & (self.block_size - 1):
            # the GPU kernels read the context in chunks of whole blocks, with power-of-two ranges
            raise ValueError(f"block_size must be a power of two on a GPU, got {self.block_size}")
        if not self.heartbeat_s > 0:
            raise ValueError("heartbeat_s must be > 0")
        if self.stream_updates_per_step < 0:
            raise ValueError("stream_updates_per_step must be >= 0 (0 = every step)")
        for name in ("max_batch", "token_budget"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = auto)")
        if self.early_rows < 1:
            raise ValueError("early_rows must be >= 1 (a job sent to be prefilled early must get a row)")
        if self.max_batch + self.early_rows > MAX_STEP_ROWS:      # before any memory is sized for them
            raise ValueError(f"max_batch + early_rows must be <= {MAX_STEP_ROWS}, got {self.max_batch + self.early_rows}")
        if self.num_blocks < 0:
            raise ValueError("num_blocks must be >= 0 (0 = auto)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.length_probe_layer < -2:
            raise ValueError("length_probe_layer must be a layer index, -1 (the middle layer) or -2 (off)")
        if self.num_host_blocks < 0:
            raise ValueError("num_host_blocks must be >= 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "WorkerConfig":
        return config_from_args(cls, "ALISE worker", "ALISE_WORKER_", argv)
