"""What the operator reads of a finished stage's artifact: its manifest digest (and evaluate's results).

The same for every backend: the store is spec.artifacts.uri, not where the stage ran. Only the
manifest (and the results table) is fetched, never a stage's model weights. A store that cannot
be read (403, outage) is ArtifactStoreUnavailable, never "no manifest": that would, after the
planner's grace period, re-run a stage that succeeded.

A pvc:// store is read through the job's own namespace's claim (operator_dir): the operator serves
many namespaces, and a same-named claim of another one is other storage than the job's pods write.
Every claim is mounted under one folder in the operator's pod, so a symlink a tenant plants in its
own claim (a stage folder, or manifest.json itself) could point at another tenant's files: what the
operator reads must resolve inside the job's claim (`confined`), or the job is blocked.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from meddistill import artifacts
from meddistill.spec.models import MedDistillJob

from .failures import ARTIFACT_STORE_UNAVAILABLE, ReconcileBlocked
from .planner import ArtifactRecord, Observed


def operator_dir(job: MedDistillJob, uri: str) -> Path | None:
    """Where the operator reads `uri` (the job's store or a folder in it); None for s3://.

    Every operator read of a store goes through here. pvc://CLAIM is the job's namespace's claim,
    which the chart mounts for the operator at $MEDDISTILL_PVC_ROOT/<namespace>/<claim>
    (artifactClaims); one not mounted for that namespace blocks the job: reading a same-named claim
    of another namespace would judge other storage than the job's pods write.
    """
    namespace = job.metadata.namespace or "default"
    if uri.startswith("pvc://"):
        claim = uri[len("pvc://"):].partition("/")[0]
        mount = artifacts.local_path(f"pvc://{claim}", namespace=namespace)
        if not mount.is_dir():
            raise ReconcileBlocked(
                f"spec.artifacts.uri {job.spec.artifacts.uri}: the operator has no mount of claim {claim} of "
                f"namespace {namespace} ({mount}), and it never reads a same-named claim of another namespace; "
                f"fix: add {{namespace: {namespace}, claim: {claim}, operatorClaim: <a claim in the operator's "
                "namespace bound to the same storage>} to the operator chart's artifactClaims",
                ARTIFACT_STORE_UNAVAILABLE)
        path = artifacts.local_path(uri, namespace=namespace)
        confined(mount, path, uri)
        return path
    path = artifacts.local_path(uri, namespace=namespace)
    # A plain path (the Ray-cluster backend's shared folder) that lands among the claims the operator
    # mounts for every namespace would read another tenant's artifacts by name: only pvc:// goes there.
    if path is not None and path.resolve().is_relative_to(artifacts.pvc_root().resolve()):
        raise ReconcileBlocked(
            f"spec.artifacts.uri {job.spec.artifacts.uri}: a plain path under {artifacts.pvc_root()} (where the "
            "operator mounts the claims of every namespace) is refused; name the job's own claim instead: "
            "pvc://CLAIM/PATH", ARTIFACT_STORE_UNAVAILABLE)
    return path


def confined(root: Path, path: Path, uri: str) -> None:
    """Block the job unless `path` (under root) resolves inside root, symlinks followed; the message
    does not say where the link points."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise ReconcileBlocked(
            f"{uri}: a symlink on the claim leads out of it (at {Path(path).relative_to(root)}); the operator reads "
            "only the job's own claim: replace the link with the folder or file itself", ARTIFACT_STORE_UNAVAILABLE)


def read_artifact(job: MedDistillJob, stage: str) -> ArtifactRecord | None:
    """The stage's manifest (and results.json for evaluate) through the artifact store."""
    uri = artifacts.stage_uri(job.spec.artifacts.uri, artifacts.job_dir(job.metadata), stage)
    local = operator_dir(job, uri)
    store = artifacts.ArtifactStore(str(local) if local else uri)
    directory = store.fetch(only={"results.json"} if stage == "evaluate" else set())
    if directory is None:
        return None
    if local is not None:  # the files read, not only their folder, stay inside it
        for name in (artifacts.MANIFEST, "results.json") if stage == "evaluate" else (artifacts.MANIFEST,):
            confined(Path(directory), Path(directory) / name, uri)
    manifest = artifacts.read_manifest(directory)
    if manifest is None:
        return None
    results = None
    if stage == "evaluate":
        path = Path(directory) / "results.json"
        if not path.is_file():
            return None  # the evaluate artifact is not complete without its table
        results = json.loads(path.read_text())
    return ArtifactRecord(uri=uri, digest=manifest.digest, results=results)


@contextmanager
def readable_store():
    """Everything the reconcile reads from the store (manifests, results, the served lineage) under one
    rule: a store that cannot be read blocks the reconcile with a condition; it is never 'no artifact'."""
    try:
        yield
    except artifacts.ArtifactStoreUnavailable as e:
        raise ReconcileBlocked(f"the artifact store cannot be read: {e}", ARTIFACT_STORE_UNAVAILABLE) from None


def with_artifacts(job: MedDistillJob, observed: Observed) -> Observed:
    """Succeeded runs with their artifact read (once: a stage recorded with its digest is not re-read)."""
    operator_dir(job, job.spec.artifacts.uri)  # an unmounted claim blocks before any stage is submitted
    recorded = {s.name for s in (job.status.stages if job.status else []) if s.state == "Succeeded" and s.artifact_digest}
    runs = tuple(replace(r, artifact=read_artifact(job, r.stage)) if r.state == "Succeeded" and r.stage not in recorded
                 else r for r in observed.runs)
    return replace(observed, runs=runs)
