"""What every stage shares: the job it runs for, where its artifact goes, and how it is run.

`run_stage(ctx, stage)` is the single code path behind `python -m meddistill.jobs STAGE` and
`meddistill run`: connect to Ray, call the stage recipe's `run(ctx, out_dir)`, write the manifest
last (with the stage's fingerprint), publish (s3), and return a StageResult whose JSON is the
entrypoint's final line. `existing_result` skips a stage only when its artifact verifies AND its
fingerprint (DEPENDS_ON below) still matches the spec and its inputs' current digests.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from meddistill.artifacts import PROGRESS, ArtifactStore, job_dir, read_manifest, sha256_json, stage_uri, verify, write_manifest
from meddistill.jobs import storage
from meddistill.spec.models import STAGES, MedDistillJob, pipeline_stages

log = logging.getLogger(__name__)

RESULT_PREFIX = "MEDDISTILL_STAGE_RESULT"
RECIPES = {  # stage -> module under meddistill.jobs exposing run(ctx, out_dir) -> StageOutput
    "teacher": "teacher",
    "distill-data": "distill_data",
    "distill": "distill",
    "quantize": "quantize",
    "evaluate": "evaluate",
}

# What each stage's artifact is a function of: spec sections (camelCase paths under spec) and the
# stages whose artifacts it reads. A change to any of them makes the artifact stale; a stale stage
# re-runs, gets a new digest, and so every stage reading it re-runs too.
DEPENDS_ON: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    #  stage          spec sections                                            input stages
    "teacher":      (("teacher", "evaluation.datasets"),                       ()),  # eval sets: decontamination
    "distill-data": (("distillation.mode", "distillation.temperature", "distillation.topK",  # not alpha: it
                      "distillation.teacherCache", "distillation.maxNewTokens",  # weighs the loss, the cache
                      "distillation.similarityThreshold",                       # stays valid (ablations reuse it)
                      "student.training.maxSamples", "student.training.maxSeqLength",
                      "student.training.seed", "teacher.promptStyle"),         ("teacher",)),
    "distill":      (("student", "distillation"),                              ("teacher", "distill-data")),
    "quantize":     (("quantization",),                                        ("distill",)),
    "evaluate":     (("evaluation",),                                          ("teacher", "distill", "quantize")),
}


class StageError(RuntimeError):
    """A stage cannot run; the message names the field/artifact and the fix."""


@dataclass
class StageOutput:
    """What a recipe returns: recorded in the manifest."""

    config: dict
    metrics: dict = field(default_factory=dict)
    data_digest: str = ""


@dataclass
class StageResult:
    stage: str
    artifact_uri: str
    digest: str
    metrics: dict = field(default_factory=dict)
    wall_s: float = 0.0
    skipped: bool = False

    def result_line(self) -> str:
        payload = {"stage": self.stage, "artifact_uri": self.artifact_uri, "digest": self.digest}
        return f"{RESULT_PREFIX} {json.dumps(payload)}"


@dataclass
class StageContext:
    """A job plus the folder its dataset paths are relative to (the spec file's folder)."""

    job: MedDistillJob
    base_dir: Path | None = None

    @property
    def spec(self):
        return self.job.spec

    @property
    def name(self) -> str:
        return self.job.metadata.name

    def uri(self, stage: str) -> str:
        return stage_uri(self.spec.artifacts.uri, job_dir(self.job.metadata), stage)

    def output_dir(self, stage: str) -> Path:
        return ArtifactStore(self.uri(stage)).working_dir()

    def input_dir(self, stage: str) -> Path:
        """A verified artifact of an earlier stage, or StageError saying how to make it."""
        directory = ArtifactStore(self.uri(stage)).fetch()
        if directory is None or verify(directory) is None:
            raise self._missing(stage)
        return directory

    def input_uri(self, stage: str) -> str:
        """The URI of an earlier stage's finished artifact (its manifest is there), for Ray tasks
        that fetch and verify it on their own node (storage.fetch_input): the driver downloads no
        weights it does not read."""
        if ArtifactStore(self.uri(stage)).fetch(only=()) is None:
            raise self._missing(stage)
        return self.uri(stage)

    def _missing(self, stage: str) -> StageError:
        return StageError(
            f"stage {stage!r} has no verified artifact at {self.uri(stage)} (spec.artifacts.uri="
            f"{self.spec.artifacts.uri!r}); run that stage first: meddistill run FILE --stage {stage}"
        )


def load_job_document(text: str) -> MedDistillJob:
    """A MedDistillJob from JSON or YAML text (the MEDDISTILL_JOB env var or a --job file)."""
    import yaml

    from meddistill.spec.load import SpecValidationError, validate_document

    job, errors = validate_document(yaml.safe_load(text), "MEDDISTILL_JOB")
    if errors:
        raise SpecValidationError(errors)
    return job


def connect_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Join the given cluster, else a running one (`auto`), else start a local one.

    log_to_driver=False keeps the workers' and Ray's own actors' output out of this process's
    terminal (it stays in Ray's session logs); `meddistill run` uses it unless --verbose.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    try:
        ray.init(address="auto", log_to_driver=log_to_driver)
    except ConnectionError:
        ray.init(include_dashboard=False, log_to_driver=log_to_driver)


def run_recipe_keeping_sigint(recipe, ctx: StageContext, out: Path) -> StageOutput:
    """recipe.run(ctx, out), then the SIGINT handler the driver had before.

    Ray Train V2's trainer.fit() installs its own SIGINT handler (Ctrl-C aborts the training run)
    and never restores it: after fit() returns, Ctrl-C only sends `abort` to its finished
    controller, so a later `meddistill run` serving loop would never see KeyboardInterrupt.
    """
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return recipe.run(ctx, out)
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def spec_fingerprint(ctx: StageContext, stage: str) -> dict[str, str]:
    """sha256 of each spec section the stage depends on, keyed by its path (`spec.distillation`)."""
    spec = ctx.spec.model_dump(mode="json", by_alias=True)
    hashes = {}
    for path in DEPENDS_ON[stage][0]:
        value = spec
        for key in path.split("."):
            if not isinstance(value, dict) or key not in value:  # a DEPENDS_ON typo must not hash None forever
                raise KeyError(f"DEPENDS_ON[{stage!r}]: spec.{path} is not a spec field (camelCase path)")
            value = value[key]
        hashes[f"spec.{path}"] = sha256_json(value)
    return hashes


def input_digests(ctx: StageContext, stage: str) -> dict[str, str]:
    """The current artifact digest of each input stage of this job ("" where there is none yet)."""
    digests = {}
    for name in DEPENDS_ON[stage][1]:
        if name not in pipeline_stages(ctx.spec):
            continue  # distill-data exists only with teacherCache: cached
        directory = ArtifactStore(ctx.uri(name)).fetch(only=())
        manifest = read_manifest(directory) if directory is not None else None
        digests[name] = manifest.digest if manifest is not None else ""
    return digests


def why_stale(ctx: StageContext, stage: str, manifest) -> str | None:
    """Why an artifact that verifies no longer matches the spec or its inputs; None when it does."""
    if not manifest.fingerprint:
        return "its artifact predates stage fingerprints"
    now = spec_fingerprint(ctx, stage)
    changed = [path for path in now if manifest.fingerprint.get(path) != now[path]]
    if changed:
        return f"{', '.join(changed)} changed since the artifact was made"
    inputs = input_digests(ctx, stage)
    changed = [name for name in inputs if manifest.inputs.get(name) != inputs[name]]
    if changed:
        return f"input {', '.join(changed)} changed since the artifact was made"
    return None


def check_existing(ctx: StageContext, stage: str) -> tuple[StageResult | None, str]:
    """(the finished result to reuse, "") or (None, why the stage must run)."""
    directory = ArtifactStore(ctx.uri(stage)).fetch()
    if directory is None:
        return None, "no artifact yet"
    manifest = verify(directory)
    if manifest is None:
        return None, "its artifact is incomplete or its files changed"
    reason = why_stale(ctx, stage, manifest)
    if reason:
        return None, reason
    return StageResult(stage, ctx.uri(stage), manifest.digest, manifest.metrics, skipped=True), ""


def existing_result(ctx: StageContext, stage: str) -> StageResult | None:
    """The result of a stage whose artifact verifies and is up to date (so a re-run can skip it)."""
    return check_existing(ctx, stage)[0]


def run_stage(ctx: StageContext, stage: str, ray_address: str | None = None) -> StageResult:
    """Run one stage's recipe and write its artifact + manifest."""
    if stage not in STAGES:
        raise StageError(f"stage {stage!r} is unknown; use one of {', '.join(STAGES)}")
    if stage not in pipeline_stages(ctx.spec):
        raise StageError(
            f"stage {stage!r} is not part of this job: spec.distillation.teacherCache="
            f"{ctx.spec.distillation.teacher_cache!r} (distill-data runs only with teacherCache: cached)"
        )
    connect_ray(ray_address)
    inputs = input_digests(ctx, stage)  # before running: the artifacts the recipe is about to read
    store = ArtifactStore(ctx.uri(stage))
    out = store.working_dir()
    if store.local is not None:  # several nodes write here: it must be one filesystem for all of them
        try:  # checked before anything is removed: a refused run must leave a finished artifact intact
            storage.require_shared_filesystem(out, "spec.artifacts.uri", ctx.spec.artifacts.uri)
        except storage.SharedFilesystemError as e:
            raise StageError(str(e)) from None
    (out / "manifest.json").unlink(missing_ok=True)  # a re-run is incomplete until it writes a new one
    (out / PROGRESS).unlink(missing_ok=True)  # an interrupted run's steps are not this run's
    started = time.time()
    recipe = importlib.import_module(f"meddistill.jobs.{RECIPES[stage]}")
    with storage.stage_scope(store.uri) as scope:  # training helpers upload/checkpoint under this URI
        output: StageOutput = run_recipe_keeping_sigint(recipe, ctx, out)
    wall = time.time() - started
    metrics = {**output.metrics, "wall_s": round(wall, 2)}
    manifest = write_manifest(out, stage=stage, config=output.config, data_digest=output.data_digest, metrics=metrics,
                              fingerprint=spec_fingerprint(ctx, stage), inputs=inputs)
    storage.publish(store, out, scope.uploaded)  # files rank 0 already uploaded are not sent again
    if scope.on_s3:
        storage.delete_checkpoints(store.uri)  # the artifact supersedes them; a re-run starts fresh
    log.info("stage %s done in %.1fs: %s", stage, wall, store.uri)
    return StageResult(stage, store.uri, manifest.digest, metrics, wall)

