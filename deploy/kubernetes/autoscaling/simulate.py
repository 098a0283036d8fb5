#!/usr/bin/env python3
"""Replays a load curve against tch-serve replicas under the autoscaling policies shipped in
deploy/kubernetes, and prints replicas, queue and p99 latency over time side by side.

    python3 -m venv .venv-sim && .venv-sim/bin/pip install -r deploy/kubernetes/autoscaling/requirements.txt
    .venv-sim/bin/python deploy/kubernetes/autoscaling/simulate.py --plot deploy/kubernetes/autoscaling/simulation.png

The policies are read from the manifests, not restated here:
  cpu       deploy/kubernetes/base/hpa.yaml (CPU utilisation, metrics-server)
  adapter   the same HPA patched by components/prometheus-adapter (Pods metric
            tch_serve_inflight_images through prometheus-adapter)
  keda      components/keda/scaledobject.yaml (External metric: KEDA's Prometheus scaler)
Prometheus' scrape interval comes from components/servicemonitor, the averaging window from the
queries themselves.

A replica (2 cores, ResNet-18 fp32, BENCHMARKS.md) is a batch server: it takes up to 8 queued
images per forward pass, a pass over b images takes 2.5 + 9.69 b ms (12.2 ms for one image,
80 ms for 8: 100 images/s at full batches, 82 at batches of one), and 3.4 ms of HTTP and decoding
latency come on top (idle p50 15.6 ms). Images beyond 32 waiting are refused at once (503). Its
CPU use is the fraction of time it computes (the forward pass uses both cores), plus 2% idle,
so it saturates at 100% when busy. Arrivals are Poisson at the offered rate; each image goes to
a uniformly random ready replica, as kube-proxy does per connection.

The control loop follows the Kubernetes HPA (pkg/controller/podautoscaler): every 15 s,
desired = ceil(ready pods * metric / target) unless |metric/target - 1| <= 0.1; for a scale-up,
pods not ready yet (and, for CPU, pods whose first metric window began before they were ready)
count as 0, as do pods without a metric; for a scale-down, pods without a metric count as the
target (CPU: as 100%). KEDA's External metric gives desired = ceil(sum / threshold), pods not
grouped. Then the stabilisation windows (scale-up: the lowest recommendation over the window,
scale-down: the highest), the scaling policies over their periods, and min/max.
metrics-server reports each pod's CPU over its last 15 s window (a scrape every 15 s);
Prometheus scrapes the in-flight gauge every scrape interval and the query averages the samples
over its window. A new pod is Pending (scheduling, image present on the node, container start)
for --pending-s, then serves /metrics while the model loads and the readiness probe passes
(--loading-s). The ReplicaSet removes the newest pods first; a removed pod gets no new requests
after 1 s and finishes its queue (the server's shutdown delay and drain).

Deterministic (--seed). Standard library only, plus PyYAML for the manifests and matplotlib for
--plot.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "kubernetes"

# ------------------------------------------------------------- replica model ---
# BENCHMARKS.md, 2 CPUs, ResNet-18 fp32, the server's defaults: 101 images/s saturated
# (closed loop, mean batch 7.9, forward pass 74.2 ms per batch of 8 + 1.4 core-ms of decoding
# per image), idle latency p50 15.6 ms (raw batch-1 forward 11.5 ms).
MAX_BATCH = 8
QUEUE_CAPACITY = 32
SERVICE_1 = 0.0122  # one image: 11.5 ms forward + 0.7 ms of decoding on the shared cores
SERVICE_8 = 0.0800  # eight images: 100 images/s
SERVICE_B = (SERVICE_8 - SERVICE_1) / (MAX_BATCH - 1)
SERVICE_A = SERVICE_1 - SERVICE_B
LATENCY_OVERHEAD = 0.0034  # HTTP exchange, decoding before the queue: idle p50 15.6 ms
IDLE_CPU = 0.02
CAPACITY = MAX_BATCH / SERVICE_8  # images/s per replica

METRICS_SERVER_RESOLUTION = 15  # s, metrics-server --metric-resolution default
HPA_SYNC = 15  # s, --horizontal-pod-autoscaler-sync-period default
TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance default
CPU_INITIALIZATION_PERIOD = 300  # s, --horizontal-pod-autoscaler-cpu-initialization-period
ENDPOINT_LAG = 1.0  # s from a pod's deletion to no new requests


def service_time(b: int) -> float:
    return SERVICE_A + SERVICE_B * b


# ------------------------------------------------------------ manifests ---


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def merge(base, patch):
    """Strategic-merge as the HPA's fields behave: maps merge, lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base.get(k), v) if k in base else v
        return out
    return patch


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def quantity(q) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


