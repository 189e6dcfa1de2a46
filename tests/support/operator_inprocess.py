"""The operator's reconcile run in the test process, as the operator's ServiceAccount (kopf left out).

Tests that call `handlers.reconcile` directly against the real API server share this: the default
Kubernetes client authenticates with the chart's RBAC, and each test gets a fresh namespace.
"""
from __future__ import annotations

import uuid
from contextlib import contextmanager

import pytest

from tests.test_operator_kube import Kube, install_operator_prereqs, pvc_root_env


@pytest.fixture(scope="module")
def as_operator(kube_cluster):
    """This process's default Kubernetes client authenticates as the operator's ServiceAccount."""
    from kubernetes import client, config

    install_operator_prereqs(kube_cluster)
    saved = client.Configuration.get_default_copy()
    config.load_kube_config(config_file=str(kube_cluster.operator_kubeconfig))
    with pvc_root_env():  # pvc:// resolves where pvc_store() mounts each namespace's claim
        yield
    client.Configuration.set_default(saved)


@contextmanager
def fresh_namespace(kube_cluster, prefix: str):
    """A new namespace named PREFIX-xxxxxx, deleted (without waiting) afterwards."""
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        yield Kube(kube_cluster, ns)
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found")
