"""Operator scale: N MedDistillJobs applied at once against a real kube-apiserver.

Measures, in one run:
- time from each job's create (client side) to its first RayJob (watch ADDED event): p50 / p95 / max;
- API requests the operator made per job, from the apiserver's own `apiserver_request_total`
  (before/after deltas for the resources the operator touches, minus this script's own requests);
- CPU seconds of the operator, kube-apiserver and etcd during the burst, and with --profile the
  operator's CPU by function (py-spy).

    python bench/operator_scale.py [--jobs 50] [--resync 30] [--profile]

Runs the operator as a real process with the chart's RBAC and the operator ServiceAccount token
(tests/support/kube_cluster.py starts etcd + kube-apiserver + kube-controller-manager).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # appended, after the standard library: operator/ must not shadow `operator`

from tests.support.kube_cluster import KubeCluster  # noqa: E402
from tests.test_operator_kube import OperatorProcess, install_operator_prereqs, pvc_store, quickstart  # noqa: E402

COUNTED = {"meddistilljobs", "rayjobs", "rayservices", "events"}
METRIC = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')


def request_counts(cluster: KubeCluster) -> Counter:
    """(verb, resource, subresource) -> requests, from the apiserver's /metrics."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    out: Counter = Counter()
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if labels.get("resource") in COUNTED and labels.get("dry_run", "") == "":
            out[(labels["verb"], labels["resource"], labels.get("subresource", ""))] += float(m["value"])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def print_profile(path: Path, top: int = 25) -> None:
    """Share of the operator's busy samples under each function (inclusive), from py-spy's collapsed stacks."""
    inclusive: Counter = Counter()
    busy = 0
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if any(idle in frames[-1] for idle in ("select", "epoll", "_worker (concurrent", "wait (threading")):
            continue  # a thread waiting, not working
        busy += int(count)
        for frame in {f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")" if " (" in f else f for f in frames}:
            inclusive[frame] += int(count)
    if not busy:
        print("profile: no samples (is py-spy installed, and may it ptrace the operator?)")
        return
    print(f"operator CPU by function (py-spy, {busy} busy samples, inclusive share; the trunk every sample "
          f"shares left out; sampling slows the operator, so take latencies from a run without --profile):")
    for frame, n in [(f, n) for f, n in inclusive.most_common() if n < 0.85 * busy][:top]:
        print(f"  {100 * n / busy:5.1f}%  {frame}")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--resync", type=float, default=30.0, help="operator --resync-seconds")
    ap.add_argument("--profile", action="store_true", help="sample the operator with py-spy during the burst and "
                    "print where its CPU goes (py-spy must be installed; needs ptrace rights)")
    args = ap.parse_args()
    if args.profile and not shutil.which("py-spy"):
        ap.error("--profile needs py-spy: pip install py-spy")

    from kubernetes import client, watch

    tmp = Path(tempfile.mkdtemp(prefix="meddistill-bench-"))
    with KubeCluster() as cluster:
        install_operator_prereqs(cluster)
        ns = "bench"
        cluster.kubectl("create", "namespace", ns)
        op = OperatorProcess(cluster, tmp / "operator.log", resync=args.resync).start()
        custom = client.CustomObjectsApi(cluster.api_client())

        first_rayjob: dict[str, float] = {}
        ready = threading.Event()

        def watch_rayjobs():
            w = watch.Watch()
            ready.set()
            for ev in w.stream(custom.list_namespaced_custom_object, "ray.io", "v1", ns, "rayjobs", timeout_seconds=300):
                if ev["type"] == "ADDED":
                    job = ev["object"]["metadata"]["labels"]["meddistill.io/job"]
                    first_rayjob.setdefault(job, time.monotonic())
                if len(first_rayjob) >= args.jobs:
                    w.stop()

        watcher = threading.Thread(target=watch_rayjobs, daemon=True)
        watcher.start()
        ready.wait()
        time.sleep(1.0)
        before = request_counts(cluster)
        # Where the time goes: CPU the operator and the apiserver spend on the burst, against its wall time.
        pids = {"operator": op.proc.pid, **{p.name: p.popen.pid for p in cluster._procs if p.name in ("kube-apiserver", "etcd")}}
        cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
        profile = tmp / "operator.pyspy"
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(op.proc.pid), "--format", "raw", "--rate", "200",
                                "--output", str(profile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) \
            if args.profile else None

        created: dict[str, float] = {}
        t0 = time.monotonic()
        for i in range(args.jobs):
            name = f"bench-{i:03d}"
            custom.create_namespaced_custom_object("meddistill.io", "v1alpha1", ns, "meddistilljobs",
                                                   # a local path is refused on KubeRay (its pods share none);
                                                   # pvc_store mounts the claim for the operator in ns
                                                   quickstart(name, pvc_store(ns)))
            created[name] = time.monotonic()
        apply_s = time.monotonic() - t0
        watcher.join(timeout=300)
        burst_s = max(first_rayjob.values(), default=t0) - t0
        cpu_burst = {k: cpu_seconds(pid) - cpu_before[k] for k, pid in pids.items()}
        if spy:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
            spy.wait(60)
        if len(first_rayjob) < args.jobs:
            print(f"only {len(first_rayjob)}/{args.jobs} jobs got a RayJob; operator log: {tmp / 'operator.log'}")
            return 1
        # Let follow-up reconciles (status writes echoing back as events) settle, then count.
        time.sleep(3.0)
        after = request_counts(cluster)
        op.stop()

    latencies = [first_rayjob[n] - created[n] for n in created]
    delta = after - before
    delta[("POST", "meddistilljobs", "")] -= args.jobs  # this script's creates
    delta[("WATCH", "rayjobs", "")] -= 1  # this script's watch
    delta = +delta  # drop zero / negative entries
    total = sum(delta.values())
    print(f"jobs: {args.jobs} created in {apply_s:.2f}s (one client, sequential POSTs)")
    print(f"apply -> first RayJob: p50 {percentile(latencies, 50):.2f}s  p95 {percentile(latencies, 95):.2f}s  "
          f"max {max(latencies):.2f}s  mean {statistics.mean(latencies):.2f}s")
    print(f"burst (first create -> last first RayJob) {burst_s:.2f}s wall; CPU seconds in it: "
          + ", ".join(f"{k} {v:.2f}s" for k, v in cpu_burst.items())
          + f"; operator CPU per job {1000 * cpu_burst['operator'] / args.jobs:.0f} ms (kopf + reconcile, one Python process)")
    if args.profile:
        print_profile(profile)
    print(f"API requests by the operator until settled: {total:.0f} total, {total / args.jobs:.1f} per job")
    for (verb, resource, sub), n in sorted(delta.items(), key=lambda kv: -kv[1]):
        print(f"  {verb:6s} {resource}{'/' + sub if sub else ''}: {n:.0f} ({n / args.jobs:.2f}/job)")
    print(f"steady state: each resync ({args.resync:.0f}s) costs 1 LIST + 3 requests per job (GET job, LIST rayjobs, LIST rayservices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
