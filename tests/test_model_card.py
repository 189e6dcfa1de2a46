"""The model card the evaluate stage writes, checked against the tiny pipeline's real artifacts.

Every number in the card must be the one the pipeline recorded: the digests are recomputed here
from the files, the record counts from the data files' lines, the table from results.md.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from meddistill.cli import main

STAGES_BEFORE_EVALUATE = ("teacher", "distill-data", "distill", "quantize")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@pytest.fixture(scope="module")
def card(tiny_pipeline):
    ctx, _ = tiny_pipeline
    out = Path(ctx.uri("evaluate"))
    return ctx, json.loads((out / "model_card.json").read_text()), (out / "README.md").read_text()


def test_card_is_in_the_evaluate_artifact_and_covered_by_its_manifest(tiny_pipeline):
    ctx, results = tiny_pipeline
    manifest = json.loads((Path(ctx.uri("evaluate")) / "manifest.json").read_text())
    assert {"README.md", "model_card.json"} <= set(manifest["files"])
    # The served (quantize) folder is untouched: its manifest still lists exactly its files.
    quantize = Path(ctx.uri("quantize"))
    listed = set(json.loads((quantize / "manifest.json").read_text())["files"])
    assert listed == {str(p.relative_to(quantize)) for p in quantize.rglob("*") if p.is_file()} - {"manifest.json"}


def test_lineage_names_each_manifests_real_sha256_and_inputs(card):
    ctx, data, _ = card
    links = {link["stage"]: link for link in data["lineage"]}
    assert list(links) == [*STAGES_BEFORE_EVALUATE, "evaluate"]
    for stage in STAGES_BEFORE_EVALUATE:
        manifest_path = Path(ctx.uri(stage)) / "manifest.json"
        assert links[stage]["manifest_sha256"] == sha256(manifest_path)
        assert links[stage]["inputs"] == json.loads(manifest_path.read_text())["inputs"]
    assert links["quantize"]["inputs"] == {"distill": links["distill"]["manifest_sha256"]}
    evaluate_manifest = json.loads((Path(ctx.uri("evaluate")) / "manifest.json").read_text())
    assert links["evaluate"]["inputs"] == evaluate_manifest["inputs"]  # what the stage really read


def test_models_name_base_and_served_weights_by_digest(card, tiny_model_dir):
    ctx, data, readme = card
    base = data["models"]["base"]
    files = {str(p.relative_to(tiny_model_dir)): sha256(p) for p in sorted(Path(tiny_model_dir).rglob("*")) if p.is_file()}
    assert base["source"] == str(tiny_model_dir) and base["files"] == files and base["digest"] == tree(files)
    served = data["models"]["served"]
    quantize = Path(ctx.uri("quantize"))
    assert served["files"]["model.safetensors"] == sha256(quantize / "model.safetensors")
    assert served["manifest_sha256"] == sha256(quantize / "manifest.json")
    assert "nf4" in served["format"] and "double quant" in served["format"]
    assert data["models"]["student"]["derivation"] == {"from": "teacher", "keepLayers": 1, "strategy": "importance"}
    assert served["digest"] in readme and base["digest"] in readme


def test_datasets_listed_with_digest_record_count_and_role(card):
    ctx, data, readme = card
    by_ref = {d["ref"]: d for d in data["datasets"]}
    train_ref, eval_ref = ctx.spec.teacher.datasets[0], ctx.spec.evaluation.datasets[0]
    assert by_ref[train_ref]["roles"] == ["training"] and by_ref[eval_ref]["roles"] == ["evaluation"]
    for ref, entry in by_ref.items():
        path = Path(ref.split(":", 1)[1])
        assert entry["files"] == {path.name: sha256(path)}
        assert entry["records"] == len(path.read_text().splitlines()) > 0
        assert f"`{ref}` | {entry['records']} | `{sha256(path)}`" in readme
        assert "user-supplied" in entry["license"]  # not a shipped sample: the card asks for a license


def test_settings_decontamination_and_evaluation_come_from_the_run(card):
    ctx, data, readme = card
    teacher_manifest = json.loads((Path(ctx.uri("teacher")) / "manifest.json").read_text())
    assert data["training"]["teacher"]["training"] == teacher_manifest["config"]["training"]
    assert data["training"]["distillation"]["mode"] == "logits" and data["training"]["student"]["lora"]["r"] == 4
    assert data["quantization"]["method"] == "nf4"
    removed = json.loads((Path(ctx.uri("teacher")) / "decontamination.json").read_text())
    assert data["decontamination"]["training_removed"] == len(removed) == teacher_manifest["metrics"]["decontaminated"]
    results = json.loads((Path(ctx.uri("evaluate")) / "results.json").read_text())
    assert data["decontamination"]["evaluation_excluded"] == {e["dataset"]: e["ids"] for e in results["excluded"]}
    results_md = (Path(ctx.uri("evaluate")) / "results.md").read_text()
    assert data["evaluation"]["results_md"] == results_md and data["evaluation"]["scoring"] == ["generative", "loglik"]
    table = results_md.split("\n\n", 1)[1].strip()
    assert table.splitlines()[0] in readme and "| quantized |" in readme


def test_readme_is_a_hugging_face_card_with_every_section(card):
    _, data, readme = card
    _, front, body = readme.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == data["models"]["base"]["source"] and meta["datasets"] == [d["ref"] for d in data["datasets"]]
    for section in ("Intended use", "Limitations", "Models", "Datasets", "Decontamination", "Training and distillation",
                    "Quantization", "Evaluation", "Evaluation gate", "Lineage"):
        assert f"\n## {section}\n" in body, section
    assert "not for unsupervised clinical decisions" in body.lower()
    assert data["gate"]["configured"] is False


def test_card_command_prints_markdown_and_json(card, capsys):
    ctx, data, readme = card
    job_dir = str(Path(ctx.uri("evaluate")).parent)
    assert main(["card", job_dir]) == 0
    out = capsys.readouterr().out
    assert out.startswith(readme) and sha256(Path(job_dir) / "evaluate" / "manifest.json") in out
    assert main(["card", job_dir, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == data


def test_card_command_says_how_to_make_a_missing_card(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 1
    assert "meddistill run FILE --stage evaluate" in capsys.readouterr().err


def test_shipped_sample_carries_its_license_attribution_and_published_sha256():
    """No pipeline: a shipped sample's entry, checked against what its SOURCE.txt publishes."""
    from meddistill.data.refs import SAMPLES_DIR
    from meddistill.jobs.model_card import dataset_entry

    entry = dataset_entry("medqa:@samples/medqa/phrases_no_exclude_test.sample200.jsonl", ["evaluation"], None)
    source = (SAMPLES_DIR / "medqa" / "SOURCE.txt").read_text()
    name = "phrases_no_exclude_test.sample200.jsonl"
    assert f"{name}  sha256={entry['files'][name]}" in source
    assert entry["records"] == 200 and entry["license"] == "MIT" and "Jin et al." in entry["citation"]
    assert "MedQA-USMLE" in entry.get("notice", "MedQA-USMLE") and entry["source_file"] == "meddistill/samples/medqa/SOURCE.txt"
    chatdoctor = dataset_entry("instruction:@samples/chatdoctor/chatdoctor5k.sample300.json", ["training"], None)
    assert chatdoctor["license"].startswith("Apache License 2.0") and "NOT clinically validated" in chatdoctor["caveat"]


