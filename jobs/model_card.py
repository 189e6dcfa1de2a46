"""The model card: what went into the served model, how it scored, and the chain that proves it.

Written by the evaluate stage into its own artifact (so evaluate's manifest covers it; a file added
to the quantize folder after its manifest would break that stage's verification), in the Hugging
Face model-card layout:
  README.md        YAML metadata + the card for people
  model_card.json  the same facts for machines; `meddistill verify` re-hashes what it records

Everything comes from what the pipeline recorded, not from the spec as it is now: each stage's
manifest (config actually run, metrics, file digests, input digests), the teacher's
decontamination report, the evaluate stage's results, and for the shipped sample datasets their
SOURCE.txt and the NOTICE entry (license and attribution).
"""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import yaml

from meddistill import __version__
from meddistill.artifacts import MANIFEST, sha256_file
from meddistill.gate import OVERRIDE_ANNOTATION, judge
from meddistill.lineage import CARD_JSON, hash_tree, tree_digest
from meddistill.spec.models import Results

log = logging.getLogger(__name__)

CARD_MD = "README.md"
SCHEMA = "meddistill.io/model-card/v1"
BUILTIN_LICENSES = {"builtin:smollm2-135m-instruct": "apache-2.0"}  # NOTICE: Apache-2.0, Hugging Face TB
INTENDED_USE = (
    "Research and decision support under clinician supervision: drafting answers to medical questions "
    "that a qualified person reviews. Not for unsupervised clinical decisions, diagnosis or treatment."
)
LIMITATIONS = [
    "Not for unsupervised clinical decisions: answers can be wrong, outdated or incomplete while sounding confident.",
    "A small distilled student: it knows less than its teacher and repeats or invents facts more often; "
    "the evaluation table below says how much less, with 95% intervals.",
    "4-bit quantization changes some answers; the table compares it with the same student in 16 bits on the same questions.",
    "Accuracy is measured on the sampled evaluation questions listed here only, in English; other question "
    "types, languages and patient populations are untested.",
]
_SOURCE_KEY = re.compile(r"^([A-Z][\w ()-]*?):(\s|$)")
# Each format's rows in results.json (jobs/evaluate.evaluated_models), and what the card keeps of them.
FORMAT_ROWS = {"nf4": "quantized", "gguf": "gguf", "w4a16": "w4a16"}
ROW_FIELDS = {"dataset", "scoring", "accuracy", "ci_low", "ci_high", "n", "weight_bytes", "latency_b1_ms", "ms_per_token"}


def manifest_of(stage_dir: Path) -> dict:
    """A stage's manifest as written, plus `digest` (sha256 of the file: what later stages record)."""
    path = Path(stage_dir) / MANIFEST
    return {**json.loads(path.read_text()), "digest": sha256_file(path)}


def sample_attribution(path: Path) -> dict:
    """License and attribution of a shipped sample (its folder's SOURCE.txt and NOTICE entry); {} otherwise."""
    from meddistill.data.refs import SAMPLES_DIR

    try:
        folder = SAMPLES_DIR / Path(path).resolve().relative_to(SAMPLES_DIR.resolve()).parts[0]
    except (ValueError, IndexError):
        return {}
    source = folder / "SOURCE.txt"
    if not source.is_file():
        return {}
    fields, key = {}, None
    for line in source.read_text().splitlines():
        match = _SOURCE_KEY.match(line)
        if match:
            key = match.group(1)
            fields[key] = line[match.end():].strip()
        elif not line.strip():
            key = None
        elif key:  # a continuation line of the field above
            fields[key] = f"{fields[key]} {line.strip()}".strip()
    info = {"sample": folder.name, "source_file": f"meddistill/samples/{folder.name}/SOURCE.txt",
            "description": source.read_text().splitlines()[0]}
    for want, name in (("license", "License"), ("upstream", "Upstream"), ("citation", "Citation"),
                       ("attribution", "Attribution (required)"), ("caveat", "Caveat")):
        value = next((v for k, v in fields.items() if k == name or (name == "Upstream" and k.startswith(name))), "")
        if want in ("license", "upstream"):  # the name and the link; the full terms stay in SOURCE.txt
            value = value.split(". ")[0].rstrip(".")
        if value:
            info[want] = value
    notice = SAMPLES_DIR.parent.parent / "NOTICE"  # the source tree's NOTICE; absent from some installs
    if notice.is_file():
        for paragraph in re.split(r"\n\s*\n", notice.read_text()):
            if f"meddistill/samples/{folder.name}/" in paragraph:
                info["notice"] = " ".join(paragraph.split())
                break
    return info


