"""Is the method worth it? One run of examples/pubmedqa-cpu.yaml plus a no-teacher ablation, with
every target of the usable-model issue marked met or not met.

    python bench/medical_quality.py [--spec examples/pubmedqa-cpu.yaml] [--workdir bench-runs]

1. `meddistill run SPEC --no-serve`: base, fine-tuned teacher, 16-bit student and NF4 student on
   the full official PubMedQA test (500; generative and loglik scoring), 200 held-out MedQuAD
   questions and the 24 general keyword questions.
2. The ablation: the same job with distillation.alpha = 0 (the student learns from the labels
   alone, same steps, same data), reusing the job's teacher (its fingerprint matches), evaluating
   only its student.
3. Targets, each with its paired test or interval:
   - teacher >= base + 10 points on PubMedQA (generative), McNemar p < 0.01, and above the
     majority-class baseline (always "yes": 55.2 % of the 500);
   - KD student - no-teacher student: the difference with its 95 % CI (reported, no target);
   - quantized student >= 97 % of the 16-bit student's PubMedQA accuracy (retention CI shown);
   - open-question F1 of the quantized student >= 90 % of the base model's (held-out MedQuAD),
     repetitive answers not above the base model's.
Prints a markdown report (also written to WORKDIR/medical_quality.md) and the wall time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PUBMEDQA = "pubmedqa:@samples/pubmedqa/ori_pqal.json#test"
MEDQUAD = "jsonl:@samples/medquad_qa/medquad.heldout200.jsonl"


def run_job(doc: dict, workdir: Path) -> Path:
    path = workdir / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    subprocess.run([sys.executable, "-m", "meddistill.cli", "run", str(path), "--no-serve"], cwd=workdir, check=True)
    return workdir / "runs" / doc["metadata"]["name"]


def question_correct(job_dir: Path, model: str, dataset_dir: str) -> dict[str, bool]:
    data = json.loads((job_dir / "evaluate" / model / dataset_dir / "eval.json").read_text())
    return {q["id"]: q["correct"] for q in data["questions"] if q["correct"] is not None}


def stage_wall(job_dir: Path) -> float:
    """Seconds the job's stages took, from their manifests (what --report-only can still tell)."""
    total = 0.0
    for manifest in job_dir.glob("*/manifest.json"):
        total += json.loads(manifest.read_text()).get("metrics", {}).get("wall_s", 0.0)
    return total


def answer_mix(job_dir: Path, model: str, dataset_dir: str) -> str:
    """How often each answer was given: a small model that says one word to everything shows here."""
    data = json.loads((job_dir / "evaluate" / model / dataset_dir / "eval.json").read_text())
    counts: dict[str, int] = {}
    for q in data["questions"]:
        counts[str(q.get("predicted") or "unparsed")] = counts.get(str(q.get("predicted") or "unparsed"), 0) + 1
    return " ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def open_count(job_dir: Path, model: str) -> int:
    """Open questions the model answered on MedQuAD (the denominator of its repetitive count)."""
    folder = next((job_dir / "evaluate" / model).glob("jsonl_samples_medquad_qa_*"))
    return len(json.loads((folder / "eval.json").read_text())["questions"])


