"""The rendered objects fit together and fit the server.

Selectors of the Service, PodDisruptionBudget, NetworkPolicy and ServiceMonitor match the pods
(and the Service); named ports exist and the NetworkPolicy opens them all; probes point at
/health and /live; the grace period covers TCH_SERVE_SHUTDOWN_DELAY_SECS +
TCH_SERVE_SHUTDOWN_TIMEOUT_SECS + the 5 s the server gives its inference thread; one
autoscaler per Deployment, scaling down at most one pod per grace period after a 5-minute
window; KEDA's Prometheus trigger uses only keys its scaler reads; Ingress and route backends
exist, and their body-size limit and timeouts exceed the server's (--max-body-bytes,
--request-timeout-ms: defaults from README.md's configuration table, or the Deployment's
environment); gRPC goes to the grpc port, over h2c; secret volumes name a Secret of the render
(the api-key component's is made by a secretGenerator from a random key file, as its
kustomization shows), mounted read-only and not world-readable, and TCH_SERVE_API_KEY_FILE is
one of their files, never a key in the environment.
"""

from __future__ import annotations

import functools
import re

import pytest
import yaml

import k8s_manifests as km
from k8s_manifests import ident

README = km.ROOT / "README.md"
ADAPTER_VALUES = km.K8S / "components" / "prometheus-adapter" / "values.yaml"

# The metadata keys KEDA's Prometheus scaler reads (pkg/scalers/prometheus_scaler.go); the
# trigger's metadata is a free-form map in the CRD, so nothing else checks them.
KEDA_PROMETHEUS_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                        "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion",
                        "timeout", "identityOwner", "authModes"}


# ----------------------------------------------------------------- helpers ---


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def seconds(s: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", s))


@functools.cache
def server_default(flag: str) -> tuple[str, int]:
    """(environment variable, default) of a flag from README.md's configuration table
    (| `--flag` | `ENV` | `default` |)."""
    for line in README.read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == f"--{flag}":
            return cells[1], int(cells[2])
    pytest.fail(f"README.md's configuration table has no --{flag}", pytrace=False)


def nginx_size(v) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", str(v).strip())
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()] if m else -1


def scale_down(behavior) -> tuple[int, list]:
    """(stabilisation window, [(pods removed, period)]) of an autoscaler's scale-down."""
    down = (behavior or {}).get("scaleDown", {})
    pols = down.get("policies") or [{"type": "Percent", "value": 100, "periodSeconds": 15}]
    if down.get("selectPolicy") == "Disabled":
        pols = []
    return down.get("stabilizationWindowSeconds", 300), [
        (p["value"] if p["type"] == "Pods" else f'{p["value"]}%', p["periodSeconds"]) for p in pols]


def adapter_metric_names() -> set[str]:
    """The custom-metric names the prometheus-adapter rules expose: name.as (with the captures
    of name.matches), by default the whole match, or its one capture group."""
    names = set()
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    for r in (values.get("rules") or {}).get("custom") or []:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"])
        nm = r.get("name") or {}
        m = re.search(nm.get("matches") or ".*", series.group(1) if series else "")
        if not m:
            continue
        as_ = nm.get("as") or ("$1" if m.re.groups == 1 else "$0")
        names.add(re.sub(r"\$(\d+)", lambda g: m.group(int(g.group(1))), as_))
    return names


def pod_labels(dep: dict) -> dict:
    return dep["spec"]["template"]["metadata"].get("labels", {})


def container(dep: dict) -> dict:
    return dep["spec"]["template"]["spec"]["containers"][0]


def container_ports(dep: dict) -> dict:
    return {p["name"]: p["containerPort"] for p in container(dep).get("ports", [])}


def env(dep: dict) -> dict:
    return {e["name"]: e.get("value") for e in container(dep).get("env", [])}


def grace(dep: dict) -> int:
    return dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)


def deployments(render: km.Render) -> list[dict]:
    deps = render.by_kind("Deployment")
    assert deps, f"{render.name}: no Deployment to check against"
    return deps


