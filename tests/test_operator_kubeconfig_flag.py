"""`meddistill operator --kubeconfig FILE` alone is enough: no KUBECONFIG, no ~/.kube/config.

How a platform engineer first tries the operator. The kubernetes client fixes its default kubeconfig
path from $KUBECONFIG at import, before the flag is parsed, and kopf's login reads that default; the
other operator tests put KUBECONFIG in the environment, so they would never notice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from tests.support.kube_cluster import REPO_ROOT, free_port
from tests.test_operator_kube import Kube, install_operator_prereqs, pvc_store, quickstart, wait_for

pytest_plugins = ["tests.support.kube_fixtures"]
pytestmark = pytest.mark.kube


def test_kubeconfig_flag_alone_logs_in_and_reconciles(kube_cluster, tmp_path):
    install_operator_prereqs(kube_cluster)
    ns = f"kcflag-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env["HOME"] = str(tmp_path / "home")  # no ~/.kube/config to fall back on either
    log_path = tmp_path / "operator.log"
    argv = [sys.executable, "-m", "meddistill.cli", "operator", "--kubeconfig", str(kube_cluster.operator_kubeconfig),
            "--namespace", ns, "--metrics-port", "0", "--health-port", str(free_port()), "--resync-seconds", "2"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    try:
        kube = Kube(kube_cluster, ns)
        kube.apply(quickstart("kcflag", pvc_store(ns)))

        def reconciled():
            assert proc.poll() is None, f"operator exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            return kube.job("kcflag").get("status", {}).get("phase")

        wait_for(reconciled, 60, f"the operator to write the job's status (log: {log_path})")
        assert "Cannot authenticate" not in log_path.read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
