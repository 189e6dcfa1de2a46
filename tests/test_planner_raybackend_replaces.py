"""The Ray-cluster backend's side of serving.replaces, pure: the app a replacing job deploys is the
replaced job's (name, route), records its new owner, and garbage collection follows that owner."""
from __future__ import annotations

from meddistill.operator.backends import raycluster_objects as rb
from meddistill.operator.backends.raycluster import RayCluster, Snapshot
from meddistill.operator.planner import Serve
from tests.test_planner_raybackend import job


def test_a_replacing_job_deploys_to_the_replaced_jobs_app_and_records_itself_as_owner():
    j = job()
    j.spec.serving.replaces = "old"
    app = rb.serve_application(j, Serve("mdj_team-a_old", "/runs/qs/quantize"))
    ns = j.metadata.namespace
    assert (app["name"], app["route_prefix"]) == (rb.app_name(ns, "old"), f"/{ns}/old")
    assert app["runtime_env"]["env_vars"][rb.SERVED_BY_ENV] == f"{ns}/{j.metadata.name}"
    served = {"route_prefix": app["route_prefix"], "deployed_app_config": app, "status": "RUNNING"}
    assert rb.serving_app(app["name"], served).owner == f"{ns}/{j.metadata.name}"
    assert rb.app_owner({"route_prefix": f"/{ns}/old", "deployed_app_config": {}}) == (ns, "old")  # no record: the route's job


def test_garbage_collection_follows_the_owner_not_the_route():
    j = job()
    j.spec.serving.replaces = "old"
    ns = j.metadata.namespace
    app = rb.serve_application(j, Serve("x", "/m"))
    apps = {app["name"]: {"route_prefix": app["route_prefix"], "deployed_app_config": app}}

    class Recording(RayCluster):
        def __init__(self):
            self.removed = []

        def remove_apps(self, names):
            self.removed += sorted(names)

    ray = Recording()
    assert ray.collect_garbage(Snapshot(runs=[], apps=apps), {(ns, j.metadata.name): "u"}, None) == []  # old deleted: kept
    assert ray.collect_garbage(Snapshot(runs=[], apps=apps), {(ns, "old"): "u"}, None) == [app["name"]]  # new deleted
