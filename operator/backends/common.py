"""What every backend gives a stage the same way: the entrypoint, the job document, the keys that
tie a child to its MedDistillJob. What a stage reserves lives next door in ../sizing.py.

Both backends run the *same* command with the *same* document, the one `meddistill run` runs
in-process, so a stage cannot tell (and must not care) where it runs.
"""

from __future__ import annotations

import json

from meddistill.spec.models import MedDistillJob

# Labels on KubeRay children, metadata on Ray Jobs API submissions: the same keys.
JOB_KEY, UID_KEY = "meddistill.io/job", "meddistill.io/uid"
STAGE_KEY, ATTEMPT_KEY = "meddistill.io/stage", "meddistill.io/attempt"


def stage_entrypoint(stage: str) -> str:
    return f"python -m meddistill.jobs {stage}"


def job_document(job: MedDistillJob) -> str:
    """The MedDistillJob as the stage entrypoint reads it from MEDDISTILL_JOB (no status)."""
    doc = job.model_dump(by_alias=True, mode="json", exclude={"status"}, exclude_none=True)
    # The uid places the artifacts (artifacts.job_dir): a stage of a re-created job must not find the old one's.
    meta = {"name": job.metadata.name, "namespace": job.metadata.namespace, "uid": getattr(job.metadata, "uid", None)}
    doc["metadata"] = {k: v for k, v in meta.items() if v}
    return json.dumps(doc, sort_keys=True)
