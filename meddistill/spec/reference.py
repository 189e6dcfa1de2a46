"""Render the spec reference (docs/spec-reference.md) from the models, so docs never drift."""

from __future__ import annotations

from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .models import MedDistillJobSpec, SpecModel


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Annotated:  # DatasetRefStr, PathStr...: the type itself; patterns are in the CRD
        return _type_name(get_args(ann)[0])
    args = [a for a in get_args(ann) if a is not type(None)]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "object"
    if getattr(ann, "__origin__", None) is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if str(ann).startswith("typing.Literal"):
        return " \\| ".join(f"`{a}`" for a in get_args(ann))
    if args:
        return " \\| ".join(_type_name(a) for a in args)
    return getattr(ann, "__name__", str(ann))


def _default(field) -> str:
    if field.default is not PydanticUndefined and field.default is not None:
        return f"`{field.default}`"
    if field.default_factory is not None:
        value = field.default_factory()
        return "see fields" if isinstance(value, BaseModel) else f"`{value}`"
    return "required" if field.is_required() else ""


def _model_of(ann: Any) -> type[SpecModel] | None:
    for c in (ann, *get_args(ann)):
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def render_spec_reference() -> str:
    lines = [
        "# MedDistillJob spec reference",
        "",
        "Generated from `meddistill/spec/models.py` by `meddistill crd --reference`. "
        "`kubectl explain mdj.spec.<field>` shows the same text on a cluster.",
        "",
    ]
    queue: list[tuple[str, type[SpecModel]]] = [("spec", MedDistillJobSpec)]
    while queue:
        path, model = queue.pop(0)
        lines += [f"## `{path}`", "", (model.__doc__ or "").strip(), ""]
        for rule in getattr(model, "RULES", ()):
            lines.append(f"- Rule: {rule.message} (CEL: `{rule.cel}`)")
        if getattr(model, "RULES", ()):
            lines.append("")
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            alias = field.alias or name
            lines.append(f"| `{alias}` | {_type_name(field.annotation)} | {_default(field)} | {field.description or ''} |")
            sub = _model_of(field.annotation)
            if sub is not None:
                queue.append((f"{path}.{alias}", sub))
        lines.append("")
    return "\n".join(lines)
