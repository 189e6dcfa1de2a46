"""Test plugins shared by the whole suite (fixtures live in tests/; see each module's docstring)."""

pytest_plugins = [
    "tests.support.kube_fixtures",  # kube_cluster: real etcd + kube-apiserver + kube-controller-manager
    "tests.pipeline_fixture",  # tiny models/jobs for unit speed
    "tests.e2e_fixture",  # the one real quickstart pipeline: kubectl apply -> operator -> Ray -> Serving
]


def pytest_collection_modifyitems(config, items):
    """Run the tests on the session's Ray head last: it lives until the session ends, and Ray's own
    helpers refuse to pick between two local Ray instances, so in one pytest it must not overlap the
    tests that start a private local Ray."""
    def key(item):
        uses_ray_head = "ray_head" in getattr(item, "fixturenames", ())
        return (uses_ray_head, uses_ray_head and "test_zz_" in item.name)  # the delete test ends the run

    items.sort(key=key)
