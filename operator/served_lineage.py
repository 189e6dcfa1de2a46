"""Re-hash the chain of the artifact about to be served (the handlers' side of serving_gate.py).

Filesystem stores (a local path, or pvc://, the job's namespace's claim that the chart mounts read-only
into the operator, stage_artifacts.operator_dir):
the operator re-hashes the quantize and evaluate artifacts against their manifests and checks each
recorded input digest against the upstream manifest (meddistill/lineage.py, the same check as
`meddistill verify`). A 4 GB student takes seconds to hash, and the operator reconciles every resync,
so a verdict is kept while no file under those folders changed size, mtime or inode.

s3:// stores: the operator never downloads weights. It fetches the manifests and checks the link that
ties the served weights to their evaluation (evaluate's recorded quantize digest); each serving
replica re-hashes the weights against quantize/manifest.json when it loads them
(serve/model_source.py) and refuses a mismatch.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

from meddistill import artifacts
from meddistill.artifacts import MANIFEST, sha256_file
from meddistill.lineage import CARD_STAGE, verify_job
from meddistill.spec.models import STAGES, MedDistillJob

from .planner import Observed
from .serving_gate import ServedLineage
from .stage_artifacts import confined, operator_dir

SERVED = ("quantize", "evaluate")  # the weights served and the stage that evaluated them
CARD_MD = "README.md"  # jobs/model_card.py (not imported: it pulls the data loaders)

_cache: dict[str, tuple[tuple, ServedLineage]] = {}
_cache_lock = threading.Lock()


def check(job: MedDistillJob, observed: Observed) -> ServedLineage | None:
    """The served chain's verdict once the evaluate stage succeeded; None before."""
    recorded = any(s.name == CARD_STAGE and s.state == "Succeeded" for s in (job.status.stages if job.status else []))
    if not recorded and not any(r.stage == CARD_STAGE and r.artifact is not None for r in observed.runs):
        return None
    root_uri = f"{job.spec.artifacts.uri.rstrip('/')}/{artifacts.job_dir(job.metadata)}"
    card = f"{artifacts.stage_uri(job.spec.artifacts.uri, artifacts.job_dir(job.metadata), CARD_STAGE)}/{CARD_MD}"
    job_dir = operator_dir(job, root_uri)
    if job_dir is None:
        return _check_object_store(job, card)
    for s in STAGES:  # a stage folder or manifest that is a link out of the job's folder blocks
        confined(job_dir, job_dir / s / MANIFEST, root_uri)
    if not (job_dir / CARD_STAGE / MANIFEST).is_file():
        return None
    signature = _signature(job_dir)
    with _cache_lock:
        cached = _cache.get(str(job_dir))
    if cached and cached[0] == signature:
        return cached[1]
    checks = verify_job(job_dir, only=SERVED)
    problems = tuple(p for c in checks for p in c.problems)
    files = sum(c.files for c in checks)
    result = ServedLineage(
        verified=not problems, problems=problems,
        note=f"{' and '.join(SERVED)} re-hashed ({files} files) against their manifests; input links checked",
        model_card=card if _card_listed(job_dir) else "")
    with _cache_lock:
        _cache[str(job_dir)] = (signature, result)
    return result


def _signature(job_dir: Path) -> tuple:
    """Size, mtime and inode of every file the check reads: a rewritten byte moves the mtime."""
    paths = [p for s in SERVED for p in (job_dir / s).rglob("*")] + list(job_dir.glob(f"*/{MANIFEST}"))
    out = []
    for p in sorted(set(paths)):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            out.append((str(p), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _card_listed(job_dir: Path) -> bool:
    manifest = json.loads((job_dir / CARD_STAGE / MANIFEST).read_text())
    return CARD_MD in manifest.get("files", {})


def _check_object_store(job: MedDistillJob, card: str) -> ServedLineage | None:
    fetched = {s: artifacts.ArtifactStore(artifacts.stage_uri(job.spec.artifacts.uri, artifacts.job_dir(job.metadata), s)).fetch(only=set())
               for s in SERVED}
    if fetched["evaluate"] is None or fetched["quantize"] is None:
        return None
    evaluated = json.loads((fetched["evaluate"] / MANIFEST).read_text())
    recorded = evaluated.get("inputs", {}).get("quantize", "")
    actual = sha256_file(fetched["quantize"] / MANIFEST)
    note = ("object store: the operator compared manifests only (it never downloads weights); each serving replica "
            "re-hashes the weights against quantize/manifest.json when it loads them")
    card = card if CARD_MD in evaluated.get("files", {}) else ""
    if recorded and recorded != actual:
        return ServedLineage(False, (f"input quantize: quantize/{MANIFEST} is sha256 {actual[:16]}, the evaluate stage "
                                     f"evaluated {recorded[:16]} (the quantize artifact changed or was re-run afterwards)",),
                             note, card)
    return ServedLineage(None, (), note, card)
