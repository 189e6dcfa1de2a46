"""pytest plugin: a session-scoped real Kubernetes control plane.

Enable it from tests/conftest.py with::

    pytest_plugins = ["tests.support.kube_fixtures"]

and use the ``kube_cluster`` fixture (a started
:class:`tests.support.kube_cluster.KubeCluster`). The binaries are built by
tools/kube/build.sh on first use (a one-off that takes long on a cold machine;
run ``tools/kube/build.sh`` beforehand in CI). A build or start failure is an
error, never a skip.

Set MEDDISTILL_KUBE_KEEP_TMP=1 to keep the cluster's temp dir (logs, kubeconfigs).
"""

from __future__ import annotations

import contextlib
import sys

import pytest

from tests.support.kube_cluster import KubeCluster, ensure_binaries


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kube: needs the real kube-apiserver/etcd/kube-controller-manager (kube_cluster fixture)"
    )


@pytest.fixture(scope="session")
def kube_binaries(request: pytest.FixtureRequest):
    """{name: Path} of kube-apiserver, kube-controller-manager, kubectl, etcd, helm."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    # Show build progress live, even under output capture.
    ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    with ctx:
        return ensure_binaries(sys.stderr)


@pytest.fixture(scope="module")
def node_cluster(request: pytest.FixtureRequest, kube_binaries):
    """A one-node cluster where pods run (tests/support/node_cluster.py), for tests marked ``cluster``;
    per module, so its kubelet and pods are gone before the rest of the suite runs. A machine that
    cannot run it fails these tests with what is missing and how to deselect them."""
    from tests.support.node_cluster import NodeCluster, install_prerequisites

    capman = request.config.pluginmanager.getplugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    with ctx:
        install_prerequisites(sys.stderr)
        cluster = NodeCluster(kube_binaries, progress=sys.stderr)
        cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kube_cluster(kube_binaries):
    cluster = KubeCluster(kube_binaries)
    cluster.start()  # stops whatever it started before raising
    try:
        yield cluster
    finally:
        cluster.stop()
