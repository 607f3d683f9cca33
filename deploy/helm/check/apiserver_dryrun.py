#!/usr/bin/env python3
"""Check a Helm chart against a real Kubernetes API server with server-side dry runs.

Starts etcd and kube-apiserver on free loopback ports (a throw-away data directory, token authentication,
RBAC), renders the chart with helm_python (`helm template`) for one or more sets of values files, sends every
rendered object with `?dryRun=All` and prints, per object, what the API server made of it:

  accepted    stored as sent (fields the server defaults are not counted)
  dropped     accepted, but fields that were sent are missing from the server's answer: the server does not
              know them and pruned them silently (e.g. `persistentVolumeClaimRetentionPolicy` before 1.23)
  rejected    refused, with the server's message (e.g. a probe whose only handler was an unknown `grpc`)
  not served  the server does not serve that apiVersion/kind (a newer API, or a CRD that is not installed)

With --helm-install, it also runs helm_python's `Config.install(..., dry_run="server")` against the server for
each values set (Helm's own checks: the chart's kubeVersion, the API versions the server offers).

  python apiserver_dryrun.py --kube-apiserver /path/kube-apiserver --chart deploy/helm/alise \\
      --values-set default=deploy/helm/check/tenants.yaml \\
      --values-set full=deploy/helm/check/tenants.yaml,deploy/helm/check/all-features.yaml --helm-install

Needs: etcd on PATH (or --etcd), openssl, and the Python packages helm-python-sdk, kubernetes, pyyaml.
A kube-apiserver can be built offline from Debian's source package (Kubernetes 1.20.2, about 6 minutes on 2
cores): `apt-get source kubernetes` from bookworm's deb-src, `apt-get install golang-go rsync etcd-server`, then
in the source tree, with GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off and .go/src/k8s.io/kubernetes linked to it,
`make WHAT=cmd/kube-apiserver` (-> _output/bin/kube-apiserver). Keep the binary outside the repository.
Exit status: 0 if every object was accepted unchanged (and every Helm dry run passed), 1 if not, 2 if the
servers could not be started.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


# --------------------------------------------------------------------------------------------------
# etcd + kube-apiserver on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalApiServer:
    """etcd and kube-apiserver as child processes in a temporary directory; a context manager."""

    def __init__(self, kube_apiserver: str, etcd: str = "etcd", keep_dir: bool = False,
                 ready_timeout: float = 90.0) -> None:
        self.kube_apiserver = shutil.which(kube_apiserver) or kube_apiserver
        self.etcd = shutil.which(etcd) or etcd
        self.keep_dir = keep_dir
        self.ready_timeout = ready_timeout
        self.dir = Path(tempfile.mkdtemp(prefix="apiserver-dryrun-"))
        self.token = secrets.token_hex(16)
        self.port = 0
        self._procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def kubeconfig(self) -> str:
        return yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "dryrun",
            "clusters": [{"name": "dryrun", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "admin", "user": {"token": self.token}}],
            "contexts": [{"name": "dryrun", "context": {"cluster": "dryrun", "user": "admin"}}],
        })

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._procs.append(proc)
        return proc

    def _wait(self, name: str, proc: subprocess.Popen, url: str, headers: dict[str, str]) -> None:
        ctx = ssl._create_unverified_context()  # the server's certificate is self-signed, on loopback
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{_tail(self.dir / f'{name}.log')}")
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=2, context=ctx) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{name} not ready after {self.ready_timeout:.0f} s:\n{_tail(self.dir / f'{name}.log')}")

    def version(self) -> str:
        out = subprocess.run([self.kube_apiserver, "--version"], capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]  # "Kubernetes v1.20.2"

    def start(self) -> "LocalApiServer":
        d = self.dir
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
                       check=True, capture_output=True)
        (d / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n")

        client, peer = free_port(), free_port()
        etcd = self._spawn("etcd", [
            self.etcd, "--name", "dryrun", "--data-dir", str(d / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"dryrun=http://127.0.0.1:{peer}",
        ])
        self._wait("etcd", etcd, f"http://127.0.0.1:{client}/health", {})

        self.port = free_port()
        argv = [
            self.kube_apiserver,
            f"--etcd-servers=http://127.0.0.1:{client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={d / 'certs'}",
            f"--token-auth-file={d / 'tokens.csv'}", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
        ]
        major, minor = (int(x) for x in self.version().lstrip("v").split(".")[:2])
        if (major, minor) < (1, 24):
            argv.append("--insecure-port=0")  # removed in 1.24; before, 8080 without auth by default
        apiserver = self._spawn("kube-apiserver", argv)
        self._wait("kube-apiserver", apiserver, f"{self.url}/readyz",
                   {"Authorization": f"Bearer {self.token}"})
        return self

    def stop(self) -> None:
        for proc in reversed(self._procs):  # kube-apiserver first, then etcd
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalApiServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Rendering


def merge(base: dict, override: dict) -> dict:
    """Deep-merge like repeated `helm -f`: maps merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_values(files: list[str]) -> dict:
    values: dict = {}
    for path in files:
        values = merge(values, yaml.safe_load(Path(path).read_text()) or {})
    return values


