"""`serving.replaces: OTHER_JOB`: a job takes over another job's serving app, in place.

Pure, like planner.py. The new job's backend observes OTHER_JOB's app as the job's own serving app
(same name, same endpoint); each app records the job that serves it (`ServingApp.owner`, "ns/name").
- The new job leaves the app alone until its own model is evaluated, passed its gate and verifies;
  then the planner's ordinary in-place update points the app at the new model and records the new
  owner: Ray Serve starts the new replicas before it stops the old ones, so no request fails.
- OTHER_JOB sees an app owned by another job: condition `Replaced` naming it, and it never updates
  or deletes that app again (no fight over the model); deleting OTHER_JOB leaves the app, whose
  garbage collection now follows its owner.
- Refused with condition `Replaces` False (the job then serves nothing): a job naming itself, an app
  that does not exist (OTHER_JOB missing, in another namespace, or not serving), an app a third job
  took over, and a backend that cannot move an app's ownership (KubeRay: a RayService's owner
  reference is its job's, and the garbage collector would delete it with that job).
"""
from __future__ import annotations

from dataclasses import dataclass

from meddistill.spec.models import MedDistillJob

REPLACED = "Replaced"  # on the job whose app another job took over
REPLACES = "Replaces"  # on the job that takes over (serving.replaces)


@dataclass(frozen=True)
class Takeover:
    serves: bool = True  # False: this job must not deploy (its app is another job's, or a refused replaces)
    condition: tuple[str, str, str] | None = None  # (status, reason, message) of the condition type_
    type_: str = ""
    event: tuple[str, str, str] | None = None  # (type, reason, message), once per change


def job_key(job: MedDistillJob) -> str:
    return f"{job.metadata.namespace or 'default'}/{job.metadata.name}"


def owns(job: MedDistillJob, owner: str) -> bool:
    """An app with no recorded owner (KubeRay, older apps) is its namesake's."""
    return owner in ("", job_key(job))


def decide(job: MedDistillJob, owner: str | None, supported: bool, previous: dict[str, str]) -> Takeover:
    """owner: the observed app's owner ("ns/name"; None: no app); supported: the backend can move an app's
    ownership; previous: the condition messages by type in the last status (events once per change)."""
    me, target = job_key(job), job.spec.serving.replaces
    if owner is not None and not owns(job, owner) and not target:
        message = (f"{owner} took over this job's serving app (its spec.serving.replaces); this job no longer "
                   f"updates or deletes it, and deleting this job leaves it serving")
        return _with_event(Takeover(False, ("True", "ReplacedBy", message), REPLACED), "Normal", previous)
    if not target:
        return Takeover()
    ns = me.split("/")[0]
    fix = "remove spec.serving.replaces to serve under this job's own name"
    if target == job.metadata.name:
        why = f"spec.serving.replaces names this job itself ({target!r}): name another MedDistillJob in {ns}, or {fix}"
    elif not supported:
        why = (f"spec.serving.replaces {target!r}: this backend (KubeRay) cannot move a RayService to another job "
               f"(its owner reference would delete it with {target}); run both jobs on a Ray cluster (spec.ray), or {fix}")
    elif owner is None:
        why = (f"spec.serving.replaces {target!r}: no serving app of MedDistillJob {ns}/{target} on this Ray cluster "
               f"(the job does not exist in namespace {ns}, serves nothing, or runs elsewhere): {fix}")
    elif owner not in (f"{ns}/{target}", me, ""):
        why = f"spec.serving.replaces {target!r}: its serving app was taken over by {owner} already: {fix}"
    elif owner == me:
        return Takeover(True, ("True", "TookOver", f"serves in place of {ns}/{target} (same app, same endpoint)"), REPLACES)
    else:
        return Takeover(True, ("Unknown", "AwaitingModel", f"{ns}/{target} keeps serving until this job's model is "
                               "evaluated, has passed its gate and verifies; then this job takes its app over in place"),
                        REPLACES)
    return _with_event(Takeover(False, ("False", "Refused", why), REPLACES), "Warning", previous)


def _with_event(t: Takeover, kind: str, previous: dict[str, str]) -> Takeover:
    _, reason, message = t.condition
    if previous.get(t.type_) == message:
        return t
    return Takeover(t.serves, t.condition, t.type_, (kind, f"{t.type_}{reason}" if t.type_ == REPLACES else reason, message))