@dataclass
class Policy:
    name: str
    label: str
    kind: str  # cpu | pods | external
    target: float  # CPU: utilisation 0..1; in-flight: images per replica
    min_replicas: int
    max_replicas: int
    behavior: dict
    window: float = 0.0  # avg_over_time window of the query, s
    source: str = ""


def read_policies() -> dict[str, Policy]:
    base = load_yaml(K8S / "base" / "hpa.yaml")
    cpu_metric = base["spec"]["metrics"][0]["resource"]
    policies = {
        "cpu": Policy("cpu", f"CPU {cpu_metric['target']['averageUtilization']}%", "cpu",
                      cpu_metric["target"]["averageUtilization"] / 100,
                      base["spec"]["minReplicas"], base["spec"]["maxReplicas"],
                      base["spec"]["behavior"], source="base/hpa.yaml"),
    }
    patch = load_yaml(K8S / "components" / "prometheus-adapter" / "hpa-patch.yaml")
    hpa = merge(base, patch)
    m = hpa["spec"]["metrics"][0]
    assert m["type"] == "Pods", m
    rules = load_yaml(K8S / "components" / "prometheus-adapter" / "values.yaml")["rules"]["custom"]
    window = seconds(re.search(r"\[([0-9a-z]+)\]", rules[0]["metricsQuery"]).group(1))
    policies["adapter"] = Policy(
        "adapter", f"in-flight {quantity(m['pods']['target']['averageValue']):g}/pod (adapter)", "pods",
        quantity(m["pods"]["target"]["averageValue"]), hpa["spec"]["minReplicas"],
        hpa["spec"]["maxReplicas"], hpa["spec"]["behavior"], window,
        "base/hpa.yaml + components/prometheus-adapter")
    # For comparison only: the CPU metric with the in-flight policies' behaviour, to tell what
    # the metric changes from what the faster scale-up policy changes.
    policies["cpu-fast"] = Policy(
        "cpu-fast", f"CPU {cpu_metric['target']['averageUtilization']}%, adapter's behaviour", "cpu",
        policies["cpu"].target, policies["cpu"].min_replicas, policies["cpu"].max_replicas,
        hpa["spec"]["behavior"], source="base/hpa.yaml metric + components/prometheus-adapter behaviour")
    so = load_yaml(K8S / "components" / "keda" / "scaledobject.yaml")
    trig = so["spec"]["triggers"][0]
    assert trig.get("metricType", "AverageValue") == "AverageValue", trig
    window = seconds(re.search(r"\[([0-9a-z]+)\]", trig["metadata"]["query"]).group(1))
    policies["keda"] = Policy(
        "keda", f"in-flight {float(trig['metadata']['threshold']):g}/pod (KEDA)", "external",
        float(trig["metadata"]["threshold"]), so["spec"].get("minReplicaCount", 0),
        so["spec"].get("maxReplicaCount", 100),
        so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"], window,
        "components/keda")
    return policies


# ------------------------------------------------------------ load curves ---


def scenario(name: str) -> tuple[list[float], list[tuple[float, str]]]:
    """Offered images/s for each second, and labelled moments for the plot."""
    if name == "ramp-spike-drop":
        rate = []
        for t in range(1800):
            if t < 180:
                r = 120.0
            elif t < 540:
                r = 120 + (500 - 120) * (t - 180) / 360
            elif t < 720:
                r = 500.0
            elif t < 840:
                r = 800.0
            elif t < 960:
                r = 500.0
            else:
                r = 100.0
            rate.append(r)
        marks = [(180, "ramp"), (720, "spike"), (840, "spike ends"), (960, "drop")]
        return rate, marks
    raise ValueError(name)


def arrivals(rate: list[float], rng: random.Random) -> list[float]:
    out = []
    for sec, r in enumerate(rate):
        t = float(sec)
        while True:
            t += rng.expovariate(r)
            if t >= sec + 1:
                break
            out.append(t)
    return out


# ---------------------------------------------------------------- replicas ---


