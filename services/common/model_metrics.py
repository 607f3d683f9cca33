"""Prometheus metrics labelled with the served model (`model_name`), as vLLM labels its own, so dashboards,
KEDA and endpoint pickers can tell models apart and sum a series over pods.

Each service builds its metric families with a leading `model_name` label on its own registry and wraps them in
`Labelled`; `ModelLabel.name` is set once at start (the served model), and call sites stay as plain as
`metrics.TTFT.observe(s)` or `metrics.REJECTED.labels(field="prompt").inc()`.
"""
from __future__ import annotations


class ModelLabel:
    """The `model_name` label value of every metric of one service (set at start)."""

    def __init__(self, name: str = ""):
        self.name = name


class Labelled:
    """A metric family whose `model_name` is filled in: `.labels(**others)` for families with more labels,
    otherwise the child's own methods (inc, set, observe) directly."""

    def __init__(self, family, model: ModelLabel):
        self.family = family
        self.model = model

    def labels(self, **others):
        return self.family.labels(model_name=self.model.name, **others)

    def __getattr__(self, attr):
        return getattr(self.labels(), attr)