def server_limits(dep: dict) -> tuple[int, float]:
    """(--max-body-bytes, --request-timeout-ms in seconds) of the Deployment's server."""
    body_env, body_default = server_default("max-body-bytes")
    timeout_env, timeout_default = server_default("request-timeout-ms")
    e = env(dep)
    return int(e.get(body_env) or body_default), int(e.get(timeout_env) or timeout_default) / 1000


def service_port(render: km.Render, name: str, port) -> dict | None:
    """The port of the render's Service `name` that a backend names (by name or number)."""
    for svc in render.by_kind("Service"):
        if svc["metadata"]["name"] == name:
            for p in svc["spec"].get("ports", []):
                if port in (p.get("name"), p.get("port")):
                    return p
    return None


def autoscalers(render: km.Render, dep: dict) -> list[dict]:
    name = dep["metadata"]["name"]
    return [h for h in render.by_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name] \
        + [s for s in render.by_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name]


def params(items: list[tuple], arity: int, why: str) -> list:
    """pytest params from (id, value...) tuples; a failing `nothing` one when there are none."""
    return [pytest.param(*values, id=i) for i, *values in items] or km.nothing(arity, why)


def each(kinds, fn) -> list[tuple]:
    """(id, render, object, x) for every x of fn(render, object) over the objects of `kinds`."""
    out = []
    for r in km.renders().values():
        for d in r.docs:
            if d.get("kind") in kinds:
                for sub_id, x in fn(r, d):
                    out.append((f"{r.name}:{ident(d)}:{sub_id}", r, d, x))
    return out


DEPLOYMENTS = km.objects("Deployment")


# -------------------------------------------------------------- Deployment ---


@pytest.mark.parametrize("render,dep", DEPLOYMENTS)
def test_deployment_selector_matches_pod_labels(render, dep):
    selector = dep["spec"]["selector"]["matchLabels"]
    assert matches(selector, pod_labels(dep)), f"selector {selector}, pod labels {pod_labels(dep)}"


@pytest.mark.parametrize("render,dep", DEPLOYMENTS)
def test_probes_on_health_and_live_by_port_name(render, dep):
    c = container(dep)
    want = {"startupProbe": "/health", "readinessProbe": "/health", "livenessProbe": "/live"}
    found = {k: c.get(k, {}).get("httpGet", {}) for k in want}
    ports = container_ports(dep)
    wrong = {k: {"path": found[k].get("path"), "port": found[k].get("port")} for k in want
             if found[k].get("path") != want[k] or found[k].get("port") not in ports}
    assert not wrong, f"want startup+readiness on /health, liveness on /live, on a named container port " \
                      f"({sorted(ports)}); found {wrong}"


@pytest.mark.parametrize("render,dep", DEPLOYMENTS)
def test_startup_budget_covers_model_load(render, dep):
    sp = container(dep)["startupProbe"]
    budget = sp.get("initialDelaySeconds", 0) + sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    assert 60 <= budget <= 600, f"start-up budget {budget} s (model load + warm-up): want 60 to 600 s"


@pytest.mark.parametrize("render,dep", DEPLOYMENTS)
def test_grace_period_covers_shutdown(render, dep):
    e = env(dep)
    delay = int(e.get("TCH_SERVE_SHUTDOWN_DELAY_SECS") or 0)
    timeout = int(e.get("TCH_SERVE_SHUTDOWN_TIMEOUT_SECS") or 25)
    # + 5 s: after the shutdown timeout the server gives its inference thread up to 5 s.
    assert grace(dep) >= delay + timeout + 5, \
        f"grace period {grace(dep)} s < shutdown delay {delay} s + timeout {timeout} s + 5 s"


def secret_volumes(render, dep):
    return [(f'volume/{v["name"]}', v) for v in dep["spec"]["template"]["spec"].get("volumes", []) if "secret" in v]