@dataclass(eq=False)
class Pod:
    name: int
    created: float
    running_at: float  # container started: /metrics answers (in-flight 0 while loading)
    ready_at: float
    deleted_at: float = math.inf
    exited_at: float = math.inf
    queue: deque = field(default_factory=deque)
    batch: list = field(default_factory=list)
    busy_until: float = 0.0
    busy: dict = field(default_factory=dict)  # second -> busy seconds
    samples: list = field(default_factory=list)  # Prometheus scrapes: (t, in-flight)
    cpu: tuple | None = None  # metrics-server: (window start, window end, utilisation)

    def ready(self, t: float) -> bool:
        return self.ready_at <= t < self.deleted_at

    def routable(self, t: float) -> bool:
        return self.ready_at <= t and t < self.deleted_at + ENDPOINT_LAG

    def running(self, t: float) -> bool:
        return self.running_at <= t < self.exited_at

    def inflight(self) -> int:
        return len(self.queue) + len(self.batch)

    def _account(self, start: float, end: float) -> None:
        s = start
        while s < end:
            sec = int(s)
            e = min(end, sec + 1)
            self.busy[sec] = self.busy.get(sec, 0.0) + (e - s)
            s = e

    def _start(self, at: float, items: list) -> None:
        self.batch = items
        self.busy_until = at + service_time(len(items))
        self._account(at, self.busy_until)

    def advance(self, t: float, done: list) -> None:
        """Runs the server up to time t; appends (completion time, latency) to done."""
        while self.batch and self.busy_until <= t:
            end = self.busy_until
            for a in self.batch:
                done.append((end, end - a + LATENCY_OVERHEAD))
            self.batch = []
            if self.queue:
                n = min(MAX_BATCH, len(self.queue))
                self._start(end, [self.queue.popleft() for _ in range(n)])

    def arrive(self, a: float, done: list) -> bool:
        """False when the image is refused (queue full)."""
        self.advance(a, done)
        if not self.batch:
            self._start(a, [a])
            return True
        if len(self.queue) >= QUEUE_CAPACITY:
            return False
        self.queue.append(a)
        return True

    def utilisation(self, start: int, end: int) -> float:
        busy = sum(self.busy.get(s, 0.0) for s in range(start, end))
        return min(1.0, IDLE_CPU + busy / (end - start))


# ------------------------------------------------------------------- HPA ---


