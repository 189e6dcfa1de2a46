"""Generate the MedDistillJob CustomResourceDefinition from the typed models.

The chart's CRD file is exactly `render_crd_yaml()`; a test fails when they drift. Pydantic emits
JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema, so this module inlines
`$ref`s, turns `Optional[X]` into `nullable`, rewrites exclusive bounds, and drops what the API
server rejects (`title`, `additionalProperties: false`, `default: null`).
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from .models import NAME_MAX, NAME_PATTERN, API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAMES, MedDistillJobSpec, MedDistillJobStatus

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Overall phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage", "description": "Stage running now"},
    {"name": "Accuracy", "type": "string", "jsonPath": ".status.accuracy", "description": "Quantized student accuracy"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _structural(node: Any, defs: dict) -> Any:
    """Recursively convert one pydantic JSON-schema node to a structural OpenAPI v3 node."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"unsupported union in spec schema: {any_of}")
        # Merge the raw inner schema under this node's own keys, then convert once (converting
        # twice would turn `exclusiveMaximum: true` into `maximum: true`).
        target = non_null[0]
        if "$ref" in target:
            target = defs[target["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **node}
        if len(non_null) < len(any_of):
            node["nullable"] = True
        return _structural(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "additionalProperties" and value is False:
            continue  # structural schemas prune unknown fields instead
        if key == "default" and value is None:
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
            continue
        out[key] = _structural(value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "integer" if all(isinstance(v, int) for v in out["enum"]) else "string"
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return out


def openapi_schema(model: type) -> dict:
    """A structural OpenAPI v3 schema of one pydantic model (by alias, i.e. camelCase)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def build_crd() -> dict:
    spec_schema = openapi_schema(MedDistillJobSpec)
    status_schema = openapi_schema(MedDistillJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "meddistill", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": ["meddistill", "ml"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "MedDistillJob runs the medical-LLM method end to end: teacher fine-tune, "
                            "distillation into a LoRA student, 4-bit quantization, evaluation, serving.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [
                                {
                                    "rule": f"size(self.metadata.name) <= {NAME_MAX}",
                                    "message": f"metadata.name must be at most {NAME_MAX} characters: "
                                    "stage RayJobs are named <name>-<stage>-a<attempt> and KubeRay caps those at 47",
                                },
                                {
                                    "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
                                    "message": "metadata.name must be lowercase letters, digits and '-' (no '.'): "
                                    "child Services are named after the job and a Service name is a DNS label",
                                },
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


HEADER = "# Generated by `meddistill crd` from meddistill/spec/models.py. Do not edit: change the models.\n"


class _KubeYamlDumper(yaml.SafeDumper):
    """Quotes strings that YAML 1.1 (Kubernetes' parser) reads as booleans: `n:` would be `false:`."""

    def represent_str(self, data: str):
        if data.lower() in {"y", "n", "yes", "no", "on", "off", "true", "false"}:
            return self.represent_scalar("tag:yaml.org,2002:str", data, style="'")
        return super().represent_str(data)


_KubeYamlDumper.add_representer(str, _KubeYamlDumper.represent_str)


def render_crd_yaml() -> str:
    return HEADER + yaml.dump(build_crd(), Dumper=_KubeYamlDumper, sort_keys=False, width=100)