@pytest.mark.parametrize("render,dep,volume", params(each({"Deployment"}, secret_volumes), 3, "no secret volume rendered"))
def test_secret_volume_is_a_secret_of_the_render(render, dep, volume):
    """The Secret is in the render and holds every key the volume names; mounted read-only,
    not optional, not world-readable."""
    secrets = {s["metadata"]["name"]: s for s in render.by_kind("Secret")}
    sname = volume["secret"]["secretName"]
    secret = secrets.get(sname, {})
    data = {**secret.get("data", {}), **secret.get("stringData", {})}
    items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
    mount = {m["name"]: m for m in container(dep).get("volumeMounts", [])}.get(volume["name"], {})
    assert sname in secrets, f"Secret/{sname} is not in the render (Secrets: {sorted(secrets)})"
    missing = [i["key"] for i in items if i["key"] not in data]
    assert not missing, f"Secret/{sname} lacks the keys {missing} (it has {sorted(data)})"
    assert mount.get("readOnly") is True, f"mounted at {mount.get('mountPath')} with readOnly {mount.get('readOnly')}"
    assert volume["secret"].get("optional") is not True, "the secret volume is optional"
    mode = volume["secret"].get("defaultMode", 0o644)
    assert mode & 0o007 == 0, f"defaultMode {mode:#o} is world-readable"


def has_key_file(render, dep):
    return "TCH_SERVE_API_KEY_FILE" in env(dep)


@pytest.mark.parametrize("render,dep", km.objects("Deployment", where=has_key_file))
def test_api_key_file_is_a_mounted_secret_file(render, dep):
    mounts = {m["name"]: m for m in container(dep).get("volumeMounts", [])}
    files = set()
    for v in dep["spec"]["template"]["spec"].get("volumes", []):
        if "secret" in v:
            secret = next((s for s in render.by_kind("Secret") if s["metadata"]["name"] == v["secret"]["secretName"]), {})
            keys = {**secret.get("data", {}), **secret.get("stringData", {})}
            items = v["secret"].get("items") or [{"key": k, "path": k} for k in keys]
            files |= {f'{mounts.get(v["name"], {}).get("mountPath", "?")}/{i["path"]}' for i in items}
    key_file = env(dep)["TCH_SERVE_API_KEY_FILE"]
    assert key_file in files, f"TCH_SERVE_API_KEY_FILE {key_file} is no file of a mounted Secret ({sorted(files)})"


@pytest.mark.parametrize("render,dep", DEPLOYMENTS)
def test_no_api_key_in_environment(render, dep):
    assert "TCH_SERVE_API_KEY" not in env(dep), "TCH_SERVE_API_KEY is set in the environment"


@pytest.mark.parametrize("render,dep", DEPLOYMENTS)
def test_pod_hardened(render, dep):
    """Non-root 10001, read-only root with a /tmp volume, no privilege escalation, every
    capability dropped, the runtime's default seccomp profile."""
    c = container(dep)
    sc = c.get("securityContext", {})
    psc = dep["spec"]["template"]["spec"].get("securityContext", {})
    found = {
        "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem"),
        "allowPrivilegeEscalation": sc.get("allowPrivilegeEscalation"),
        "capabilities.drop": sc.get("capabilities", {}).get("drop"),
        "runAsNonRoot (pod)": psc.get("runAsNonRoot"),
        "runAsUser": sc.get("runAsUser") or psc.get("runAsUser"),
        "seccompProfile (pod)": psc.get("seccompProfile", {}).get("type"),
        "/tmp mounted": "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])},
    }
    want = {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False, "capabilities.drop": ["ALL"],
            "runAsNonRoot (pod)": True, "runAsUser": 10001, "seccompProfile (pod)": "RuntimeDefault",
            "/tmp mounted": True}
    wrong = {k: found[k] for k in want if found[k] != want[k]}
    assert not wrong, f"found {wrong}, want {({k: want[k] for k in wrong})}"


@pytest.mark.parametrize("render,dep", DEPLOYMENTS)
def test_one_autoscaler(render, dep):
    scalers = [ident(s) for s in autoscalers(render, dep)]
    assert len(scalers) == 1, f"autoscalers of Deployment/{dep['metadata']['name']}: {scalers}"