class Autoscaler:
    """The HPA controller's replica calculation and behaviour (or KEDA's HPA on an External
    metric), for one policy."""

    def __init__(self, policy: Policy):
        self.p = policy
        self.recommendations: list[tuple[float, int]] = []
        self.events: list[tuple[float, int]] = []  # (time, replica change)
        b = policy.behavior
        self.up = b.get("scaleUp", {})
        self.down = b.get("scaleDown", {})
        self.up.setdefault("stabilizationWindowSeconds", 0)
        self.down.setdefault("stabilizationWindowSeconds", 300)
        self.up.setdefault("policies", [{"type": "Percent", "value": 100, "periodSeconds": 15},
                                        {"type": "Pods", "value": 4, "periodSeconds": 15}])
        self.down.setdefault("policies", [{"type": "Percent", "value": 100, "periodSeconds": 15}])

    # -- metric -> proposal (replica_calculator.go)
    def _plain(self, current: int, ready: dict, unready: list, missing: list, target: float,
               missing_down_value: float) -> int | None:
        if not ready:
            return None  # "did not receive metrics for any ready pods": no change
        ratio = sum(ready.values()) / len(ready) / target
        up_with_unready = bool(unready) and ratio > 1.0
        if not up_with_unready and not missing:
            if abs(1.0 - ratio) <= TOLERANCE:
                return current
            return math.ceil(ratio * len(ready))
        values = dict(ready)
        if missing:
            fill = missing_down_value if ratio < 1.0 else 0.0
            if ratio != 1.0:
                for p in missing:
                    values[p] = fill
        if up_with_unready:
            for p in unready:
                values[p] = 0.0
        new_ratio = sum(values.values()) / len(values) / target
        if (abs(1.0 - new_ratio) <= TOLERANCE or (ratio < 1.0 < new_ratio)
                or (ratio > 1.0 > new_ratio)):
            return current
        n = math.ceil(new_ratio * len(values))
        if (new_ratio < 1.0 and n > current) or (new_ratio > 1.0 and n < current):
            return current
        return n

    def proposal(self, t: float, pods: list[Pod], window: float) -> int | None:
        live = [p for p in pods if p.deleted_at > t]
        current = len(live)
        if self.p.kind == "cpu":
            ready, unready, missing = {}, [], []
            for p in live:
                if not p.running(t):
                    unready.append(p)
                elif p.cpu is None:
                    missing.append(p)
                elif t - p.created < CPU_INITIALIZATION_PERIOD and (
                        not p.ready(t) or p.cpu[0] < p.ready_at):
                    unready.append(p)
                elif not p.ready(t):
                    unready.append(p)
                else:
                    ready[p] = p.cpu[2]
            return self._plain(current, ready, unready, missing, self.p.target,
                               max(1.0, self.p.target))
        if self.p.kind == "pods":
            ready, unready, missing = {}, [], []
            for p in live:
                if not p.running(t):
                    unready.append(p)  # phase Pending
                    continue
                vals = [v for ts, v in p.samples if t - window < ts <= t]
                if not vals:
                    missing.append(p)
                else:
                    ready[p] = sum(vals) / len(vals)
            return self._plain(current, ready, unready, missing, self.p.target, self.p.target)
        # external, AverageValue: the query sums every pod's series, deleted ones included
        # while their samples are in the window.
        total = 0.0
        for p in pods:
            vals = [v for ts, v in p.samples if t - window < ts <= t]
            if vals:
                total += sum(vals) / len(vals)
        if current and abs(total / (self.p.target * current) - 1.0) <= TOLERANCE:
            return current
        return math.ceil(total / self.p.target)

    # -- behaviour (horizontal.go: stabilizeRecommendationWithBehaviors,
    #    convertDesiredReplicasWithBehaviorRate)
    def _change_in_period(self, t: float, period: float, sign: int) -> int:
        return sum(d for ts, d in self.events if t - ts < period and d * sign > 0)

    def decide(self, t: float, current: int, desired: int) -> int:
        if current > self.p.max_replicas:
            desired = self.p.max_replicas
        elif current < self.p.min_replicas:
            desired = self.p.min_replicas
        self.recommendations.append((t, desired))
        up_w = self.up["stabilizationWindowSeconds"]
        down_w = self.down["stabilizationWindowSeconds"]
        up_rec = min([r for ts, r in self.recommendations if ts > t - up_w] + [desired])
        down_rec = max([r for ts, r in self.recommendations if ts > t - down_w] + [desired])
        horizon = max(up_w, down_w)
        self.recommendations = [(ts, r) for ts, r in self.recommendations if ts > t - horizon]
        rec = max(current, up_rec)
        rec = min(rec, down_rec)
        if rec > current:
            limits = []
            for pol in self.up["policies"]:
                start = current - self._change_in_period(t, pol["periodSeconds"], +1)
                if pol["type"] == "Pods":
                    limits.append(start + pol["value"])
                else:
                    limits.append(math.ceil(start * (1 + pol["value"] / 100)))
            select = self.up.get("selectPolicy", "Max")
            limit = current if select == "Disabled" else (max(limits) if select == "Max" else min(limits))
            limit = max(limit, current)
            rec = min(rec, limit, self.p.max_replicas)
        elif rec < current:
            limits = []
            for pol in self.down["policies"]:
                start = current - self._change_in_period(t, pol["periodSeconds"], -1)
                if pol["type"] == "Pods":
                    limits.append(start - pol["value"])
                else:
                    limits.append(math.ceil(start * (1 - pol["value"] / 100)))
            select = self.down.get("selectPolicy", "Max")
            limit = current if select == "Disabled" else (min(limits) if select == "Max" else max(limits))
            limit = min(limit, current)
            rec = max(rec, limit, self.p.min_replicas)
        if rec != current:
            self.events.append((t, rec - current))
        return rec


# ------------------------------------------------------------- simulation ---


@dataclass
class Run:
    policy: Policy
    replicas: list  # per second: pods not deleted
    ready: list  # per second: ready pods
    inflight: list  # per second: images in flight, all pods
    completed: list  # per second: images answered
    rejected: list  # per second: images refused (503)
    latencies: list  # per second of completion: [latency, ...]
    cpu_avg: list  # per HPA tick: (t, metric value the HPA saw)

    def p99(self, start: int, end: int) -> float:
        vals = sorted(v for s in range(start, end) for v in self.latencies[s])
        if not vals:
            return float("nan")
        return vals[min(len(vals) - 1, int(0.99 * len(vals)))]