def test_run_summary_points_to_the_card(card, capsys):
    from meddistill.cli.run_cmd import print_summary

    ctx, _, _ = card
    print_summary(ctx, [], 0)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"model card: {Path(ctx.uri('evaluate')) / 'README.md'}" in out and "meddistill verify" in out


def test_card_states_the_gate_verdict_and_where_an_override_is_recorded(tiny_pipeline):
    """The same artifacts, judged under a gate whose floor sits just above the measured accuracy."""
    from meddistill.gate import OVERRIDE_ANNOTATION
    from meddistill.jobs.evaluate import upstream_manifests
    from meddistill.jobs.model_card import build_card, render_markdown
    from meddistill.jobs.stage import StageContext
    from meddistill.spec.models import MedDistillJob

    ctx, _ = tiny_pipeline
    out = Path(ctx.uri("evaluate"))
    results = json.loads((out / "results.json").read_text())
    ref = ctx.spec.evaluation.datasets[0]
    measured = next(r["accuracy"] for r in results["rows"]
                    if r["model"] == "quantized" and r["dataset"] == ref and r["scoring"] == "generative")
    assert measured < 1.0  # a random tiny model: there is room above it
    floor = round(min(1.0, measured + 0.01), 2)
    doc = ctx.job.model_dump(by_alias=True, mode="json", exclude_none=True)
    doc["spec"]["serving"]["gate"] = {"enabled": True, "notWorseThanBase": False,
                                      "minAccuracy": [{"dataset": ref, "minAccuracy": floor}]}
    gated = StageContext(MedDistillJob.model_validate(doc), ctx.base_dir)

    data = build_card(gated, upstream_manifests(gated), results, (out / "results.md").read_text())
    gate = data["gate"]
    assert gate["configured"] and gate["passed"] is False
    assert [(c["name"], c["value"], c["threshold"], c["passed"]) for c in gate["checks"]] == [
        ("minAccuracy", measured, floor, False)]
    assert f"accuracy {measured:.2f} < {floor:.2f}" in gate["verdict"] and "FAILED" in gate["verdict"]
    readme = render_markdown(data)
    section = readme.split("\n## Evaluation gate\n", 1)[1].split("\n## ", 1)[0]
    assert f"| minAccuracy | {ref} | {measured:.3g} | {floor} | NO |" in section
    assert OVERRIDE_ANNOTATION in section and "status.gate" in section