def render(chart_path: str, values: dict, release: str, namespace: str) -> list[tuple[str, dict]]:
    """(template, object) for every object the chart renders, in template order."""
    import helm_python

    manifests = helm_python.Chart.load(chart_path).render(values, name=release, namespace=namespace)
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith(".txt"):  # NOTES.txt
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append((template, doc))
    return objects


# --------------------------------------------------------------------------------------------------
# Dry runs


@dataclass
class Result:
    template: str
    kind: str
    name: str
    api_version: str
    status: str  # accepted | dropped | rejected | not served
    details: list[str] = field(default_factory=list)


def _empty(value: Any) -> bool:
    return value in (None, "", 0, False) or value == {} or value == []


def diff_sent(sent: Any, got: Any, path: str = "") -> list[str]:
    """Fields of `sent` that the server's answer lacks or changed. Defaults the server adds are ignored, and so
    are empty values (the API omits those on output)."""
    out: list[str] = []
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [f"{path or '.'}: sent a map, got {got!r}"]
        for key, value in sent.items():
            sub = f"{path}.{key}" if path else key
            if key not in got:
                if not _empty(value):
                    out.append(f"{sub}: dropped (sent {json.dumps(value, separators=(',', ':'))[:120]})")
            else:
                out.extend(diff_sent(value, got[key], sub))
    elif isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [f"{path}: sent {len(sent)} items, got {got!r}"[:200]]
        for i, (s, g) in enumerate(zip(sent, got)):
            out.extend(diff_sent(s, g, f"{path}[{i}]"))
    elif sent != got and str(sent) != str(got):
        out.append(f"{path}: sent {sent!r}, got {got!r}")
    return out


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def grpc_probes_as_tcp(node: Any, path: str = "") -> list[str]:
    """Rewrite every gRPC probe (Kubernetes >= 1.24) in place as a TCP probe on the same port, so that a server
    that does not know gRPC probes checks the rest of the object; returns the paths rewritten."""
    rewritten: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else key
            if key in PROBES and isinstance(value, dict) and "grpc" in value:
                value["tcpSocket"] = {"port": value.pop("grpc")["port"]}
                rewritten.append(sub)
            else:
                rewritten.extend(grpc_probes_as_tcp(value, sub))
    elif isinstance(node, list):
        for i, item in enumerate(node):
            rewritten.extend(grpc_probes_as_tcp(item, f"{path}[{i}]"))
    return rewritten


def _expected(obj: dict, answer: dict) -> dict:
    """What the server's answer should contain of `obj`: a Secret's stringData is written into data."""
    if obj.get("kind") == "Secret" and obj.get("apiVersion") == "v1" and "stringData" in obj:
        obj = dict(obj)
        string_data = obj.pop("stringData")
        if not all(k in (answer.get("data") or {}) for k in string_data):
            obj["stringData"] = string_data  # reported as dropped
    return obj


def server_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    try:
        status = json.loads(body)
        return status.get("message") or body
    except (TypeError, ValueError):
        return str(exc)