def dataset_entry(ref: str, roles: list[str], base_dir) -> dict:
    """A dataset reference with its local files' sha256, record count and license."""
    from meddistill.data import load_dataset
    from meddistill.data.refs import parse_dataset_ref

    parsed = parse_dataset_ref(ref)
    # Hashed when the evaluate stage runs: the training stages record the ids they kept (their manifests'
    # data_digest), not the files' bytes.
    entry = {"ref": ref, "roles": roles, "format": parsed.format, "split": parsed.split, "hashed_by": "evaluate"}
    if parsed.is_hub_name:
        entry.update(path="", files={}, digest="", note="Hugging Face hub dataset: not local, digest not recorded")
    else:
        path = parsed.resolve_path(base_dir)
        files = hash_tree(path)
        entry.update(path=str(path), files=files, digest=tree_digest(files))
        entry.update(sample_attribution(path) or {"license": "not recorded (user-supplied data): add it to this card"})
    try:
        loaded = load_dataset(ref, base_dir=base_dir)
        entry.update(records=len(loaded.records), skipped=len(loaded.skipped),
                     question_types=loaded.question_type_counts())
    except Exception as err:  # noqa: BLE001 - the card says what it could not count rather than failing the stage
        entry.update(records=None, note=f"not loaded here: {err}")
    return entry


def base_model_entry(source: str) -> dict:
    """The teacher's base model: its source and the sha256 of its local files where there are any."""
    from meddistill.modelsource import builtin_gguf_path

    entry = {"source": source, "path": "", "files": {}, "digest": ""}
    if source.startswith("builtin:"):
        path = builtin_gguf_path(source[len("builtin:"):])
    elif source.startswith("s3://") or not Path(source).expanduser().exists():
        entry["note"] = "not a local file or folder: digest not recorded"
        return entry
    else:
        path = Path(source).expanduser().resolve()
    entry["files"] = hash_tree(path)
    entry.update(path=str(path), digest=tree_digest(entry["files"]))
    if source in BUILTIN_LICENSES:
        entry["license"] = BUILTIN_LICENSES[source]
    return entry


def files_under(manifest: dict, prefix: str) -> dict[str, str]:
    return {k: v for k, v in manifest["files"].items() if k.startswith(prefix)}


def build_card(ctx, stage_dirs: dict[str, Path], results: dict, results_md: str) -> dict:
    """The card's facts. stage_dirs: verified input artifacts by stage (teacher, distill, quantize...)."""
    spec = ctx.spec
    manifests = {stage: manifest_of(d) for stage, d in stage_dirs.items()}
    teacher, distill, quantize = manifests["teacher"], manifests["distill"], manifests["quantize"]
    roles: dict[str, list[str]] = {}
    for ref in teacher["config"]["datasets"]:
        roles.setdefault(ref, []).append("training")
    for ref in spec.evaluation.datasets:
        roles.setdefault(ref, []).append("evaluation")
    datasets = [dataset_entry(ref, r, ctx.base_dir) for ref, r in roles.items()]
    removed_path = stage_dirs["teacher"] / "decontamination.json"
    removed = json.loads(removed_path.read_text()) if removed_path.is_file() else []
    student_cfg = distill["config"].get("student", {})
    formats = format_entries(ctx, quantize, results)
    return {
        "schema": SCHEMA,
        "job": ctx.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "harness": f"meddistill {__version__}",
        "models": {
            "base": base_model_entry(teacher["config"]["model"]),
            "teacher": {"fine_tuned_from": teacher["config"]["model"], "method": teacher["config"].get("method"),
                        "uri": ctx.uri("teacher"), "weights_digest": tree_digest(files_under(teacher, "model/")),
                        "manifest_sha256": teacher["digest"]},
            "student": {"derivation": student_cfg.get("model") or {"from": "teacher", **(student_cfg.get("derive") or {})},
                        "base_digest": tree_digest(files_under(distill, "base/")),
                        "adapter_digest": tree_digest(files_under(distill, "adapter/")),
                        "uri": ctx.uri("distill"), "manifest_sha256": distill["digest"]},
            "served": served_entry(ctx.spec, formats, quantize["digest"]),
            "formats": formats,
        },
        "datasets": datasets,
        "decontamination": {
            "training_removed": len(removed),
            "training_removed_pairs": removed,  # [train id, evaluation id, reason]
            "training_examples": teacher["metrics"].get("train_examples"),
            "evaluation_excluded": {e["dataset"]: e["ids"] for e in results.get("excluded", [])},
            "method": "exact question match or shared 13-gram, both directions (meddistill/data/decontaminate.py)",
        },
        "training": {
            "teacher": {k: teacher["config"].get(k) for k in ("method", "training", "deepspeed", "lora", "promptStyle")},
            "student": {k: student_cfg.get(k) for k in ("derive", "lora", "training")},
            "distillation": distill["config"].get("distillation"),
            "metrics": {"teacher": teacher["metrics"], "distill": distill["metrics"]},
        },
        "quantization": {**quantize["config"], "metrics": quantize["metrics"]},
        "evaluation": {
            "harness": f"meddistill {__version__}", "scoring": list(spec.evaluation.scoring),
            "datasets": list(spec.evaluation.datasets), "limit": spec.evaluation.limit, "seed": spec.evaluation.seed,
            "headline": {k: results.get(k) for k in ("accuracyRetentionPct", "retentionCiLow", "retentionCiHigh",
                                                      "memoryReductionPct", "latencyReductionPct")},
            "results_md": results_md,
        },
        "gate": gate_entry(spec, results),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS + [f"{d['ref']}: {d['caveat']}" for d in datasets if d.get("caveat")],
        "lineage": [
            {"stage": stage, "uri": ctx.uri(stage), "manifest_sha256": m["digest"], "inputs": m.get("inputs", {}),
             "data_digest": m.get("data_digest", ""), "files": len(m["files"])}
            for stage, m in manifests.items()
        ] + [{"stage": "evaluate", "uri": ctx.uri("evaluate"), "manifest_sha256": "(this artifact: evaluate/manifest.json)",
              "inputs": {s: manifests[s]["digest"] for s in ("teacher", "distill", "quantize")}, "data_digest": "",
              "files": None}],
    }


