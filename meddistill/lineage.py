"""Lineage you can verify: re-hash a job's artifacts against their manifests, link by link.

A job directory (`<spec.artifacts.uri>/<job name>/`) holds one folder per stage, each with a
manifest.json (meddistill/artifacts.py) that records the sha256 of every file and, under `inputs`,
the manifest digest of each upstream stage when it ran. The chain from data to served weights
holds when, for every stage:
  - each file the manifest lists exists with its recorded sha256, and no file was added after it;
  - each recorded input digest equals the sha256 of that upstream stage's manifest.json now;
and the datasets and base model the model card recorded (jobs/model_card.py, in the evaluate
artifact, itself covered by evaluate's manifest) still hash the same where they are local.

`verify_job(job_dir)` returns one StageCheck per stage; `meddistill verify JOB_DIR` prints them.
The operator can call the same function on the mounted store before serving and refuse a job whose
checks are not all ok (torch-free: only hashing and JSON).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from meddistill.artifacts import MANIFEST, PROGRESS, sha256_file, sha256_json
from meddistill.spec.models import STAGES

CARD_JSON = "model_card.json"
CARD_STAGE = "evaluate"  # the stage whose artifact holds the model card


@dataclass
class StageCheck:
    """The verdict for one stage (or for the card's `sources`: datasets and base model)."""

    stage: str
    digest: str = ""  # sha256 of its manifest.json
    files: int = 0  # files re-hashed
    problems: list[str] = field(default_factory=list)  # each names the file or input that does not match
    notes: list[str] = field(default_factory=list)  # what could not be checked here, and why

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        head = f"{self.stage:<13} {'OK' if self.ok else 'MISMATCH':<8}"
        if self.problems:
            return f"{head} " + "; ".join(self.problems)
        detail = f"{self.files} files" + (f", manifest sha256 {self.digest[:16]}" if self.digest else "")
        return f"{head} {detail}" + ("".join(f"; {n}" for n in self.notes))


def hash_tree(path: Path) -> dict[str, str]:
    """sha256 of a file ({name: sha}) or of every file under a folder ({relative path: sha})."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def tree_digest(files: dict[str, str]) -> str:
    """One digest for a set of files (a model folder): sha256 of the sorted {path: sha256} map."""
    return sha256_json(files)


def check_stage(stage_dir: Path, stage: str, job_dir: Path) -> StageCheck:
    """Re-hash one stage's files against its manifest and its inputs against the upstream manifests."""
    check = StageCheck(stage)
    manifest_path = stage_dir / MANIFEST
    if not manifest_path.is_file():
        check.problems.append(f"{stage}/{MANIFEST}: missing (the stage never finished)")
        return check
    manifest = json.loads(manifest_path.read_text())
    check.digest = sha256_file(manifest_path)
    listed = manifest.get("files", {})
    for rel, recorded in listed.items():
        path = stage_dir / rel
        if not path.is_file():
            check.problems.append(f"{stage}/{rel}: missing")
            continue
        actual = sha256_file(path)
        check.files += 1
        if actual != recorded:
            check.problems.append(f"{stage}/{rel}: sha256 {actual[:16]}, manifest records {recorded[:16]}")
    # A file added after the manifest is loaded too (a serving replica reads the whole folder).
    for path in sorted(stage_dir.rglob("*")):
        rel = str(path.relative_to(stage_dir))
        if path.is_file() and rel not in listed and path.name not in (MANIFEST, PROGRESS):
            check.problems.append(f"{stage}/{rel}: not in the manifest (added after the stage finished)")
    for name, recorded in manifest.get("inputs", {}).items():
        upstream = job_dir / name / MANIFEST
        if not upstream.is_file():
            check.problems.append(f"input {name}: {name}/{MANIFEST} is missing (recorded {recorded[:16]})")
            continue
        actual = sha256_file(upstream)
        if actual != recorded:
            check.problems.append(f"input {name}: {name}/{MANIFEST} is sha256 {actual[:16]}, this manifest was built "
                                  f"from {recorded[:16]} (the {name} artifact changed or was re-run afterwards)")
    return check


def check_sources(card: dict) -> StageCheck:
    """The datasets and base model the card recorded, re-hashed where they are on this machine."""
    check = StageCheck("sources")
    entries = [(f"dataset {d['ref']}", d.get("path", ""), d.get("files", {})) for d in card.get("datasets", [])]
    base = card.get("models", {}).get("base", {})
    if base.get("path") and base.get("files"):
        entries.append((f"base model {base.get('source', '')}", base["path"], base["files"]))
    for label, path, files in entries:
        root = Path(path) if path else None
        if root is None or not root.exists():
            check.notes.append(f"{label}: not checked ({path or 'no local path'} is not on this machine)")
            continue
        for rel, recorded in files.items():
            file = root if root.is_file() else root / rel
            if not file.is_file():
                check.problems.append(f"{label}: {file} is missing")
                continue
            check.files += 1
            actual = sha256_file(file)
            if actual != recorded:
                check.problems.append(f"{label}: {file} is sha256 {actual[:16]}, the model card records {recorded[:16]}")
        if root.is_dir():
            added = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            extra = [rel for rel in added if rel not in files]
            if extra:
                check.problems.append(f"{label}: {root / extra[0]} was added after the model card was written")
    return check


def verify_job(job_dir: str | Path, only: tuple[str, ...] | None = None) -> list[StageCheck]:
    """One check per stage present in `job_dir`, in pipeline order, then the card's `sources`.

    only: the stages (and/or "sources") to re-hash, e.g. ("quantize", "evaluate") for a check before
    serving that skips re-reading a 140 GB teacher; their input links are still checked against the
    upstream manifests (cheap). None checks everything.
    """
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        raise FileNotFoundError(f"{job_dir}: no such job directory (expected <spec.artifacts.uri>/<job name>)")
    wanted = set(only) if only is not None else set(STAGES) | {"sources"}
    stages = [s for s in STAGES if (job_dir / s).is_dir()]
    checks = [check_stage(job_dir / s, s, job_dir) for s in stages if s in wanted]
    referenced = set()
    for s in stages:
        if (job_dir / s / MANIFEST).is_file():
            referenced |= set(json.loads((job_dir / s / MANIFEST).read_text()).get("inputs", {}))
    for s in STAGES:
        if s in referenced and s not in stages and s in wanted:
            checks.append(StageCheck(s, problems=[f"{s}/: missing, yet a later stage was built from it"]))
    card = job_dir / CARD_STAGE / CARD_JSON
    card_verified = CARD_STAGE in wanted and all(c.ok for c in checks if c.stage == CARD_STAGE)
    if "sources" in wanted and card.is_file() and card_verified:  # only a card its manifest vouches for
        checks.append(check_sources(json.loads(card.read_text())))
    return checks
