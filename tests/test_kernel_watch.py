"""The worker's watch on Triton kernel variants met after warm-up: counted, logged, and any hook installed
before it still called. Triton itself needs a GPU, so a module with the same `knobs.runtime` hook stands in."""
import sys
import types

from services.worker import kernel_watch


def fake_triton(monkeypatch, previous):
    runtime = types.SimpleNamespace(jit_post_compile_hook=previous)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=types.SimpleNamespace(runtime=runtime)))
    monkeypatch.setattr(kernel_watch, "_watching", False)
    monkeypatch.setattr(kernel_watch, "_late", {})
    return runtime


def test_variants_met_after_warm_up_are_counted_and_the_earlier_hook_still_runs(monkeypatch, caplog):
    earlier = []
    runtime = fake_triton(monkeypatch, lambda **kw: earlier.append(kw["fn"].name))
    assert kernel_watch.late_variants() is None                  # nothing watched yet
    assert kernel_watch.watch_after_warm_up() and kernel_watch.watch_after_warm_up()   # twice: one hook
    kernel = types.SimpleNamespace(name="_paged_prefill_kernel")
    for _ in range(2):
        runtime.jit_post_compile_hook(key="k", repr="variant", fn=kernel, compile={}, is_manual_warmup=False,
                                      already_compiled=False)
    assert kernel_watch.late_variants() == {"_paged_prefill_kernel": 2}
    assert earlier == ["_paged_prefill_kernel"] * 2
    assert "first used after warm-up: _paged_prefill_kernel" in caplog.text


def test_a_triton_without_the_hook_is_not_watched(monkeypatch):
    fake_triton(monkeypatch, None)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=types.SimpleNamespace()))
    assert not kernel_watch.watch_after_warm_up()
    assert kernel_watch.late_variants() is None