@pytest.mark.parametrize("render,dep", km.objects("Deployment", where=lambda r, d: bool(r.by_kind("NetworkPolicy"))))
def test_networkpolicy_admits_every_container_port(render, dep):
    allowed = set()
    for np in render.by_kind("NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            allowed |= {p.get("port") for p in rule.get("ports", [])}
    closed = {k: v for k, v in container_ports(dep).items() if k not in allowed and v not in allowed}
    assert not closed, f"container ports no NetworkPolicy lets in: {closed} (allowed: {sorted(map(str, allowed))})"


def claims(render, dep):
    return [(f"claim/{c}", c) for c in sorted({v["persistentVolumeClaim"]["claimName"]
                                              for v in dep["spec"]["template"]["spec"].get("volumes", [])
                                              if "persistentVolumeClaim" in v})]


@pytest.mark.parametrize("render,dep,claim", params(each({"Deployment"}, claims), 3, "no PersistentVolumeClaim volume rendered"))
def test_claim_is_part_of_the_render(render, dep, claim):
    pvcs = sorted(p["metadata"]["name"] for p in render.by_kind("PersistentVolumeClaim"))
    assert claim in pvcs, f"claim {claim} is not in the render (PersistentVolumeClaims: {pvcs})"


# ------------------------------------------- Service, PDB, NetworkPolicy ---


@pytest.mark.parametrize("render,svc", km.objects("Service"))
def test_service_selects_pods(render, svc):
    for dep in deployments(render):
        assert matches(svc["spec"]["selector"], pod_labels(dep)), \
            f"selector {svc['spec']['selector']}, labels of Deployment/{dep['metadata']['name']}'s pods {pod_labels(dep)}"


@pytest.mark.parametrize("render,svc", km.objects("Service"))
def test_service_target_ports_exist(render, svc):
    for dep in deployments(render):
        ports = container_ports(dep)
        missing = [p["targetPort"] for p in svc["spec"]["ports"]
                   if p["targetPort"] not in ports and p["targetPort"] not in ports.values()]
        assert not missing, f"target ports {missing} are not ports of the container ({ports})"


@pytest.mark.parametrize("render,svc", km.objects("Service", where=lambda r, d: d["spec"].get("type") == "LoadBalancer"))
def test_loadbalancer_keeps_cluster_traffic_policy(render, svc):
    """A node whose only replica drains still forwards: externalTrafficPolicy Cluster."""
    policy = svc["spec"].get("externalTrafficPolicy", "Cluster")
    assert policy == "Cluster", f"externalTrafficPolicy {policy}"


@pytest.mark.parametrize("render,pdb", km.objects("PodDisruptionBudget"))
def test_pdb_selects_pods_one_eviction_at_a_time(render, pdb):
    for dep in deployments(render):
        assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels(dep)), \
            f"selector {pdb['spec']['selector']['matchLabels']}, pod labels {pod_labels(dep)}"
    assert pdb["spec"].get("maxUnavailable") == 1, f"maxUnavailable {pdb['spec'].get('maxUnavailable')}"


@pytest.mark.parametrize("render,np", km.objects("NetworkPolicy"))
def test_networkpolicy_selects_pods(render, np):
    for dep in deployments(render):
        assert matches(np["spec"]["podSelector"]["matchLabels"], pod_labels(dep)), \
            f"podSelector {np['spec']['podSelector']['matchLabels']}, pod labels {pod_labels(dep)}"


# ------------------------------------------------------------- autoscaling ---


@pytest.mark.parametrize("render,hpa", km.objects("HorizontalPodAutoscaler"))
def test_hpa_targets_deployment_with_two_replicas(render, hpa):
    ref = hpa["spec"]["scaleTargetRef"]
    names = [d["metadata"]["name"] for d in deployments(render)]
    assert ref["kind"] == "Deployment" and ref["name"] in names, f"targets {ref['kind']}/{ref['name']}; Deployments {names}"
    assert hpa["spec"]["minReplicas"] >= 2, f"minReplicas {hpa['spec']['minReplicas']}"


def pods_metrics(render, hpa):
    return [(f'metric/{m["pods"]["metric"]["name"]}', m["pods"]["metric"]["name"])
            for m in hpa["spec"].get("metrics", []) if m["type"] == "Pods"]


@pytest.mark.parametrize("render,hpa,metric",
                         params(each({"HorizontalPodAutoscaler"}, pods_metrics), 3, "no HPA on a Pods metric rendered"))