def met(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


def main() -> int:
    from meddistill.evaluation.stats import mcnemar_exact, paired_bootstrap, verdict
    from meddistill.spec.models import Results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(ROOT / "examples" / "pubmedqa-cpu.yaml"))
    p.add_argument("--workdir", default="bench-runs")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluation.limit: a seeded, label-stratified sample per dataset instead of all (faster; the report says so)")
    p.add_argument("--generative-only", action="store_true", help="skip loglik scoring (the targets read generative rows only)")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report on the runs already in WORKDIR (an ablation without results is reported as not run)")
    args = p.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    doc = yaml.safe_load(Path(args.spec).read_text())
    # Both overrides touch only spec.evaluation: the teacher, distill and quantize artifacts are reused.
    if args.limit is not None:
        doc["spec"]["evaluation"]["limit"] = args.limit
    if args.generative_only:
        doc["spec"]["evaluation"]["scoring"] = ["generative"]
    # Dataset paths in the spec are @samples/...: independent of where the copy is written.
    main_dir = workdir / "runs" / doc["metadata"]["name"] if args.report_only else run_job(doc, workdir)

    ablation = json.loads(json.dumps(doc))
    ablation["metadata"]["name"] = doc["metadata"]["name"] + "-nokd"
    ablation["spec"]["distillation"]["alpha"] = 0.0
    ablation["spec"]["evaluation"]["models"] = ["student"]
    # evaluation.datasets stay as they are: they are part of the teacher's fingerprint (decontamination).
    ablation["spec"]["evaluation"]["scoring"] = ["generative"]
    abl_dir = workdir / "runs" / ablation["metadata"]["name"]
    for stage in ("teacher", "distill-data"):  # same teacher and cache settings (alpha is not one): reused
        if not (abl_dir / stage).is_dir() and (main_dir / stage).is_dir():
            shutil.copytree(main_dir / stage, abl_dir / stage)
    if not args.report_only:
        run_job(ablation, workdir)
    wall = time.time() - started if not args.report_only else stage_wall(main_dir) + stage_wall(abl_dir)
    ablation_done = (abl_dir / "evaluate" / "results.json").is_file()

    results = Results.model_validate(json.loads((main_dir / "evaluate" / "results.json").read_text()))
    rows = {(r.model, r.dataset): r for r in results.rows}
    pdir = "pubmedqa_samples_pubmedqa_ori_pqal.json_test"
    acc = {m: rows[(m, PUBMEDQA)].accuracy for m in ("base", "teacher", "student", "quantized")}
    base_ok, teacher_ok = question_correct(main_dir, "base", pdir), question_correct(main_dir, "teacher", pdir)
    ids = sorted(base_ok.keys() & teacher_ok.keys())
    _, _, p_teacher = mcnemar_exact([base_ok[i] for i in ids], [teacher_ok[i] for i in ids])
    from meddistill.data import load_dataset

    gold = {r.id: r.answer for r in load_dataset(PUBMEDQA).records}
    yes_share = sum(gold[i] == "yes" for i in ids) / len(ids)

    if ablation_done:
        kd_ok, nokd_ok = question_correct(main_dir, "student", pdir), question_correct(abl_dir, "student", pdir)
        common = sorted(kd_ok.keys() & nokd_ok.keys())
        a, b = [nokd_ok[i] for i in common], [kd_ok[i] for i in common]
        boot = paired_bootstrap(a, b)
        _, _, p_kd = mcnemar_exact(a, b)
        kd_line = (f"- KD student - no-teacher student (alpha 0): {100 * boot.diff:+.1f} points (95% CI {100 * boot.diff_low:+.1f} to "
                   f"{100 * boot.diff_high:+.1f}), {verdict('KD student', 'no-teacher student', boot.diff, p_kd, len(common))}")
    else:
        kd_line = "- KD student - no-teacher student (alpha 0): **not run** (the ablation job has no evaluation results)"

    open_rows = {m: rows.get((m, MEDQUAD)) for m in ("base", "quantized")}
    f1_ratio = (open_rows["quantized"].open_f1 or 0) / (open_rows["base"].open_f1 or float("nan"))
    lines = [
        f"# bench/medical_quality.py: {Path(args.spec).name}, {'stage time' if args.report_only else 'wall'} {wall / 60:.1f} min", "",
        f"Evaluation: {'all questions' if not doc['spec']['evaluation'].get('limit') else 'a seeded, label-stratified sample of ' + str(doc['spec']['evaluation']['limit']) + ' per dataset'}"
        f"{', generative scoring only' if args.generative_only else ''}; PubMedQA n = {len(ids)} after exclusions.", "",
        "| model | PubMedQA (gen) | 95% CI | answers given | MedQuAD F1 | ROUGE-L | MedQuAD repetitive | general keyword hits | general repetitive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in ("base", "teacher", "student", "quantized"):
        r, o = rows[(m, PUBMEDQA)], rows.get((m, MEDQUAD))
        g = next((x for x in results.rows if x.model == m and "general_medical_keywords" in x.dataset), None)
        lines.append(f"| {m} | {100 * r.accuracy:.1f} % | {100 * r.ci_low:.1f}-{100 * r.ci_high:.1f} | {answer_mix(main_dir, m, pdir)} | "
                     f"{(o.open_f1 or 0):.3f} | {(o.open_rouge_l or 0):.3f} | {o.repetitive_n}/{open_count(main_dir, m)} | "
                     f"{g.keyword_hits if g else 'n/a'}/{g.keyword_n if g else 'n/a'} | {g.repetitive_n if g else 'n/a'} |")
    for r in results.rows:
        if r.scoring == "loglik":
            lines.append(f"| {r.model} (loglik acc) | {100 * r.accuracy:.1f} % | {100 * r.ci_low:.1f}-{100 * r.ci_high:.1f} | | | | |")
    lines += ["", "Targets:",
              f"- teacher >= base + 10 points: {100 * (acc['teacher'] - acc['base']):+.1f} points, McNemar p = {p_teacher:.2g}: "
              f"{met(acc['teacher'] - acc['base'] >= 0.10 and p_teacher < 0.01)}",
              f"- teacher above always-yes ({100 * yes_share:.1f} %): {100 * acc['teacher']:.1f} %: {met(acc['teacher'] > yes_share)}",
              kd_line,
              f"- quantized >= 97 % of the 16-bit student: retention {results.accuracy_retention_pct} % (95% CI "
              f"{results.retention_ci_low}-{results.retention_ci_high}): {met((results.accuracy_retention_pct or 0) >= 97)}",
              f"- open-question F1 of the quantized student >= 90 % of base: {100 * f1_ratio:.1f} %: {met(f1_ratio >= 0.9)}",
              f"- repetitive answers not above base: quantized {open_rows['quantized'].repetitive_n} vs base "
              f"{open_rows['base'].repetitive_n}: {met(open_rows['quantized'].repetitive_n <= open_rows['base'].repetitive_n)}",
              "", "Comparisons (paired, same questions):"]
    lines += [f"- {c.dataset}: {c.b} - {c.a}: {c.verdict}" for c in results.comparisons]
    report = "\n".join(lines) + "\n"
    (workdir / "medical_quality.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