def format_entries(ctx, quantize: dict, results: dict) -> list[dict]:
    """Each format the quantize stage made (its manifest's metrics.formats), as the card lists it: where
    it is, its files and their digest, its weight bytes, its evaluation rows, and whether it is served."""
    from meddistill.quantized_formats import GGUF_DIR, W4A16_DIR, gguf_file_name

    config, metrics, uri = quantize["config"], quantize["metrics"], ctx.uri("quantize")
    made = metrics.get("formats") or ["nf4"]  # manifests from before quantization.formats: nf4 only
    served, engine, why_none = served_format(ctx.spec, made)
    rows = Results.model_validate(results).rows
    entries = []
    for fmt in made:
        if fmt == "gguf":
            gguf_type = metrics.get("gguf_type") or config.get("ggufType", "")
            files = files_under(quantize, f"{GGUF_DIR}/")
            entry = {"what": f"llama.cpp GGUF {gguf_type}",
                     "location": f"{uri}/{metrics.get('gguf_file') or f'{GGUF_DIR}/{gguf_file_name(gguf_type)}'}",
                     "weight_bytes": metrics.get("gguf_weight_bytes")}
        elif fmt == "w4a16":
            from meddistill.jobs.quantize_w4a16 import GROUP_SIZE

            files = files_under(quantize, f"{W4A16_DIR}/")
            entry = {"what": f"compressed-tensors W4A16 ({metrics.get('w4a16_method', config.get('w4a16Method'))}), "
                             f"group size {GROUP_SIZE}",
                     "location": f"{uri}/{W4A16_DIR}", "weight_bytes": metrics.get("w4a16_file_bytes")}
        else:  # nf4: the artifact's root folder, i.e. every file not in another format's subfolder
            files = {k: v for k, v in quantize["files"].items() if not k.startswith((f"{GGUF_DIR}/", f"{W4A16_DIR}/"))}
            entry = {"what": quantization_format(config), "location": uri, "weight_bytes": metrics.get("weight_bytes_after")}
        row = FORMAT_ROWS[fmt]
        evaluation = [r.model_dump(by_alias=True, include=ROW_FIELDS) for r in rows if r.model == row]
        entries.append({"format": fmt, **entry, "files": files, "digest": tree_digest(files), "evaluation_row": row,
                        "evaluation": evaluation, "served": fmt == served,
                        "engine": engine if fmt == served else "", "not_served_because": why_none})
    return entries


def served_format(spec, formats: list[str]) -> tuple[str | None, str, str]:
    """(format, engine, "") that serving loads, or (None, "", why not): serve.config.pick_engine's choice
    for serving.engine with the packages of the image writing the card (the serving image decides
    `auto` the same way where the app runs)."""
    from meddistill.serve.config import pick_engine_here

    try:
        engine = pick_engine_here(spec.serving.engine, gpu=spec.serving.gpus_per_replica > 0, formats=tuple(formats))
    except ValueError as err:
        return None, "", str(err)
    # vLLM serves w4a16 when it was made (its Marlin kernels), else nf4 (serve/config.llm_config).
    served = {"llamacpp": "gguf", "transformers": "nf4"}.get(engine) or ("w4a16" if "w4a16" in formats else "nf4")
    return served, engine, ""