def test_hpa_pods_metric_served_by_adapter(render, hpa, metric):
    exposed = adapter_metric_names()
    assert metric in exposed, f"{metric} is not served by the prometheus-adapter rules ({sorted(exposed)})"


@pytest.mark.parametrize("render,so", km.objects("ScaledObject"))
def test_scaledobject_targets_deployment_never_to_zero(render, so):
    spec = so["spec"]
    ref = spec["scaleTargetRef"]
    names = [d["metadata"]["name"] for d in deployments(render)]
    assert ref.get("kind", "Deployment") == "Deployment" and ref["name"] in names, \
        f"targets {ref.get('kind', 'Deployment')}/{ref['name']}; Deployments {names}"
    lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    assert lo >= 2 and hi >= lo, f"minReplicaCount {lo}, maxReplicaCount {hi}: want at least 2 (never to zero)"


def triggers(render, so):
    return [(f"trigger/{i}", t) for i, t in enumerate(so["spec"].get("triggers", []))]


@pytest.mark.parametrize("render,so,trigger", params(each({"ScaledObject"}, triggers), 3, "no KEDA trigger rendered"))
def test_keda_prometheus_trigger(render, so, trigger):
    """Keys KEDA's Prometheus scaler reads, a threshold > 0 per replica (AverageValue),
    ignoreNullValues false."""
    assert trigger["type"] == "prometheus", f"trigger type {trigger['type']}, expected prometheus"
    md = trigger.get("metadata", {})
    unknown = sorted(set(md) - KEDA_PROMETHEUS_KEYS)
    missing = sorted({"serverAddress", "query", "threshold"} - set(md))
    assert not unknown and not missing, f"unknown keys {unknown}, missing keys {missing}"
    try:
        threshold = float(md.get("threshold", "x"))
    except ValueError:
        threshold = -1
    assert threshold > 0, f"threshold {md.get('threshold')!r}"
    assert trigger.get("metricType", "AverageValue") == "AverageValue", f"metricType {trigger.get('metricType')}"
    assert md.get("ignoreNullValues") == "false", f"ignoreNullValues {md.get('ignoreNullValues')!r}"


def autoscaler_params() -> list:
    items = []
    for r in km.renders().values():
        for dep in r.by_kind("Deployment"):
            for s in autoscalers(r, dep):
                items.append((f"{r.name}:{ident(s)}", r, dep, s))
    return params(items, 3, "no autoscaler rendered")


