"""The Helm chart renders, lints strictly and validates against Kubernetes 1.30 schemas; bad values fail
with a message naming the value."""
from __future__ import annotations

from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "alise"


def render(values: dict | None = None) -> list[dict]:
    out = helm.Chart.load(str(CHART)).render(values or {}, name="demo", namespace="llm")
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def by_name(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_lints_strictly():
    assert helm.lint(str(CHART), strict=True, kube_version="v1.30.0")["errors"] == []


@pytest.mark.parametrize("values", [{}, {"worker": {"replicas": 4}, "redis": {"enabled": False,
                                                                             "externalUrl": "redis://r:6379/0"}}])
def test_manifests_are_valid_kubernetes(values):
    docs = render(values)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "demo-alise-worker") in kinds and ("Service", "demo-alise-scheduler") in kinds
    assert (("Deployment", "demo-alise-redis") in kinds) == (not values)


def test_workers_scale_and_wire_to_the_scheduler():
    docs = render({"worker": {"replicas": 4}})
    worker = by_name(docs, "Deployment", "demo-alise-worker")
    spec = worker["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert worker["spec"]["replicas"] == 4
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--scheduler=demo-alise-scheduler:50051" in container["args"]
    assert spec["terminationGracePeriodSeconds"] > 60 + 5                       # drain + preStop
    assert container["readinessProbe"]["grpc"]["service"] == "" and "tcpSocket" in container["livenessProbe"]
    scheduler = by_name(docs, "Deployment", "demo-alise-scheduler")["spec"]["template"]["spec"]["containers"][0]
    assert "--redis-url=redis://demo-alise-redis:6379/0" in scheduler["args"]


def test_predictor_encoder_and_observation_stream_are_wired():
    predictor = by_name(render({"predictor": {"encoder": "static"}}), "Deployment", "demo-alise-predictor")
    args = predictor["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--encoder=static" in args and "--redis-url=redis://demo-alise-redis:6379/0" in args   # learns from the stream


@pytest.mark.parametrize("values,message", [
    ({"worker": {"terminationGracePeriodSeconds": 30}}, "worker.terminationGracePeriodSeconds"),
    ({"scheduler": {"policy": "random"}}, "scheduler.policy"),
    ({"redis": {"enabled": False}}, "redis.externalUrl"),
    ({"scheduler": {"modelName": "other"}}, "modelName"),
    ({"predictor": {"encoder": "bert"}}, "predictor.encoder"),
])
def test_bad_values_fail_with_the_value_named(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)
