"""Bring up the one-node Kubernetes cluster the `cluster` tests use, for a person to use.

    sudo python tools/kube/cluster.py up        # builds what is missing, starts, prints KUBECONFIG; Ctrl-C tears down
    sudo python tools/kube/cluster.py down      # removes what a killed `up` left behind (bridge, iptables, cgroups, mounts)

`up` runs in the foreground: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet,
kube-proxy, CoreDNS, containerd and KubeRay's controller on this machine (tests/support/node_cluster.py),
with the MedDistill image built from this checkout and imported (name printed). In another shell:

    export KUBECONFIG=<printed path>; kubectl get nodes; helm install ...

Needs root and Debian's containerd, runc, debootstrap, containernetworking-plugins, iptables (installed
with apt-get when missing). Binaries and images are cached under ~/.cache/meddistill/.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support import node_cluster as nc  # noqa: E402
from tests.support.kube_cluster import ensure_binaries  # noqa: E402


def up() -> int:
    nc.install_prerequisites(sys.stderr)
    binaries = ensure_binaries(sys.stderr)
    started = time.monotonic()
    cluster = nc.NodeCluster(binaries, progress=sys.stderr, keep_tmp=False)
    cluster.start()
    print(f"one-node cluster up in {time.monotonic() - started:.0f}s", flush=True)
    print(f"  export KUBECONFIG={cluster.kubeconfig}")
    print(f"  image: {cluster.image} (imagePullPolicy: Never)")
    print(f"  kubectl: {cluster.bin('kubectl')}\n  helm: {cluster.bin('helm')}")
    print("Ctrl-C tears it down.", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        print("tearing down ...", flush=True)
        cluster.stop()
    return 0


def down() -> int:
    """What a killed `up` leaves: the bridge, iptables chains, cgroups, sysctls stay changed (not known now)."""
    subprocess.run(["ip", "link", "del", nc.BRIDGE], capture_output=True)
    leftover = nc.NodeCluster.__new__(nc.NodeCluster)
    nc.NodeCluster._sweep_network(leftover)
    nc.NodeCluster._remove_cgroups()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if "/meddistill-kube-" in point or point.startswith("/run/netns/cni-"):
            subprocess.run(["umount", "-l", point], capture_output=True)
    print("removed what was left of a one-node cluster (if anything)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    return up() if args.command == "up" else down()


if __name__ == "__main__":
    sys.exit(main())