def served_entry(spec, formats: list[dict], manifest_sha256: str) -> dict:
    """models.served: the served format's entry, in the keys the card has always had."""
    served = next((f for f in formats if f["served"]), None)
    if served is None:
        return {"uri": "", "format": f"none: {formats[0]['not_served_because']}", "files": {}, "digest": "",
                "manifest_sha256": manifest_sha256, "serving_enabled": spec.serving.enabled}
    return {"uri": served["location"], "format": served["what"], "files": served["files"], "digest": served["digest"],
            "manifest_sha256": manifest_sha256, "quantization_format": served["format"], "engine": served["engine"],
            "serving_enabled": spec.serving.enabled}


def quantization_format(config: dict) -> str:
    method = config.get("method", "none")
    if method == "none":
        return "unquantized (merged student, safetensors)"
    extra = " double quant" if config.get("doubleQuant") and method in ("nf4", "fp4") else ""
    mixed = config.get("mixedPrecision") or "none"
    extra += f", mixed precision {mixed} (its sensitive projections kept 16-bit)" if mixed != "none" else ""
    return f"bitsandbytes {method}{extra}, compute {config.get('computeDtype', '')}, skipped {config.get('skipModules', [])}"


def gate_entry(spec, results: dict) -> dict:
    """The evaluation gate's verdict on this table, by the operator's own rule (meddistill/gate.py).

    The card is sealed by the evaluate stage's manifest before the operator judges, so it cannot carry
    an override (an annotation on the job): the operator records that in status.gate, and the card says so.
    """
    gate = spec.serving.gate
    if not gate.enabled:
        return {"configured": False, "verdict": "No evaluation gate configured (serving.gate.enabled is false): "
                                                "the model is served without one."}
    verdict = judge(gate, Results.model_validate(results), spec.evaluation)
    return {"configured": True, "spec": gate.model_dump(by_alias=True, mode="json"), "passed": verdict.status.passed,
            "checks": [c.model_dump(by_alias=True, mode="json") for c in verdict.status.checks],
            "verdict": f"Evaluation gate {'passed' if verdict.status.passed else 'FAILED'} (computed by the evaluate "
                       f"stage with the operator's rule): {verdict.summary()}.",
            "override": f"Not recorded here: the card is written before the operator judges. An override "
                        f"({OVERRIDE_ANNOTATION}: \"NAME: REASON\") is recorded in the job's status.gate "
                        f"(overriddenBy, overrideReason) and its EvaluationGate condition."}


def gate_lines(gate: dict) -> list[str]:
    """The gate's checks as a table, and where an override is recorded."""
    if not gate["configured"]:
        return []

    def value(c):
        return "n/a" if c["value"] is None else f"{c['value']:.3g}"

    rows = [f"| {c['name']} | {c['dataset'] or 'all pooled'} | {value(c)} | {c['threshold']} | {'yes' if c['passed'] else 'NO'} |"
            for c in gate["checks"]]
    return ["| check | dataset | value | threshold | passed |", "|---|---|---|---|---|", *rows, "", gate["override"], ""]


def quantization_lines(formats: list[dict]) -> list[str]:
    """One row per format the quantize stage made, each its own files under the quantize artifact."""

    def accuracy(f):
        # Open-question sets have no accuracy (n = 0): their F1 / keyword hits are under Evaluation.
        scores = [f"{r['accuracy']:.2f} (n={r['n']})" for r in f["evaluation"] if r["scoring"] == "generative" and r["n"]]
        return f"`{f['evaluation_row']}` row: {', '.join(scores)}" if scores else "not evaluated"

    def served(f):
        return f"yes ({f['engine']} engine)" if f["served"] else ""

    rows = [f"| {f['format']} | {f['what']} | `{f['location']}` | `{f['digest']}` | {f['weight_bytes'] or 'n/a'} "
            f"| {accuracy(f)} | {served(f)} |" for f in formats]
    lines = ["Each format is made from the same merged student into the quantize artifact and listed in its manifest; "
             "the files digest is the sha256 over the format's files and their sha256. Accuracy is generative, "
             "per evaluation dataset (the full rows are under Evaluation).", "",
             "| format | what | location | files digest | weight bytes | accuracy | served |",
             "|---|---|---|---|---|---|---|", *rows, ""]
    if not any(f["served"] for f in formats):
        lines += [f"Not served: {formats[0]['not_served_because']}", ""]
    return lines


