"""Test plugins shared by the whole suite (fixtures live in tests/; see each module's docstring)."""

pytest_plugins = [
    "tests.support.kube_fixtures",  # kube_cluster: real etcd + kube-apiserver + kube-controller-manager
    "tests.pipeline_fixture",  # tiny models/jobs for unit speed
    "tests.e2e_fixture",  # the one real quickstart pipeline: kubectl apply -> operator -> Ray -> Serving
]
