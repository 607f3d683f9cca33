"""Service settings from flags and environment variables (services/common/config_args.py)."""
from __future__ import annotations

import pytest

from services.worker.config import WorkerConfig


def test_a_switch_that_defaults_on_stays_on_and_can_be_turned_off(monkeypatch):
    """Regression: every bool flag was a plain store_true defaulting to False, so prefix caching and
    overlapped steps (dataclass default True) were off in every worker started from the command line."""
    monkeypatch.delenv("ALISE_WORKER_PREFIX_CACHING", raising=False)
    cfg = WorkerConfig.from_args([])
    assert cfg.prefix_caching and cfg.overlap_steps and not cfg.enforce_eager
    cfg = WorkerConfig.from_args(["--no-prefix-caching", "--enforce-eager"])
    assert not cfg.prefix_caching and cfg.enforce_eager and cfg.overlap_steps
    monkeypatch.setenv("ALISE_WORKER_PREFIX_CACHING", "0")
    assert not WorkerConfig.from_args([]).prefix_caching
    assert WorkerConfig.from_args(["--prefix-caching"]).prefix_caching


def test_numbers_come_from_flags_then_environment_then_defaults(monkeypatch):
    monkeypatch.setenv("ALISE_WORKER_MAX_BATCH", "24")
    assert WorkerConfig.from_args([]).max_batch == 24
    assert WorkerConfig.from_args(["--max-batch", "8"]).max_batch == 8
    monkeypatch.delenv("ALISE_WORKER_MAX_BATCH")
    assert WorkerConfig.from_args([]).max_batch == 0          # auto


def test_a_worker_gives_early_jobs_at_least_one_row():
    assert WorkerConfig.from_args([]).early_rows == 8            # session 34: 8 ran better live than 32
    assert WorkerConfig.from_args(["--early-rows", "4"]).early_rows == 4
    with pytest.raises(ValueError, match="early_rows"):      # jobs sent to be prefilled early would never run
        WorkerConfig.from_args(["--early-rows", "0"])


def test_a_worker_refuses_more_rows_than_any_engine_runs_before_it_sizes_anything():
    """Left by the eighth review: `--early-rows` had no upper bound, and a huge value sized the decode graphs'
    buffers past GPU memory at start. A step's rows (max batch + early rows) stop where the scheduler's
    registration check does."""
    assert WorkerConfig.from_args(["--max-batch", "4000", "--early-rows", "96"]).early_rows == 96
    for flags in (["--early-rows", "5000"], ["--max-batch", "4096"]):
        with pytest.raises(ValueError, match="max_batch \\+ early_rows must be <= 4096"):
            WorkerConfig.from_args(flags)


def test_scheduler_times_refuse_negative_and_nan():
    import pytest

    from services.scheduler.config import SchedulerConfig

    for flags in (["--park-after-s", "-1"], ["--park-after-s", "nan"], ["--aging-s", "0"], ["--aging-s", "nan"],
                  ["--park-wait-factor", "-1"], ["--park-wait-factor", "nan"], ["--park-wait-factor", "inf"],
                  ["--max-parking", "0"], ["--early-tokens", "0"], ["--early-tokens", "100000"]):
        with pytest.raises((ValueError, SystemExit)):
            SchedulerConfig.from_args(flags)
    assert SchedulerConfig.from_args(["--park-after-s", "2.5"]).park_after_s == 2.5
    assert SchedulerConfig.from_args(["--park-wait-factor", "0"]).park_wait_factor == 0
    assert SchedulerConfig.from_args(["--max-parking", "4"]).max_parking == 4
    assert SchedulerConfig.from_args(["--early-tokens", "32"]).early_tokens == 32
    assert SchedulerConfig.from_args([]).aging_s == 45.0        # session 41 (30 from 34, 15 before): docs/BENCHMARKS.md
    assert not SchedulerConfig.from_args([]).learn_forced_lengths                  # serving: off unless asked
    assert SchedulerConfig.from_args(["--learn-forced-lengths"]).learn_forced_lengths
    assert not SchedulerConfig.from_args([]).serve_step_sample                     # benchmarks ask for it


def test_a_gpu_worker_refuses_a_block_size_its_kernels_cannot_read():
    """The GPU kernels read whole blocks with power-of-two ranges: a block of 24 used to pass the config and fail
    at the first graph capture with a compiler error."""
    with pytest.raises(ValueError, match="power of two"):
        WorkerConfig(device="cuda", block_size=24)
    assert WorkerConfig(device="cuda", block_size=32).block_size == 32
    assert WorkerConfig(device="cpu", block_size=24).block_size == 24      # the CPU path reads any size


def test_certificate_names_need_client_certificates():
    """Names to check in certificates that no caller is asked for would be a check that never runs."""
    import pytest

    from services.scheduler.config import SchedulerConfig

    with pytest.raises(ValueError, match="worker_mtls"):
        SchedulerConfig.from_args(["--worker-cert-names", "alise-worker"])
    for blank in (" ", ",", " , "):       # names nothing: an empty list would turn the check off
        with pytest.raises(ValueError, match="names no certificate"):
            SchedulerConfig.from_args(["--worker-cert-names", blank, "--worker-mtls", "--tls-cert", "c",
                                       "--tls-key", "k", "--tls-ca", "a"])
    cfg = SchedulerConfig.from_args(["--worker-cert-names", "alise-worker", "--worker-mtls", "--tls-cert", "c",
                                     "--tls-key", "k", "--tls-ca", "a"])
    assert cfg.worker_cert_names == "alise-worker"