def render_markdown(card: dict) -> str:
    """README.md: Hugging Face YAML metadata, then the card for people."""
    base, teacher, student, served = (card["models"][k] for k in ("base", "teacher", "student", "served"))
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation", "base_model": base["source"],
            "tags": ["medical", "distillation", "lora", "quantized", "meddistill",
                     *(f["format"] for f in card["models"]["formats"])],
            "datasets": [d["ref"] for d in card["datasets"]]}
    if base.get("license"):
        meta["license"] = base["license"]
    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
           f"# {card['job']}: quantized medical student (MedDistill)", "",
           f"{'Served' if served['serving_enabled'] else 'Weights `meddistill serve` loads (serving.enabled is false)'}: "
           f"`{served['uri']}` ({served['format']}), files digest `{served['digest']}`.", "",
           "## Intended use", "", card["intended_use"], "", "## Limitations", ""]
    out += [f"- {item}" for item in card["limitations"]]
    out += ["", "## Models", "", "| model | what | digest |", "|---|---|---|",
            f"| base | `{base['source']}` | `{base['digest'] or base.get('note', '')}` |",
            f"| teacher | fine-tuned ({teacher['method']}) from the base | weights `{teacher['weights_digest']}` |",
            f"| student | {json.dumps(student['derivation'])}, distilled with LoRA "
            f"| base `{student['base_digest']}`, adapter `{student['adapter_digest']}` |",
            f"| served | {served['format']} | `{served['digest']}` |", "",
            "## Datasets", "", "| role | dataset | records | sha256 | license |", "|---|---|---|---|---|"]
    for d in card["datasets"]:
        digest = next(iter(d["files"].values())) if len(d["files"]) == 1 else f"{d['digest']} ({len(d['files'])} files)"
        out.append(f"| {', '.join(d['roles'])} | `{d['ref']}` | {d.get('records')} | `{digest or d.get('note', '')}` "
                   f"| {d.get('license', '')} |")
    attributed = [d for d in card["datasets"] if d.get("sample")]
    if attributed:
        out += ["", "### Attribution", ""]
        for d in attributed:
            credit = d.get("attribution") or d.get("citation", "")
            out.append(f"- `{d['ref']}`: {d['description']} Upstream: {d.get('upstream', '')}. {credit} "
                       f"License: {d.get('license', '')} ({d['source_file']}).")
    dec = card["decontamination"]
    out += ["", "## Decontamination", "",
            f"Training records removed because they overlap an evaluation question: {dec['training_removed']} "
            f"({dec['method']}); training examples kept: {dec['training_examples']}.",
            "Evaluation questions excluded as seen in training: "
            + (", ".join(f"{ref}: {len(ids)}" for ref, ids in dec["evaluation_excluded"].items()) or "none") + ".",
            "", "## Training and distillation", "", "```yaml",
            yaml.safe_dump({k: v for k, v in card["training"].items() if k != "metrics"}, sort_keys=False).strip(), "```",
            "", "## Quantization", ""]
    out += quantization_lines(card["models"]["formats"])
    out += ["## Evaluation", "",
            f"Harness: {card['evaluation']['harness']}; scoring: {', '.join(card['evaluation']['scoring'])}; "
            f"seed {card['evaluation']['seed']}, limit {card['evaluation']['limit']} per dataset.", "",
            re.sub(r"^# .*\n+", "", card["evaluation"]["results_md"]).strip(), "",
            "## Evaluation gate", "", card["gate"]["verdict"], ""]
    out += gate_lines(card["gate"])
    out += ["## Lineage", "", "From data to served weights; each stage records the sha256 of the manifests it was built from. "
            "Check it with `meddistill verify JOB_DIR`.", "",
            "| stage | manifest sha256 | built from |", "|---|---|---|"]
    for link in card["lineage"]:
        inputs = ", ".join(f"{k} `{v}`" for k, v in link["inputs"].items()) or "data: " + (link["data_digest"] or "-")
        out.append(f"| {link['stage']} | `{link['manifest_sha256']}` | {inputs} |")
    return "\n".join(out) + "\n"


def write_model_card(ctx, out: Path, stage_dirs: dict[str, Path]) -> dict:
    """Write README.md and model_card.json into the evaluate artifact `out`; returns the card."""
    results = json.loads((out / "results.json").read_text())
    card = build_card(ctx, stage_dirs, results, (out / "results.md").read_text())
    (out / CARD_JSON).write_text(json.dumps(card, indent=2))
    (out / CARD_MD).write_text(render_markdown(card))
    log.info("model card: %s", out / CARD_MD)
    return card