@pytest.mark.parametrize("render,dep,scaler", autoscaler_params())
def test_scale_down_one_pod_per_grace_period(render, dep, scaler):
    """After a 5-minute window, at most one pod per grace period: each drains before the next
    goes."""
    behavior = scaler["spec"].get("behavior") if scaler["kind"] == "HorizontalPodAutoscaler" else \
        scaler["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    window, pols = scale_down(behavior)
    found = f'window {window} s, {" or ".join(f"{n} pod(s) per {p} s" for n, p in pols) or "never"}'
    assert window >= 300, f"{found}: want a window of at least 300 s"
    assert pols and all(n == 1 and period >= grace(dep) for n, period in pols), \
        f"{found}: want 1 pod per at least the grace period ({grace(dep)} s)"


# ------------------------------------------------------ Ingress and routes ---


@pytest.mark.parametrize("render,ing", km.objects("Ingress"))
def test_ingress_backends_are_service_ports(render, ing):
    """gRPC Ingresses go to the grpc port, HTTP ones to any other."""
    grpc = ing["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/backend-protocol") == "GRPC"
    backs = [p["backend"]["service"] for r in ing["spec"].get("rules", []) for p in r["http"]["paths"]]
    assert backs, "no backend"
    for b in backs:
        port = b["port"].get("name") or b["port"].get("number")
        p = service_port(render, b["name"], port)
        assert p is not None, f"backend {b['name']}:{port} is no Service port of the render"
        assert (p.get("name") == "grpc") == grpc, \
            f"backend port {p.get('name')} for a{' gRPC' if grpc else 'n HTTP'} Ingress"


@pytest.mark.parametrize("render,ing", km.objects("Ingress"))
def test_ingress_limits_exceed_server(render, ing):
    ann = ing["metadata"].get("annotations", {})
    a = lambda k, d=None: ann.get(f"nginx.ingress.kubernetes.io/{k}", d)  # noqa: E731
    cls = ing["spec"].get("ingressClassName")
    assert cls == "nginx", f"ingressClassName {cls}"
    body = nginx_size(a("proxy-body-size", "1m"))
    read, send = int(a("proxy-read-timeout", "60")), int(a("proxy-send-timeout", "60"))
    for dep in deployments(render):
        max_body, request_timeout = server_limits(dep)
        assert body > max_body, f"proxy-body-size {a('proxy-body-size', '1m (default)')} <= --max-body-bytes {max_body}"
        assert read > request_timeout and send > request_timeout, \
            f"read/send timeouts {read}/{send} s <= --request-timeout-ms {request_timeout:g} s"


@pytest.mark.parametrize("render,ing", km.objects("Ingress"))
def test_ingress_ewma_and_tls_for_grpc(render, ing):
    """Latency-aware balancing (ewma); TLS where gRPC goes through ingress-nginx (it needs it)."""
    ann = ing["metadata"].get("annotations", {})
    balance = ann.get("nginx.ingress.kubernetes.io/load-balance")
    assert balance == "ewma", f"load-balance {balance}"
    if ann.get("nginx.ingress.kubernetes.io/backend-protocol") == "GRPC":
        assert ing["spec"].get("tls"), "a gRPC Ingress without tls"


@pytest.mark.parametrize("render,route", km.objects(("HTTPRoute", "GRPCRoute")))
def test_route_backends_are_service_ports(render, route):
    """HTTPRoute backends are HTTP ports, GRPCRoute backends ports with appProtocol
    kubernetes.io/h2c."""
    grpc = route["kind"] == "GRPCRoute"
    refs = [b for r in route["spec"].get("rules", []) for b in r.get("backendRefs", [])]
    assert refs, "no backendRefs"
    for b in refs:
        p = service_port(render, b["name"], b.get("port"))
        assert p is not None, f"backend {b['name']}:{b.get('port')} is no Service port of the render"
        assert (p.get("appProtocol") == "kubernetes.io/h2c") == grpc, \
            f"backend port {p.get('name')} has appProtocol {p.get('appProtocol')}"


@pytest.mark.parametrize("render,route", km.objects("HTTPRoute"))
def test_route_timeouts_exceed_server(render, route):
    timeouts = [seconds(r.get("timeouts", {}).get("request", "0s"))
                for r in route["spec"].get("rules", []) for _ in r.get("backendRefs", [])]
    for dep in deployments(render):
        _, request_timeout = server_limits(dep)
        assert timeouts and all(t > request_timeout for t in timeouts), \
            f"request timeouts {timeouts} s, --request-timeout-ms {request_timeout:g} s"


# ---------------------------------------------------------- ServiceMonitor ---


def monitored_services(render, sm):
    return [(ident(svc), svc) for svc in render.by_kind("Service")]


@pytest.mark.parametrize("render,sm,svc",
                         params(each({"ServiceMonitor"}, monitored_services), 3, "no ServiceMonitor rendered"))
def test_servicemonitor_selects_service(render, sm, svc):
    """By labels, in its namespace, by port name, with a scrape timeout within the interval."""
    selector = sm["spec"]["selector"]["matchLabels"]
    assert matches(selector, svc["metadata"].get("labels", {})), \
        f"selector {selector}, Service labels {svc['metadata'].get('labels', {})}"
    assert sm["metadata"].get("namespace") == svc["metadata"].get("namespace"), \
        f"namespace {sm['metadata'].get('namespace')}, the Service's {svc['metadata'].get('namespace')}"
    ports = {p.get("name") for p in svc["spec"]["ports"]}
    for e in sm["spec"]["endpoints"]:
        assert e.get("port") in ports, f"endpoint port {e.get('port')} is no port name of the Service ({sorted(ports)})"
        timeout, interval = e.get("scrapeTimeout", "10s"), e.get("interval", "30s")
        assert seconds(timeout) <= seconds(interval), f"scrapeTimeout {timeout} > interval {interval}"
