"""The Helm chart renders, lints strictly and validates against Kubernetes 1.30 schemas; bad values fail
with a message naming the value."""
from __future__ import annotations

from pathlib import Path

import base64
import json
import re
import shutil
import subprocess

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "alise"


TENANT = {"name": "team-a", "key_sha256": "ab" * 32, "max_priority": 10}


def render(values: dict | None = None, tenants: list | None = None) -> list[dict]:
    values = {"auth": {"tenants": [TENANT] if tenants is None else tenants}, **(values or {})}
    out = render_files(values)
    return [doc for name, text in out.items() if not name.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


def render_files(values: dict) -> dict[str, str]:
    return helm.Chart.load(str(CHART)).render(values, name="demo", namespace="llm")


def by_name(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_lints_strictly():
    lint = helm.lint(str(CHART), strict=True, kube_version="v1.30.0", values={"auth": {"tenants": [TENANT]}})
    assert lint["errors"] == []


@pytest.mark.parametrize("values", [{}, {"worker": {"replicas": 4}, "redis": {"enabled": False,
                                                                             "externalUrl": "redis://r:6379/0"}}])
def test_manifests_are_valid_kubernetes(values):
    docs = render(values)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "demo-alise-worker") in kinds and ("Service", "demo-alise-scheduler") in kinds
    assert (("StatefulSet", "demo-alise-redis") in kinds) == (not values)


def test_workers_scale_and_wire_to_the_scheduler():
    docs = render({"worker": {"replicas": 4}})
    worker = by_name(docs, "Deployment", "demo-alise-worker")
    spec = worker["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert worker["spec"]["replicas"] == 4
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--scheduler=demo-alise-scheduler:50061" in container["args"]         # the worker gateway port
    assert spec["terminationGracePeriodSeconds"] > 60 + 5                       # drain + preStop
    assert container["readinessProbe"]["grpc"]["service"] == "" and "tcpSocket" in container["livenessProbe"]
    scheduler = by_name(docs, "Deployment", "demo-alise-scheduler")["spec"]["template"]["spec"]["containers"][0]
    assert redis_url_env(scheduler, "ALISE_SCHEDULER_REDIS_URL") == "redis://:$(REDIS_PASSWORD)@demo-alise-redis:6379/0"


def redis_url_env(container: dict, name: str) -> str:
    """The Redis URL a container gets: in its environment after REDIS_PASSWORD (which it expands), never in its
    arguments, which every user of the node can read."""
    env = [e["name"] for e in container["env"]]
    assert env.index("REDIS_PASSWORD") < env.index(name)
    assert not any("redis" in a.lower() and "password" in a.lower() for a in container["args"])
    return next(e["value"] for e in container["env"] if e["name"] == name)


def test_predictor_encoder_and_observation_stream_are_wired():
    predictor = by_name(render({"predictor": {"encoder": "static"}}), "Deployment", "demo-alise-predictor")
    args = predictor["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--encoder=static" in args and "--math-threads=1" in args
    wider = by_name(render({"predictor": {"mathThreads": 4}}), "Deployment", "demo-alise-predictor")
    assert "--math-threads=4" in wider["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-kind-pull" not in args
    unpulled = by_name(render({"predictor": {"kindPull": False, "quantize": True, "modelPvc": "pvc"}}), "Deployment",
                       "demo-alise-predictor")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-kind-pull" in unpulled
    # and the predictor knows every flag the chart gives it (an unknown one would crash the pod at start)
    from services.predictor.server import arg_parser
    a = arg_parser().parse_args([x for x in unpulled if x.startswith("--")])
    assert a.no_kind_pull and a.quantize and a.encoder == "auto"
    container = predictor["spec"]["template"]["spec"]["containers"][0]
    assert redis_url_env(container, "ALISE_PREDICTOR_REDIS_URL") == "redis://:$(REDIS_PASSWORD)@demo-alise-redis:6379/0"


def test_secure_by_default_credentials_persistence():
    """Issue 8: Redis with AOF on a PVC and AUTH from a Secret; every service holds the service token;
    clients are known only by key digests; the worker gateway is a port of its own."""
    docs = render()
    redis_set = by_name(docs, "StatefulSet", "demo-alise-redis")["spec"]
    redis = redis_set["template"]["spec"]
    args = redis["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "everysec"
    # the password in a file an init container writes from the environment, never in an argument (review, session 22)
    assert args[0] == "/auth/redis.conf" and not any("PASSWORD" in a or "requirepass" in a for a in args)
    init = redis["initContainers"][0]
    assert "requirepass" in init["command"][-1] and "$REDIS_PASSWORD" in init["command"][-1]
    assert [e["name"] for e in init["env"]] == ["REDIS_PASSWORD"] and "env" not in redis["containers"][0]
    claim = redis_set["volumeClaimTemplates"][0]          # a StatefulSet: one Redis, its own volume, kept
    assert claim["metadata"]["name"] == redis["containers"][0]["volumeMounts"][0]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert redis_set["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    secrets = by_name(docs, "Secret", "demo-alise-secrets")["data"]
    assert len(secrets["service-token"]) > 40 and secrets["redis-password"]
    keys = json.loads(by_name(docs, "Secret", "demo-alise-api-keys")["stringData"]["api-keys.json"])
    assert keys == {"tenants": [TENANT]}
    for name in ("scheduler", "worker", "predictor"):
        spec = by_name(docs, "Deployment", f"demo-alise-{name}")["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert "--service-token-file=/etc/alise/service-token/service-token" in container["args"], name
        assert any(v["name"] == "service-token" for v in spec["volumes"]), name
    service = by_name(docs, "Service", "demo-alise-scheduler")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["worker-gateway"] == 50061


def certificate_text(tmp_path, data: dict, name: str) -> str:
    """The certificate of a rendered TLS Secret, as openssl prints it, after checking it against the Secret's CA."""
    for key in ("tls.crt", "ca.crt"):
        (tmp_path / f"{name}-{key}").write_bytes(base64.b64decode(data[key]))
    subprocess.run(["openssl", "verify", "-CAfile", tmp_path / f"{name}-ca.crt", tmp_path / f"{name}-tls.crt"],
                   check=True, capture_output=True)
    return subprocess.run(["openssl", "x509", "-in", tmp_path / f"{name}-tls.crt", "-noout", "-text"], check=True,
                          capture_output=True, text=True).stdout


def test_tls_on_every_link_with_mtls_between_services(tmp_path):
    docs = render()
    secrets = {n: by_name(docs, "Secret", f"demo-alise-tls{'' if n == 'scheduler' else '-' + n}")["data"]
               for n in ("scheduler", "predictor", "worker")}
    assert len({data["ca.crt"] for data in secrets.values()}) == 1          # one CA for all
    texts = {n: certificate_text(tmp_path, data, n) for n, data in secrets.items()}
    # a certificate of its own for each service, named for it, valid only for its own Service's names (a worker's
    # key, taken from its pod, can neither serve as the scheduler nor call the predictor as it)
    assert "Subject: CN = alise-scheduler" in texts["scheduler"] and "DNS:demo-alise-scheduler.llm.svc" in texts["scheduler"]
    assert "demo-alise-predictor" not in texts["scheduler"]
    assert "Subject: CN = alise-predictor" in texts["predictor"] and "DNS:demo-alise-predictor.llm.svc" in texts["predictor"]
    assert "Subject: CN = alise-worker" in texts["worker"] and "DNS:" not in texts["worker"]
    text = texts["scheduler"]
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text   # both roles
    containers = {n: by_name(docs, "Deployment", f"demo-alise-{n}")["spec"]["template"]["spec"]["containers"][0]
                  for n in ("scheduler", "predictor", "worker")}
    assert {"--tls-cert=/etc/alise/tls/tls.crt", "--worker-mtls", "--health-listen=0.0.0.0:50071",
            "--worker-cert-names=alise-worker"} <= set(containers["scheduler"]["args"])
    assert {"--mtls", "--health-listen=0.0.0.0:50072", "--client-cert-names=alise-scheduler"} \
        <= set(containers["predictor"]["args"])
    assert {"--tls-ca=/etc/alise/tls/ca.crt", "--tls-cert=/etc/alise/tls/tls.crt"} <= set(containers["worker"]["args"])
    assert containers["scheduler"]["readinessProbe"]["grpc"]["port"] == 50071      # probes cannot do TLS
    worker_tls = next(v for v in deployments(docs)["worker"]["volumes"] if v["name"] == "tls")["secret"]
    assert "items" not in worker_tls and worker_tls["secretName"] == "demo-alise-tls-worker"   # it presents its own
    one_way = next(v for v in deployments(render({"tls": {"mtls": False}}))["worker"]["volumes"] if v["name"] == "tls")
    assert one_way["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]   # else the CA only: no key on a worker
    plain = render({"tls": {"enabled": False}})
    scheduler = by_name(plain, "Deployment", "demo-alise-scheduler")["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--tls") for a in scheduler["args"]) and scheduler["readinessProbe"]["grpc"]["port"] == 50051
    assert not any(d["kind"] == "Secret" and d["metadata"]["name"] == "demo-alise-tls" for d in plain)


def test_tls_from_existing_secrets_one_per_service_or_one_for_all():
    own = render({"tls": {"existingSecrets": {"scheduler": "s-tls", "predictor": "p-tls", "worker": "w-tls"},
                          "certNames": {"scheduler": "sched.example", "predictor": "pred", "worker": "gpu-worker"}}})
    assert not any(d["kind"] == "Secret" and d["metadata"]["name"].startswith("demo-alise-tls") for d in own)
    pods = deployments(own)
    assert {n: next(v for v in pods[n]["volumes"] if v["name"] == "tls")["secret"]["secretName"]
            for n in ("scheduler", "predictor", "worker")} == {"scheduler": "s-tls", "predictor": "p-tls", "worker": "w-tls"}
    assert "--worker-cert-names=gpu-worker" in pods["scheduler"]["containers"][0]["args"]
    assert "--client-cert-names=sched.example" in pods["predictor"]["containers"][0]["args"]
    shared = deployments(render({"tls": {"existingSecret": "all-tls"}}))    # one certificate: no names to tell apart
    for n in ("scheduler", "predictor", "worker"):
        assert next(v for v in shared[n]["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "all-tls"
        assert not any("cert-names" in a for a in shared[n]["containers"][0]["args"]), n
    notes = render_files({"auth": {"tenants": [TENANT]}, "tls": {"existingSecrets": {
        "scheduler": "s-tls", "predictor": "p-tls", "worker": "w-tls"}}})
    assert "get secret s-tls" in next(t for n, t in notes.items() if n.endswith("NOTES.txt"))   # clients' CA
    with pytest.raises(helm.HelmError, match="tls.existingSecrets"):
        render({"tls": {"existingSecrets": {"scheduler": "s-tls", "predictor": "", "worker": ""}}})
    with pytest.raises(helm.HelmError, match="set one of them"):
        render({"tls": {"existingSecret": "all-tls",
                        "existingSecrets": {"scheduler": "s-tls", "predictor": "p-tls", "worker": "w-tls"}}})


def render_upgrade(tmp_path, cluster: dict[str, dict], values: dict | None = None) -> list[dict]:
    """Render as `helm upgrade` does against a release whose Secrets are `cluster` (name -> object). The offline
    renderer's `lookup` finds nothing, so this renders a copy of the chart whose lookups of Secrets read them here."""
    chart = tmp_path / "alise"
    shutil.copytree(CHART, chart)
    replaced = 0
    for template in chart.glob("templates/*"):
        text, n = re.subn(r'lookup "v1" "Secret" (\.Release\.Namespace|\$ns) ', "get $.Values.cluster ", template.read_text())
        template.write_text(text)
        replaced += n
    assert replaced >= 4, "a lookup of the chart is spelled another way: this render would not see the cluster"
    schema = json.loads((chart / "values.schema.json").read_text())
    schema["properties"]["cluster"] = {"type": "object"}
    (chart / "values.schema.json").write_text(json.dumps(schema))
    cluster = {"demo-alise-secrets": {}, **cluster}
    out = helm.Chart.load(str(chart)).render({"auth": {"tenants": [TENANT]}, **(values or {}), "cluster": cluster},
                                             name="demo", namespace="llm")
    return [doc for name, text in out.items() if not name.endswith("NOTES.txt") for doc in yaml.safe_load_all(text) if doc]


def tls_secrets(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("demo-alise-tls")}


def test_an_upgrade_keeps_the_certificates_it_made_and_an_older_release_keeps_its_one(tmp_path):
    """The upgrade paths (review, session 23), which `helm template` cannot take: generated certificates are kept
    while all three exist with the names asked for, made again (one new CA) when a name changes; a release of an
    earlier chart version keeps its one shared certificate, as it is, with no name checks (its CA unchanged)."""
    first = tls_secrets(render())
    kept = tls_secrets(render_upgrade(tmp_path / "a", first))
    assert {n: s["data"] for n, s in kept.items()} == {n: s["data"] for n, s in first.items()}
    renamed = tls_secrets(render_upgrade(tmp_path / "b", first, {"tls": {"certNames": {
        "scheduler": "alise-scheduler", "predictor": "alise-predictor", "worker": "gpu-worker"}}}))
    assert renamed["demo-alise-tls-worker"]["metadata"]["annotations"] == {"alise.io/cert-name": "gpu-worker"}
    assert len({s["data"]["ca.crt"] for s in renamed.values()}) == 1
    assert renamed["demo-alise-tls"]["data"]["ca.crt"] != first["demo-alise-tls"]["data"]["ca.crt"]
    old = {"metadata": {"name": "demo-alise-tls"}, "data": dict(first["demo-alise-tls"]["data"])}   # no annotation
    docs = render_upgrade(tmp_path / "c", {"demo-alise-tls": old})
    assert {n: s["data"] for n, s in tls_secrets(docs).items()} == {"demo-alise-tls": old["data"]}
    pods = deployments(docs)
    for n in ("scheduler", "predictor", "worker"):
        assert next(v for v in pods[n]["volumes"] if v["name"] == "tls")["secret"]["secretName"] == "demo-alise-tls"
        assert not any("cert-names" in a for a in pods[n]["containers"][0]["args"]), n


def test_a_changed_tenant_list_rolls_the_scheduler():
    def checksum(tenants):
        sched = by_name(render(tenants=tenants), "Deployment", "demo-alise-scheduler")
        return sched["spec"]["template"]["metadata"]["annotations"]["checksum/api-keys"]
    other = {**TENANT, "key_sha256": "cd" * 32}
    assert checksum([TENANT]) == checksum([TENANT]) != checksum([TENANT, other]) != checksum([other])


def test_refuses_to_install_without_client_credentials():
    with pytest.raises(helm.HelmError, match="auth.tenants"):
        render(tenants=[])
    with pytest.raises(helm.HelmError, match="key_sha256"):
        render(tenants=[{"name": "x", "key_sha256": "my-plain-key"}])
    render({"auth": {"existingApiKeysSecret": "mine"}}, tenants=[])


@pytest.mark.parametrize("values,message", [
    ({"worker": {"terminationGracePeriodSeconds": 30}}, "worker.terminationGracePeriodSeconds"),
    ({"scheduler": {"policy": "random"}}, "scheduler.policy"),
    ({"tls": {"certNames": {"scheduler": " ", "predictor": "p", "worker": "w"}}}, "certNames"),   # would check nothing
    ({"redis": {"enabled": False}}, "redis.externalUrl"),
    ({"scheduler": {"modelName": "other"}}, "modelName"),
    ({"predictor": {"encoder": "bert"}}, "predictor.encoder"),
    ({"predictor": {"replicas": 2, "modelPvc": "p"}}, "predictor.replicas"),      # two writers of one saved state
    ({"worker": {"modelPath": "/mnt/llama"}}, "worker.modelPath"),                 # outside the model volume
])
def test_bad_values_fail_with_the_value_named(values, message):
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def deployments(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"].removeprefix("demo-alise-"): d["spec"]["template"]["spec"]
            for d in docs if d["kind"] in ("Deployment", "StatefulSet")}


def test_every_pod_meets_pod_security_restricted():
    """The checks of Kubernetes' Pod Security "restricted" level, on every pod the chart makes."""
    pods = deployments(render())
    assert set(pods) == {"scheduler", "worker", "predictor", "redis"}
    for name, spec in pods.items():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("runAsUser", 1) != 0, name
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], name
            assert sc["readOnlyRootFilesystem"] is True and not sc.get("privileged"), name
            assert set(sc["capabilities"]).isdisjoint({"add"}), name
        assert not any("hostPath" in v for v in spec.get("volumes", [])), name
    assert pods["redis"]["securityContext"]["runAsUser"] == 999
    for name in ("scheduler", "worker", "predictor"):     # read-only root: HOME and caches on the /tmp emptyDir
        container = pods[name]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == "/tmp" and env["TRITON_CACHE_DIR"].startswith("/tmp"), name
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"], name


def test_the_http_api_is_served_and_exposed():
    docs = render()
    scheduler = deployments(docs)["scheduler"]["containers"][0]
    assert "--http-listen=0.0.0.0:8000" in scheduler["args"]
    assert {"name": "http", "containerPort": 8000} in scheduler["ports"]
    ports = {p["name"]: p["port"] for p in by_name(docs, "Service", "demo-alise-scheduler")["spec"]["ports"]}
    assert ports["http"] == 8000 and ports["grpc"] == 50051
    assert scheduler["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def test_network_policies_fence_redis_the_predictor_and_the_worker_gateway():
    docs = render()
    policies = {d["metadata"]["name"].removeprefix("demo-alise-"): d["spec"] for d in docs
                if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"scheduler", "predictor", "worker", "redis"}

    def allowed(policy, port):
        """Components allowed to reach `port` ("any" when the rule has no `from`)."""
        out = set()
        for rule in policy["ingress"]:
            if any(p["port"] == port for p in rule["ports"]):
                out |= ({f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in rule["from"]}
                        if "from" in rule else {"any"})
        return out
    assert allowed(policies["redis"], 6379) == {"scheduler", "predictor"}
    assert allowed(policies["predictor"], 50052) == {"scheduler"}
    assert allowed(policies["scheduler"], 50061) == {"worker"}
    assert allowed(policies["scheduler"], 50051) == allowed(policies["scheduler"], 8000) == {"any"}
    assert not any(d["kind"] == "NetworkPolicy" for d in render({"networkPolicy": {"enabled": False}}))


def test_disruption_budgets_and_spread_for_replicated_components():
    docs = render({"worker": {"replicas": 3}, "predictor": {"replicas": 2}})
    budgets = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert budgets["demo-alise-worker"]["maxUnavailable"] == 1 and "demo-alise-predictor" in budgets
    assert budgets["demo-alise-worker"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    spread = deployments(docs)["worker"]["topologySpreadConstraints"][0]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert not any(d["kind"] == "PodDisruptionBudget" for d in render())      # one replica each: no budget
    # under KEDA the worker count is its floor, not worker.replicas (review, session 22: no budget at all)
    keda = render({"autoscaling": {"enabled": True, "minReplicas": 2}})
    assert any(d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "demo-alise-worker" for d in keda)


def test_workers_roll_without_a_spare_gpu_and_no_pod_gets_an_api_token():
    """Review, session 22: the default rolling update adds a pod first, which waits for a GPU a full pool does not
    have; and every pod got a service-account token though no ALISE service calls the Kubernetes API."""
    docs = render()
    rolling = by_name(docs, "Deployment", "demo-alise-worker")["spec"]["strategy"]
    assert rolling == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    for name, spec in deployments(docs).items():
        assert spec["automountServiceAccountToken"] is False, name
    recreate = by_name(render({"worker": {"updateStrategy": {"type": "Recreate"}}}), "Deployment", "demo-alise-worker")
    assert recreate["spec"]["strategy"] == {"type": "Recreate"}       # not merged with the default's rollingUpdate
    kubernetes_validate.validate(recreate, "1.30.0", strict=True)


def test_the_chart_declares_the_kubernetes_it_needs():
    """Native gRPC probes need 1.24: helm install refuses an older cluster up front (helm checks kubeVersion
    against the cluster; the SDK here renders without one, so the constraint itself is checked)."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert constraint.startswith(">=")
    minimum = tuple(int(x) for x in constraint[2:].split("-")[0].split("."))
    assert minimum[:2] == (1, 24)
    assert helm.lint(str(CHART), strict=True, kube_version="v1.24.0", values={"auth": {"tenants": [TENANT]}})["errors"] == []


def test_install_notes_say_how_to_reach_both_apis():
    files = render_files({"auth": {"tenants": [TENANT]}})
    notes = next(text for name, text in files.items() if name.endswith("NOTES.txt"))
    assert "port 50051" in notes and "port 8000" in notes and "/v1/models" in notes
    assert "demo-alise-tls" in notes                                   # where clients get the CA


def test_keda_scales_workers_on_queued_predicted_work_and_a_podmonitor_scrapes_every_pod():
    docs = render({"autoscaling": {"enabled": True, "maxReplicas": 6, "targetQueuedWorkSeconds": 45},
                   "podMonitor": {"enabled": True}})
    scaled = by_name(docs, "ScaledObject", "demo-alise-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "demo-alise-worker" and scaled["maxReplicaCount"] == 6
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "45"
    # this release's series only (the PodMonitor labels each with its release)
    assert trigger["metadata"]["query"] == ('sum(alise:queued_predicted_work_seconds{model_name="llama-3-8b",'
                                            'namespace="llm",app_kubernetes_io_instance="demo"})')
    assert by_name(docs, "PodMonitor", "demo-alise")["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]
    assert "replicas" not in by_name(docs, "Deployment", "demo-alise-worker")["spec"]     # KEDA's to set
    monitor = by_name(docs, "PodMonitor", "demo-alise")["spec"]
    assert monitor["podMetricsEndpoints"][0]["port"] == "metrics"
    for name, spec in deployments(docs).items():
        if name != "redis":
            assert any(p["name"] == "metrics" for p in spec["containers"][0]["ports"]), name
    for doc in docs:                                   # the core objects stay valid (CRDs have no schema here)
        if doc["apiVersion"].split("/")[0] not in ("keda.sh", "monitoring.coreos.com"):
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


@pytest.mark.parametrize("values,path", [
    ({"worker": {"replicas": "four"}}, "worker.replicas"),
    ({"scheduler": {"httpPort": 70000}}, "scheduler.httpPort"),
    ({"worker": {"dtype": "int4"}}, "worker.dtype"),
    ({"predictor": {"mathThreads": 0}}, "predictor.mathThreads"),
    ({"workers": {"replicas": 2}}, "workers"),                       # a typo of a top-level key
])
def test_values_schema_rejects_wrong_types_and_unknown_keys(values, path):
    lint = helm.lint(str(CHART), strict=True, kube_version="v1.30.0", values={"auth": {"tenants": [TENANT]}, **values})
    assert any("schema" in e.lower() for e in lint["errors"]), lint
    assert any(path.split(".")[-1] in e for e in lint["errors"]), lint


def test_the_model_can_come_from_the_hub_through_an_init_container():
    docs = render({"worker": {"modelSource": "hub", "hubModelId": "meta-llama/Meta-Llama-3-8B-Instruct",
                              "hubTokenSecret": "hf-token"}})
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    pods = deployments(docs)
    for name in ("worker", "scheduler"):
        init = pods[name]["initContainers"][0]
        assert "meta-llama/Meta-Llama-3-8B-Instruct" in init["command"] and "/models/llama-3-8b" in init["command"]
        env = {e["name"]: e for e in init["env"]}
        assert env["HF_HUB_OFFLINE"]["value"] == "0"
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
        volume = next(v for v in pods[name]["volumes"] if v["name"] == "models")
        assert "emptyDir" in volume and "persistentVolumeClaim" not in volume
        assert init["securityContext"]["allowPrivilegeEscalation"] is False          # restricted, as the pod
    patterns = pods["scheduler"]["initContainers"][0]["command"][-1]
    assert "tokenizer*" in patterns and "safetensors" not in patterns          # the scheduler needs the tokenizer
    assert pods["worker"]["initContainers"][0]["command"][-1] == "[]"           # workers take everything
    assert "initContainers" not in deployments(render())["worker"]             # default: the PVC
    with pytest.raises(helm.HelmError, match="worker.hubModelId"):
        render({"worker": {"modelSource": "hub"}})


def test_a_release_named_for_the_chart_is_not_named_twice():
    values = {"auth": {"tenants": [TENANT]}}
    for release, prefix in (("alise", "alise"), ("alise-prod", "alise-prod"), ("prod", "prod-alise")):
        out = helm.Chart.load(str(CHART)).render(values, name=release, namespace="llm")
        names = {d["metadata"]["name"] for file, text in out.items() if not file.endswith("NOTES.txt")
                 for d in yaml.safe_load_all(text) if d}
        assert f"{prefix}-scheduler" in names and f"{prefix}-worker" in names, (release, sorted(names))


def test_the_charts_scheduling_defaults_are_the_services_own():
    """A default measured and changed in the service (session 34: aging 30 s, 8 early rows) must not stay at its
    old value in a Helm install."""
    from services.scheduler.config import SchedulerConfig
    from services.worker.config import WorkerConfig

    docs = render()
    scheduler = by_name(docs, "Deployment", "demo-alise-scheduler")["spec"]["template"]["spec"]["containers"][0]
    cfg = SchedulerConfig.from_args([a for a in scheduler["args"] if a.startswith("--")])
    own = SchedulerConfig()
    fields = ("aging_s", "due_after_s", "max_parking", "early_tokens", "park_wait_factor", "park_kv_share",
              "park_after_s", "preempt_mode", "max_preemptions")
    assert [getattr(cfg, f) for f in fields] == [getattr(own, f) for f in fields]
    worker = by_name(docs, "Deployment", "demo-alise-worker")["spec"]["template"]["spec"]["containers"][0]
    assert WorkerConfig.from_args([a for a in worker["args"] if a.startswith("--")]).early_rows == \
        WorkerConfig().early_rows


def test_the_scheduler_and_worker_accept_every_flag_the_chart_gives_them():
    # a flag the chart renders that the service does not know (a typo, a renamed option) would crash the pod at start
    from services.scheduler.config import SchedulerConfig
    from services.worker.config import WorkerConfig

    docs = render({"scheduler": {"parkWaitFactor": 2.5, "parkAfterSeconds": 1, "maxParking": 4, "agingSeconds": 40,
                                 "dueAfterSeconds": 90, "earlyTokens": 16}})
    scheduler = by_name(docs, "Deployment", "demo-alise-scheduler")["spec"]["template"]["spec"]["containers"][0]
    cfg = SchedulerConfig.from_args([a for a in scheduler["args"] if a.startswith("--")])
    assert (cfg.park_wait_factor, cfg.park_after_s, cfg.max_parking, cfg.aging_s, cfg.due_after_s,
            cfg.early_tokens) == (2.5, 1.0, 4, 40.0, 90.0, 16)
    worker = by_name(docs, "Deployment", "demo-alise-worker")["spec"]["template"]["spec"]["containers"][0]
    WorkerConfig.from_args([a for a in worker["args"] if a.startswith("--")])
    # a cap the schema accepts starts the scheduler too (review, session 22: under 256 it crash-looped)
    low = by_name(render({"scheduler": {"maxTokensCap": 128}}), "Deployment", "demo-alise-scheduler")
    args = [a for a in low["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--")]
    assert SchedulerConfig.from_args(args).default_max_tokens == 128