def simulate(policy: Policy, rate: list[float], times: list[float], route: list[float],
             pending_s: float, loading_s: float, scrape: float, scrape_phase: float = 7.0,
             ms_phase: float = 3.0) -> Run:
    duration = len(rate)
    scaler = Autoscaler(policy)
    pods: list[Pod] = []
    counter = 0

    def new_pod(t: float, started: bool) -> Pod:
        nonlocal counter
        counter += 1
        if started:  # already running at the start of the run
            return Pod(counter, t - 600, t - 600, t - 600)
        return Pod(counter, t, t + pending_s, t + pending_s + loading_s)

    # Start in the steady state for the opening load.
    initial = max(policy.min_replicas, math.ceil(rate[0] / CAPACITY / 0.7))
    pods = [new_pod(0.0, True) for _ in range(initial)]
    run = Run(policy, [], [], [], [], [], [[] for _ in range(duration + 120)], [])
    done: list = []
    i = 0
    n = len(times)
    for sec in range(duration):
        t = float(sec)
        # metrics-server scrape: CPU over the last resolution window
        if sec % METRICS_SERVER_RESOLUTION == ms_phase:
            for p in pods:
                if p.running(t - METRICS_SERVER_RESOLUTION) and p.running(t):
                    p.cpu = (t - METRICS_SERVER_RESOLUTION, t,
                             p.utilisation(sec - METRICS_SERVER_RESOLUTION, sec))
        # Prometheus scrape of the in-flight gauge
        if (sec - scrape_phase) % scrape == 0:
            for p in pods:
                if p.running(t):
                    p.advance(t, done)
                    p.samples.append((t, p.inflight() if p.ready_at <= t else 0))
                    if len(p.samples) > 64:
                        del p.samples[:32]
        # the HPA's sync
        if sec % HPA_SYNC == 0 and sec > 0:
            live = [p for p in pods if p.deleted_at > t]
            proposal = scaler.proposal(t, pods, policy.window)
            if policy.kind == "cpu":
                ready_cpu = [p.cpu[2] for p in live if p.cpu and p.ready(t)]
                seen = sum(ready_cpu) / len(ready_cpu) if ready_cpu else float("nan")
            else:
                vals = [sum(v for ts, v in p.samples if t - policy.window < ts <= t)
                        / max(1, sum(1 for ts, _ in p.samples if t - policy.window < ts <= t))
                        for p in pods if p.samples]
                seen = sum(vals) / max(1, len(live))
            run.cpu_avg.append((t, seen))
            if proposal is not None:
                want = scaler.decide(t, len(live), proposal)
                if want > len(live):
                    pods.extend(new_pod(t, False) for _ in range(want - len(live)))
                elif want < len(live):
                    # ReplicaSet: not-ready pods first, then the most recently ready ones
                    victims = sorted(live, key=lambda p: (p.ready(t), -p.ready_at))[: len(live) - want]
                    for p in victims:
                        p.deleted_at = t
        # arrivals during this second
        routable = [p for p in pods if p.routable(t)]
        rejected = 0
        while i < n and times[i] < sec + 1:
            a = times[i]
            if not routable:
                rejected += 1
            else:
                pod = routable[int(route[i] * len(routable))]
                if not pod.arrive(a, done):
                    rejected += 1
            i += 1
        end = t + 1
        for p in pods:
            p.advance(end, done)
            # a deleted pod exits once drained (and after the server's 5 s shutdown delay)
            if p.deleted_at <= end and p.exited_at == math.inf and not p.inflight() \
                    and end >= p.deleted_at + 5:
                p.exited_at = end
        pods = [p for p in pods if p.exited_at > end - 120]
        completed = 0
        for c, lat in done:
            run.latencies[int(c)].append(lat)
            completed += 1
        done.clear()
        run.replicas.append(sum(1 for p in pods if p.deleted_at > end))
        run.ready.append(sum(1 for p in pods if p.ready(end)))
        run.inflight.append(sum(p.inflight() for p in pods))
        run.completed.append(completed)
        run.rejected.append(rejected)
    return run


# ---------------------------------------------------------- target check ---


