"""`meddistill operator`: run the Kubernetes operator (kopf) that drives MedDistillJobs."""

from __future__ import annotations

import logging
import os


def register(subparsers, summary: str) -> None:
    p = subparsers.add_parser(
        "operator",
        help=summary,
        description="Watch MedDistillJobs and run each stage as a KubeRay RayJob, then serve the quantized "
        "student with a RayService (needs KubeRay's CRDs in the cluster). A job with spec.ray.address (or every "
        "job, with --ray-address) runs on that existing Ray cluster instead: stages through the Ray Jobs API, "
        "serving as a Ray Serve app.",
    )
    p.add_argument("--namespace", "-n", help="watch only this namespace (default: all namespaces)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config, else $KUBECONFIG / ~/.kube/config)")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0 disables; default 8080)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness endpoint /healthz port (default 8081)")
    p.add_argument("--resync-seconds", type=float, default=30.0, help="re-plan every job this often as a backstop")
    p.add_argument("--ray-address", default=os.environ.get("MEDDISTILL_RAY_ADDRESS", ""),
                   help="Ray dashboard URL (http://head:8265) for jobs whose spec.ray.address is empty "
                        "(default $MEDDISTILL_RAY_ADDRESS; empty: such jobs use KubeRay)")
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


def run(args) -> int:
    import kopf
    from prometheus_client import start_http_server

    from meddistill.operator import handlers  # registers the kopf handlers

    log = logging.getLogger("meddistill.operator")
    if not log.isEnabledFor(logging.DEBUG):
        # kopf logs every handler call and aiohttp every probe: keep our transitions readable.
        for noisy in ("kopf.objects", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    _load_kube_config(args.kubeconfig)
    handlers.Config.namespace = args.namespace
    handlers.Config.resync_seconds = args.resync_seconds
    if args.ray_address and not args.ray_address.startswith(("http://", "https://")):
        log.error("--ray-address %r: give the Ray dashboard URL, e.g. http://head:8265", args.ray_address)
        return 2
    handlers.Config.ray_address = args.ray_address
    if args.metrics_port:
        start_http_server(args.metrics_port)
    scope = f"namespace {args.namespace}" if args.namespace else "all namespaces"
    log.info("meddistill operator starting: watching %s; metrics :%s/metrics; health :%s/healthz; backend %s",
             scope, args.metrics_port or "off", args.health_port,
             f"Ray cluster {args.ray_address}" if args.ray_address else "KubeRay (or each job's spec.ray.address)")
    kopf.run(
        standalone=True,
        namespaces=[args.namespace] if args.namespace else [],
        clusterwide=not args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz",
    )
    return 0