class DryRunner:
    def __init__(self, server: LocalApiServer, grpc_as_tcp: bool = False) -> None:
        import urllib3
        from kubernetes import client, dynamic

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)  # loopback, self-signed

        self.grpc_as_tcp = grpc_as_tcp
        config = client.Configuration()
        config.host = server.url
        config.verify_ssl = False
        config.api_key = {"authorization": server.token}
        config.api_key_prefix = {"authorization": "Bearer"}
        self.api = client.ApiClient(config)
        self.dyn = dynamic.DynamicClient(self.api)

    def server_version(self) -> str:
        return self.dyn.version["kubernetes"]["gitVersion"]

    def ensure_namespace(self, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        namespaces = self.dyn.resources.get(api_version="v1", kind="Namespace")
        try:
            namespaces.create(body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        except ApiException as e:
            if e.status != 409:
                raise

    def dry_run(self, template: str, obj: dict, namespace: str) -> Result:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
        result = Result(template, kind, obj.get("metadata", {}).get("name", ""), api_version, "accepted")
        try:
            resource = self.dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            result.status = "not served"
            result.details.append(f"the server serves no {kind} in {api_version}")
            return result
        ns = obj.get("metadata", {}).get("namespace", namespace) if resource.namespaced else None
        notes = []
        if self.grpc_as_tcp:
            notes = [f"{p}: gRPC probe sent as tcpSocket" for p in grpc_probes_as_tcp(obj)]
        try:
            answer = resource.create(body=obj, namespace=ns, dry_run="All").to_dict()
        except ApiException as e:
            result.status = "rejected"
            result.details = [server_message(e)] + notes
            return result
        result.details = diff_sent(_expected(obj, answer), answer)
        if result.details:
            result.status = "dropped"
        result.details += notes
        return result


def helm_install_dry_run(server: LocalApiServer, chart_path: str, values: dict, release: str,
                         namespace: str) -> tuple[bool, str]:
    import helm_python

    config = helm_python.Config(kubeconfig_content=server.kubeconfig(), namespace=namespace)
    try:
        chart = helm_python.Chart.load(chart_path)
        release_info = config.install(chart, release, values, namespace=namespace, dry_run="server")
    except helm_python.HelmError as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        config.close()
    count = sum(1 for doc in yaml.safe_load_all(release_info.get("manifest") or "") if doc)
    return True, f"dry run passed, {count} objects"


# --------------------------------------------------------------------------------------------------
# Report


def print_table(set_name: str, results: list[Result]) -> None:
    rows = [(r.kind, r.name, r.api_version, r.status) for r in results]
    head = ("KIND", "NAME", "APIVERSION", "RESULT")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(4)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(f"\n== {set_name}: {len(results)} objects")
    print(line.format(*head))
    for r, row in zip(results, rows):
        print(line.format(*row))
        for detail in r.details:
            print(f"      {detail}")


def parse_values_set(spec: str) -> tuple[str, list[str]]:
    name, sep, files = spec.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--values-set wants NAME=FILE[,FILE...], got {spec!r}")
    return name, [f for f in files.split(",") if f]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kube-apiserver", required=True, help="kube-apiserver binary")
    p.add_argument("--etcd", default="etcd", help="etcd binary (default: etcd on PATH)")
    p.add_argument("--chart", required=True, help="chart directory")
    p.add_argument("--values-set", action="append", type=parse_values_set, default=[],
                   metavar="NAME=FILE[,FILE...]", help="a named set of values files, merged in order; repeatable"
                   " (default: the chart's own values)")
    p.add_argument("--release", default="alise")
    p.add_argument("--namespace", default="alise")
    p.add_argument("--helm-install", action="store_true", help="also run Helm's install with dry_run=server")
    p.add_argument("--grpc-probes-as-tcp", action="store_true", help="send gRPC probes as TCP probes on the same"
                   " port, so that a server older than 1.24 checks the rest of each workload")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--keep-dir", action="store_true", help="keep the servers' directory (logs, etcd data)")
    args = p.parse_args(argv)

    values_sets = args.values_set or [("chart-defaults", [])]
    import helm_python

    rendered = []
    for name, files in values_sets:  # render first: a values or template error needs no servers
        values = load_values(files)
        try:
            rendered.append((name, files, values, render(args.chart, values, args.release, args.namespace)))
        except helm_python.HelmError as e:
            print(f"{name}: the chart does not render: {type(e).__name__}: {e}", file=sys.stderr)
            return 1

    ok = True
    report: dict[str, Any] = {}
    server = LocalApiServer(args.kube_apiserver, args.etcd, keep_dir=args.keep_dir)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        server.stop()
        print(f"could not start the API server: {e}", file=sys.stderr)
        return 2
    try:
        runner = DryRunner(server, grpc_as_tcp=args.grpc_probes_as_tcp)
        print(f"kube-apiserver {runner.server_version()} at {server.url} (dir {server.dir})")
        runner.ensure_namespace(args.namespace)
        for name, files, values, objects in rendered:
            results = [runner.dry_run(t, o, args.namespace) for t, o in objects]
            print_table(f"{name} ({', '.join(files) or 'chart values'})", results)
            ok &= all(r.status == "accepted" for r in results)
            entry: dict[str, Any] = {"files": files, "objects": [r.__dict__ for r in results]}
            if args.helm_install:
                passed, message = helm_install_dry_run(server, args.chart, values, args.release, args.namespace)
                print(f"helm install --dry-run=server: {'passed' if passed else 'FAILED'}: {message}")
                ok &= passed
                entry["helm_install"] = {"passed": passed, "message": message}
            report[name] = entry
    finally:
        server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
