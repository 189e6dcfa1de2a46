"""Read MedDistillJob YAML files and turn validation failures into errors a person can act on.

Every error names the field path (as written in YAML: `spec.serving.minReplicas`), the value
that was given, and what is allowed. A file may hold several documents (`---`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .models import MedDistillJob


@dataclass(frozen=True)
class SpecError:
    source: str  # file[#document]
    path: str  # spec.serving.minReplicas
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.path}: {self.message}"


class SpecValidationError(ValueError):
    def __init__(self, errors: list[SpecError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


_MISSING = object()


def _lookup(doc: Any, loc: tuple) -> Any:
    for part in loc:
        try:
            doc = doc[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return doc


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the object at `loc` (for listing allowed fields)."""
    model: Any = MedDistillJob
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        field = fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _describe(loc: tuple) -> str:
    parent = _model_at(loc[:-1])
    if parent is None:
        return ""
    for name, f in parent.model_fields.items():
        if (f.alias or name) == loc[-1] and f.description:
            return f" ({f.description})"
    return ""


def _fmt_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# pydantic's wording -> what is allowed, phrased for a YAML author.
_CONSTRAINTS = {
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "too_short": "needs at least {min_length} item(s)",
    "too_long": "allows at most {max_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} characters",
}


def _format(doc: dict, err: dict) -> tuple[str, str]:
    loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "cross_field" and err.get("ctx", {}).get("field"):
        loc = loc + (err["ctx"]["field"],)
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(document)"
    value = _lookup(doc, loc)
    shown = "" if value is _MISSING or isinstance(value, dict) else f"got {_fmt_value(value)}; "
    if kind == "missing":
        return path, f"required field is missing{_describe(loc)}"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted((f.alias or n) for n, f in parent.model_fields.items()) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        fix = f" Did you mean '{hint[0]}'?" if hint else ""
        return path, f"unknown field.{fix} Allowed here: {', '.join(allowed)}"
    if kind == "literal_error":
        return path, f"{shown}allowed values: {err['ctx']['expected']}"
    if kind in _CONSTRAINTS:
        return path, shown + _CONSTRAINTS[kind].format(**err.get("ctx", {}))
    if kind == "string_pattern_mismatch":
        return path, f"{shown}does not have the allowed form{_describe(loc)}"
    msg = err["msg"].removeprefix("Value error, ")
    return path, f"{shown}{msg}"


def validate_document(doc: Any, source: str) -> tuple[MedDistillJob | None, list[SpecError]]:
    if not isinstance(doc, dict):
        return None, [SpecError(source, "(document)", f"expected a mapping (a MedDistillJob), got {type(doc).__name__}")]
    try:
        return MedDistillJob.model_validate(doc), []
    except ValidationError as e:
        errors = [SpecError(source, *_format(doc, err)) for err in e.errors()]
        return None, errors


def load_job_documents(path: str | Path) -> list[tuple[str, Any]]:
    """(source label, parsed document) for every non-empty YAML document in a file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecValidationError([SpecError(str(path), "(file)", f"cannot read: {e.strerror}")]) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecValidationError([SpecError(where, "(yaml)", f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if not docs:
        raise SpecValidationError([SpecError(str(path), "(file)", "no YAML documents found")])
    return [(f"{path}#{i}" if len(docs) > 1 else str(path), d) for i, d in enumerate(docs)]


def load_jobs(path: str | Path) -> list[MedDistillJob]:
    """Every MedDistillJob in a file, or SpecValidationError listing every problem in it."""
    jobs, errors = [], []
    for source, doc in load_job_documents(path):
        job, errs = validate_document(doc, source)
        errors += errs
        if job:
            jobs.append(job)
    if errors:
        raise SpecValidationError(errors)
    return jobs


def load_job(path: str | Path) -> MedDistillJob:
    """Exactly one MedDistillJob from a file (what `meddistill run` takes)."""
    jobs = load_jobs(path)
    if len(jobs) != 1:
        raise SpecValidationError([SpecError(str(path), "(file)", f"expected one MedDistillJob, found {len(jobs)}")])
    return jobs[0]
