"""`meddistill operator`: run the Kubernetes operator (kopf) that drives MedDistillJobs."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "operator",
        help=summary,
        description="Watch MedDistillJobs and run each stage as a KubeRay RayJob, then serve the quantized "
        "student with a RayService (needs KubeRay's CRDs in the cluster). A job naming one of the Ray clusters "
        "listed in --ray-clusters (spec.ray.cluster), or every job when the list has a default, runs on that existing "
        "Ray cluster instead: stages through the Ray Jobs API, serving as a Ray Serve app.",
    )
    p.add_argument("--namespace", "-n", help="watch only this namespace (default: all namespaces)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else $KUBECONFIG / ~/.kube/config)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0 disables; default 8080)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint /healthz port (default 8081)")
    p.add_argument("--resync-seconds", type=float, default=30.0, help="re-plan every job this often as a backstop")
    p.add_argument("--peering", metavar="NAME", default=os.environ.get("MEDDISTILL_PEERING", ""),
                   help="run as one of several replicas: the kopf peering object NAME (a ClusterKopfPeering, or a "
                        "KopfPeering in --namespace) elects one active replica (default $MEDDISTILL_PEERING; none: standalone)")
    p.add_argument("--peering-priority", type=int, default=None,
                   help="this replica's priority among its peers, highest active (default: random, so no two tie)")
    p.add_argument("--peering-lifetime", type=int, default=60,
                   help="seconds a silent active replica is trusted before a standby takes over (default 60)")
    p.add_argument("--ray-clusters", metavar="FILE", default=os.environ.get("MEDDISTILL_RAY_CLUSTERS", ""),
                   help="YAML list of the Ray clusters jobs may name (name, address, tokenSecret in the operator's "
                        "namespace, allowInsecure; `default:` for jobs that name none); any other cluster or address "
                        "is refused (default $MEDDISTILL_RAY_CLUSTERS; none: every job uses KubeRay)")
    p.set_defaults(func=run)


def _load_kube_config(kubeconfig: str | None) -> None:
    from kubernetes import config
    from kubernetes.config import kube_config

    if kubeconfig:
        os.environ["KUBECONFIG"] = kubeconfig  # for anything started from here that reads it
        # kopf logs in with `config.load_kube_config()`, whose default path the kubernetes client fixed
        # from $KUBECONFIG when it was imported (before this flag was parsed): point that default here.
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = kubeconfig
        config.load_kube_config(config_file=kubeconfig)
        return
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def _operator_namespace() -> str:
    """Where the Ray clusters' token Secrets are: the operator's own namespace."""
    if os.environ.get("MEDDISTILL_OPERATOR_NAMESPACE"):
        return os.environ["MEDDISTILL_OPERATOR_NAMESPACE"]
    try:
        return Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
    except OSError:
        return "default"


def run(args) -> int:
    import kopf
    import yaml
    from prometheus_client import start_http_server

    from meddistill.operator import handlers  # registers the kopf handlers
    from meddistill.operator.backends import ray_clusters

    log = logging.getLogger("meddistill.operator")
    if not log.isEnabledFor(logging.DEBUG):
        # kopf logs every handler call and aiohttp every probe: keep our transitions readable.
        for noisy in ("kopf.objects", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    _load_kube_config(args.kubeconfig)
    handlers.Config.namespace = args.namespace
    handlers.Config.resync_seconds = args.resync_seconds
    # Equal priorities would pause every replica (kopf's rule): a random one unless told.
    priority = args.peering_priority if args.peering_priority is not None else random.randint(1, 2**31 - 1)
    handlers.Config.peering, handlers.Config.peering_priority = args.peering, priority
    handlers.Config.peering_lifetime = args.peering_lifetime
    allowed = ray_clusters.AllowedClusters()
    if args.ray_clusters:
        try:
            allowed = ray_clusters.load(args.ray_clusters, _operator_namespace())
        except (OSError, ValueError, yaml.YAMLError) as e:  # pydantic's ValidationError is a ValueError
            log.error("--ray-clusters %s: %s", args.ray_clusters, e)
            return 2
    ray_clusters.configure(allowed)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    scope = f"namespace {args.namespace}" if args.namespace else "all namespaces"
    log.info("meddistill operator starting: watching %s; metrics :%s/metrics; health :%s/healthz; backend %s",
             scope, args.metrics_port or "off", args.health_port,
             f"KubeRay or the Ray clusters {[c.name for c in allowed.clusters]} (default {allowed.default or 'KubeRay'})"
             if allowed.clusters else "KubeRay")
    kopf.run(
        standalone=not args.peering,
        peering_name=args.peering or None,
        priority=priority,
        namespaces=[args.namespace] if args.namespace else [],
        clusterwide=not args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    return 0