def steady_state(utilisation: float, seconds_: int, rng: random.Random) -> dict:
    """One replica at a constant Poisson load: mean in-flight, latency, refusals."""
    lam = utilisation * CAPACITY
    pod = Pod(0, -1, -1, -1)
    done: list = []
    t = 0.0
    samples = []
    refused = total = 0
    next_sample = 1.0
    while True:
        t += rng.expovariate(lam)
        if t >= seconds_:
            break
        while next_sample <= t:
            pod.advance(next_sample, done)
            samples.append(pod.inflight())
            next_sample += 0.1
        total += 1
        if not pod.arrive(t, done):
            refused += 1
    pod.advance(math.inf, done)
    lats = sorted(lat for _, lat in done)
    return {"u": utilisation, "rate": lam, "inflight": sum(samples) / len(samples),
            "p50": lats[len(lats) // 2], "p99": lats[int(0.99 * len(lats))],
            "refused": refused / total,
            "cpu": min(1.0, IDLE_CPU + sum(pod.busy.values()) / seconds_)}


# ------------------------------------------------------------------ main ---


def fmt_ms(s: float) -> str:
    return "-" if s != s else f"{s * 1000:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="ramp-spike-drop")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pending-s", type=float, default=20.0,
                    help="scheduling + container start of a new pod, image already on the node (20)")
    ap.add_argument("--loading-s", type=float, default=10.0,
                    help="model load, warm-up and the readiness probe passing (10)")
    ap.add_argument("--step", type=int, default=120, help="seconds per row of the table (120)")
    ap.add_argument("--plot", help="write the plot (PNG) here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--policies", default="cpu,cpu-fast,adapter,keda")
    ap.add_argument("--table", default="cpu,adapter", help="policies in the per-minute table")
    ap.add_argument("--seeds", type=int, default=5, help="seeds averaged in the summary (5)")
    ap.add_argument("--inflight-target", type=float,
                    help="try another in-flight target instead of the manifests' (what-if)")
    opts = ap.parse_args()

    sm = load_yaml(K8S / "components" / "servicemonitor" / "servicemonitor.yaml")
    scrape = seconds(sm["spec"]["endpoints"][0]["interval"])
    policies = read_policies()
    chosen = [policies[n] for n in opts.policies.split(",")]
    if opts.inflight_target:
        for p in chosen:
            if p.kind != "cpu":
                p.target = opts.inflight_target
                p.label = re.sub(r"in-flight [0-9.]+", f"in-flight {opts.inflight_target:g}", p.label)

    print(f"Replica model: {CAPACITY:.0f} images/s at batches of {MAX_BATCH}, "
          f"{1 / SERVICE_1:.0f} at batches of 1; queue {QUEUE_CAPACITY} images; "
          f"new pod: {opts.pending_s:g} s pending + {opts.loading_s:g} s loading; "
          f"Prometheus scrape {scrape:g} s")
    print()
    print("One replica at a steady Poisson load (how the in-flight target maps to utilisation):")
    rows = [steady_state(u, 300, random.Random(opts.seed + k))
            for k, u in enumerate((0.25, 0.5, 0.6, 0.67, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.1))]
    table(["load / capacity", "images/s", "CPU", "mean in-flight", "p50 ms", "p99 ms", "refused"],
          [[f"{r['u']:.0%}", f"{r['rate']:.0f}", f"{r['cpu']:.0%}", f"{r['inflight']:.1f}",
            fmt_ms(r["p50"]), fmt_ms(r["p99"]), f"{r['refused']:.1%}"] for r in rows], opts.markdown)
    print()
    for p in chosen:
        print(f"  {p.name}: {p.label}, {p.min_replicas}-{p.max_replicas} replicas ({p.source})")
    print()

    rate, marks = scenario(opts.scenario)
    rng = random.Random(opts.seed)
    times = arrivals(rate, rng)
    route = [rng.random() for _ in times]
    runs = [simulate(p, rate, times, route, opts.pending_s, opts.loading_s, scrape) for p in chosen]
    shown = [r for r in runs if r.policy.name in opts.table.split(",")]
    print(f"Scenario {opts.scenario}, seed {opts.seed}: {len(times)} images over {len(rate) // 60} min. "
          f"Per policy and row: replicas (not deleted/ready) at the row's end, mean images in flight "
          f"per ready replica, p99 of the images answered (ms), images refused (503).")
    head = ["min", "offered/s"]
    for r in shown:
        head += [f"{r.policy.name} replicas", f"{r.policy.name} in-flight", f"{r.policy.name} p99",
                 f"{r.policy.name} 503"]
    body = []
    for s in range(0, len(rate), opts.step):
        e = min(len(rate), s + opts.step)
        row = [f"{s / 60:g}", f"{sum(rate[s:e]) / (e - s):.0f}"]
        for r in shown:
            ready = sum(r.ready[s:e]) / (e - s)
            row += [f"{r.replicas[e - 1]}/{r.ready[e - 1]}",
                    f"{sum(r.inflight[s:e]) / (e - s) / max(1.0, ready):.1f}",
                    fmt_ms(r.p99(s, e)), str(sum(r.rejected[s:e]))]
        body.append(row)
    table(head, body, opts.markdown)
    if opts.plot:
        plot(opts.plot, rate, marks, runs)
        print(f"\nplot: {opts.plot}")

    print()
    print(f"Summary over seeds {opts.seed}..{opts.seed + opts.seeds - 1} (means), for two pod start-up "
          f"times (pending + loading):")
    srows = []
    startups = [(opts.pending_s, opts.loading_s), (opts.pending_s + 60, opts.loading_s)]
    for pending, loading in startups:
        per_policy = {p.name: [] for p in chosen}
        for k in range(opts.seeds):
            r2 = random.Random(opts.seed + k)
            t2 = arrivals(rate, r2)
            ro2 = [r2.random() for _ in t2]
            for p in chosen:
                per_policy[p.name].append(simulate(p, rate, t2, ro2, pending, loading, scrape))
        for p in chosen:
            rs = per_policy[p.name]
            offered = [sum(r.completed) + sum(r.rejected) for r in rs]
            refused = [sum(r.rejected) for r in rs]
            worst = [max(r.p99(s, s + 60) for s in range(0, len(rate), 60)) for r in rs]
            srows.append([p.label, f"{pending + loading:g} s",
                          f"{mean(refused):.0f} ({mean(refused) / mean(offered):.2%})",
                          fmt_ms(mean([r.p99(0, len(rate)) for r in rs])),
                          fmt_ms(mean(worst)),
                          f"{mean([sum(r.replicas) / 60 for r in rs]):.0f}",
                          f"{mean([max(r.replicas) for r in rs]):.1f}"])
    table(["policy", "pod start-up", "refused (503)", "p99 ms", "worst minute p99 ms",
           "replica-minutes", "max replicas"], srows, opts.markdown)
    return 0


