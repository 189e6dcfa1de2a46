"""What the operator reads of a finished stage's artifact: its manifest digest (and evaluate's results).

The same for every backend: the store is spec.artifacts.uri, not where the stage ran. Only the
manifest (and the results table) is fetched, never a stage's model weights. A store that cannot
be read (403, outage) is ArtifactStoreUnavailable, never "no manifest": that would, after the
planner's grace period, re-run a stage that succeeded.
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


def read_artifact(job: MedDistillJob, stage: str) -> ArtifactRecord | None:
    """The stage's manifest (and results.json for evaluate) through the artifact store."""
    uri = artifacts.stage_uri(job.spec.artifacts.uri, artifacts.job_dir(job.metadata), stage)
    directory = artifacts.ArtifactStore(uri).fetch(only={"results.json"} if stage == "evaluate" else set())
    if directory is None:
        return None
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
    recorded = {s.name for s in (job.status.stages if job.status else []) if s.state == "Succeeded" and s.artifact_digest}
    runs = tuple(replace(r, artifact=read_artifact(job, r.stage)) if r.state == "Succeeded" and r.stage not in recorded
                 else r for r in observed.runs)
    return replace(observed, runs=runs)
