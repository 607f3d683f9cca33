"""Kernel variants that a GPU worker first meets while serving, named in its log.

Triton compiles a kernel once per specialisation (constexprs, pointer alignment, integers equal to 1 or
divisible by 16) the first time a process launches it, on the calling thread: on the engine thread that is a
stall of up to seconds on a fresh machine. The warm-up (factory.warm_up) and the decode-graph capture are
meant to meet every variant before the worker takes jobs; this watch says when one was missed, so a slow
first run points at its cause instead of looking like noise (the H200 sweeps of 2026-12-03 found one).
Triton's post-compile hook also fires when a variant comes from its disk cache: then the stall is a load.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("alise.worker.kernels")

_lock = threading.Lock()
_late: dict[str, int] = {}
_watching = False


def _kernel_name(kwargs: dict) -> str:
    fn = kwargs.get("fn")
    return str(getattr(fn, "name", None) or "a Triton kernel")


def _watcher(previous):
    """The hook: count and log the variant, then call the hook that was there before (torch installs its own)."""
    def on_compile(*args, **kwargs):
        name = _kernel_name(kwargs)
        with _lock:
            _late[name] = _late.get(name, 0) + 1
        log.warning("kernel variant first used after warm-up: %s (compiled or loaded on the serving path): %s",
                    name, kwargs.get("repr", ""))
        return previous(*args, **kwargs) if previous is not None else None
    return on_compile


def watch_after_warm_up() -> bool:
    """From now on, log every Triton kernel variant the process meets for the first time. False when this
    Triton has no post-compile hook (the watch is then off; serving is unchanged)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = getattr(knobs, "runtime", None)
    if runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return False
    global _watching
    if not _watching:                      # once per process: a second watch would count every variant twice
        runtime.jit_post_compile_hook = _watcher(runtime.jit_post_compile_hook)
        _watching = True
    return True


def late_variants() -> dict[str, int] | None:
    """Kernel name -> variants first met after warm-up, so far; None when nothing is watched (a CPU worker, or a
    Triton without the hook)."""
    if not _watching:
        return None
    with _lock:
        return dict(_late)