def mean(xs: list) -> float:
    return sum(xs) / len(xs)


def table(head: list, rows: list, markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def plot(path: str, rate: list, marks: list, runs: list) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"cpu": dict(color="tab:blue"), "cpu-fast": dict(color="tab:cyan", lw=1),
             "adapter": dict(color="tab:red"), "keda": dict(color="black", lw=0.8, ls=":")}
    minutes = [s / 60 for s in range(len(rate))]
    w = 10
    xs = [s / 60 for s in range(0, len(rate), w)]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(minutes, rate, color="grey", lw=2, label="offered images/s")
    for r in runs:
        if r.policy.name in ("cpu", "adapter"):
            ax.plot(minutes, [n * CAPACITY for n in r.ready], label=f"ready capacity, {r.policy.label}",
                    **style[r.policy.name])
    ax.set_ylabel("images/s")
    ax.set_ylim(0, max(rate) * 1.35)
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    for ax, title in zip(axes[1:], ("replicas", "p99 latency, ms (10 s windows)", "refused images/s (503)")):
        for r in runs:
            if title == "replicas":
                ys = r.replicas
                ax.step(minutes, ys, where="post", label=r.policy.label, **style[r.policy.name])
                continue
            if title.startswith("p99"):
                ys = [r.p99(s, s + w) * 1000 for s in range(0, len(rate), w)]
            else:
                ys = [sum(r.rejected[s:s + w]) / w for s in range(0, len(rate), w)]
            ax.plot(xs, ys, label=r.policy.label, **style[r.policy.name])
        ax.set_ylabel(title)
        ax.legend(fontsize=8, loc="upper right")
    axes[2].set_yscale("log")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        for t, _ in marks:
            ax.axvline(t / 60, color="grey", lw=0.5, ls="--")
        ax.grid(alpha=0.3)
    for t, text in marks:
        axes[0].text(t / 60 + 0.1, max(rate) * 1.02, text, fontsize=8, color="grey")
    fig.suptitle("tch-serve autoscaling, simulated: ramp, spike, drop (replica model from BENCHMARKS.md)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    sys.exit(main())
