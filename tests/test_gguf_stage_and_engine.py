"""quantization.formats [nf4, gguf] through the real quantize stage (Ray, PEFT merge, llama.cpp's
quantizer) -> manifest -> the llama.cpp engine answering, several sequences per llama_decode, and the
evaluation's gguf row scoring it with the same harness."""
from __future__ import annotations

import asyncio
import time

import pytest

import llama_cpp  # noqa: E402,F401 - a core dependency: missing is a failure, never a skip
pytestmark = pytest.mark.slow  # one real quantize stage on Ray (about a minute on 2 shared cores), then fast tests

from meddistill.artifacts import verify  # noqa: E402
from meddistill.jobs.stage import StageContext, StageError, run_stage  # noqa: E402


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tiny_data_refs, tmp_path_factory, ray_local):
    """(ctx, quantize artifact dir) for formats [nf4, gguf], ggufType Q8_0."""
    from meddistill.spec.models import MedDistillJob
    from tests.pipeline_fixture import tiny_job_document, write_distill_artifact

    doc = tiny_job_document(str(tiny_model_dir), tiny_data_refs, str(tmp_path_factory.mktemp("runs")),
                            quantization={"formats": ["nf4", "gguf"], "ggufType": "Q8_0"})
    ctx = StageContext(MedDistillJob.model_validate(doc))
    write_distill_artifact(ctx, tiny_model_dir, ["q_proj", "v_proj"])
    result = run_stage(ctx, "quantize")
    return ctx, ctx.output_dir("quantize"), result


def test_quantize_makes_both_formats_listed_in_its_manifest(quantized):
    _, folder, result = quantized
    manifest = verify(folder)
    assert manifest is not None
    assert {"gguf/model-Q8_0.gguf", "gguf/tokenizer.json", "model.safetensors"} <= set(manifest.files)
    assert not [f for f in manifest.files if "F16" in f]  # the 16-bit intermediate is not part of the artifact
    m = result.metrics
    assert m["formats"] == ["nf4", "gguf"] and m["gguf_type"] == "Q8_0"
    assert 0 < m["gguf_weight_bytes"] < 0.6 * m["gguf_weight_bytes_f16"]
    assert m["weight_bytes_after"] < m["weight_bytes_before"]  # nf4 as before


def test_model_card_lists_every_format_with_its_digest_and_which_is_served(quantized, capsys):
    """The real evaluate stage on this artifact (student, nf4 and gguf rows) writes the card: one entry per
    format, its digest recomputed here from the files, weight bytes and rows as recorded, gguf served on CPU.
    Runs before the refusal test below, which leaves this artifact without its manifest."""
    import hashlib
    import json
    from pathlib import Path

    import yaml

    from meddistill.artifacts import write_manifest
    from meddistill.cli import main

    ctx, folder, result = quantized
    job = ctx.job.model_copy(deep=True)
    # The teacher stage is not run here: no teacher row (no weights needed), its manifest only, no distill-data stage.
    job.spec.evaluation.models = ["student", "quantized"]
    job.spec.distillation.teacher_cache = "online"
    ev = StageContext(job)
    write_manifest(ev.output_dir("teacher"), stage="teacher", config=job.spec.teacher.model_dump(by_alias=True, mode="json"))
    run_stage(ev, "evaluate")
    out = Path(ev.uri("evaluate"))
    card, readme = json.loads((out / "model_card.json").read_text()), (out / "README.md").read_text()

    def digest(paths):
        files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()

    on_disk = [p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"]
    expected = {"nf4": digest(p for p in on_disk if p.parent == folder),
                "gguf": digest(p for p in on_disk if p.parent == folder / "gguf")}
    formats = {f["format"]: f for f in card["models"]["formats"]}
    assert list(formats) == ["nf4", "gguf"]
    assert {k: f["digest"] for k, f in formats.items()} == expected and expected["nf4"] != expected["gguf"]
    assert formats["gguf"]["weight_bytes"] == result.metrics["gguf_weight_bytes"]
    assert formats["nf4"]["weight_bytes"] == result.metrics["weight_bytes_after"]
    assert formats["gguf"]["location"] == f"{ev.uri('quantize')}/gguf/model-Q8_0.gguf"
    rows = json.loads((out / "results.json").read_text())["rows"]
    for fmt, row in (("nf4", "quantized"), ("gguf", "gguf")):
        recorded = [(r["dataset"], r["scoring"], r["accuracy"]) for r in rows if r["model"] == row]
        assert recorded and [(r["dataset"], r["scoring"], r["accuracy"]) for r in formats[fmt]["evaluation"]] == recorded
    # CPU replicas, engine auto, llama_cpp installed: build_app's pick_engine serves gguf with llama.cpp.
    assert formats["gguf"]["served"] and not formats["nf4"]["served"] and formats["gguf"]["engine"] == "llamacpp"
    assert card["models"]["served"]["digest"] == expected["gguf"]

    meta = yaml.safe_load(readme.split("---\n", 2)[1])
    assert {"nf4", "gguf"} <= set(meta["tags"])
    section = readme.split("\n## Quantization\n", 1)[1].split("\n## ", 1)[0]
    for fmt, f in formats.items():
        line = next(row for row in section.splitlines() if row.startswith(f"| {fmt} |"))
        assert f"`{f['digest']}`" in line and str(f["weight_bytes"]) in line
        assert ("yes (llamacpp engine)" in line) == (fmt == "gguf")
    assert main(["card", str(out.parent)]) == 0
    printed = capsys.readouterr().out
    assert expected["nf4"] in printed and expected["gguf"] in printed


def test_a_format_the_replicas_cannot_serve_fails_the_stage_with_the_reason(quantized):
    ctx, _, _ = quantized
    bad = StageContext(ctx.job.model_copy(deep=True))
    bad.job.spec.quantization.formats = ["gguf"]
    bad.job.spec.serving.gpus_per_replica = 1
    with pytest.raises(StageError, match=r"spec\.quantization\.formats: \['gguf'\] cannot be served on a GPU"):
        run_stage(bad, "quantize")


def run_concurrently(engine, prompts: list[list[int]], max_tokens: int):
    from meddistill.serve.engine import GenerationParams

    async def main():
        params = GenerationParams(max_tokens=max_tokens, ignore_eos=True)
        return await asyncio.gather(*(engine.generate(p, params) for p in prompts))

    return asyncio.run(main())


def test_engine_batches_sequences_and_answers_as_alone(quantized):
    """Eight requests, 12 tokens each: far fewer llama_decode calls than sequences x tokens, several
    sequences in a call, and every answer the same as that request served alone."""
    from meddistill.serve.args import ServeArgs
    from meddistill.serve.config import serving_args
    from meddistill.serve.llamacpp_engine import load_llamacpp_engine

    ctx, folder, _ = quantized
    args = serving_args(ctx.spec.serving, str(folder), formats=["nf4", "gguf"], gguf_type="Q8_0", engine="llamacpp")
    engine, tokenizer = load_llamacpp_engine(folder, ServeArgs.parse({**args, "max_batch_size": 8, "num_threads": 1}))
    prompts = [tokenizer(f"Question {i}: is aspirin {'safe ' * i}in pregnancy?").input_ids for i in range(8)]
    widths = []
    decode = engine.model.decode
    engine.model.decode = lambda rows: (widths.append(len({r.seq for r in rows})), decode(rows))[1]
    together = run_concurrently(engine, prompts, 12)
    assert all(c.completion_tokens == 12 and c.finish_reason == "length" for c in together)
    assert engine.model.decode_calls <= 12 + 8 < 8 * 12 // 2
    assert max(widths) >= 4  # several sequences share one llama_decode
    alone = [run_concurrently(engine, [p], 12)[0].text for p in prompts[:3]]
    assert alone == [c.text for c in together[:3]]
    deadline = time.monotonic() + 10  # the last chunk is delivered just before its row leaves the batch
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0 and sorted(engine._free_seqs) == list(range(8))  # every sequence freed
    engine.shutdown()


def test_gguf_row_is_scored_by_the_harness(quantized, tiny_data_refs):
    """The evaluate stage's gguf row: generative and loglik scoring, weight bytes from llama.cpp."""
    from meddistill.data import load_dataset
    from meddistill.evaluation import evaluate
    from meddistill.evaluation.llamacpp import load_gguf_for_eval

    _, folder, result = quantized
    records = load_dataset(tiny_data_refs["eval"]).records[:4]
    model, tokenizer, dtype = load_gguf_for_eval(folder / "gguf" / "model-Q8_0.gguf", batch_size=4, threads=1)
    assert dtype == "gguf Q8_0 (llama.cpp)"
    gen = evaluate(model, tokenizer, records, batch_size=4, max_new_tokens=6, progress=False, latency_questions=2)
    assert gen.n == 4 and gen.weight_bytes == result.metrics["gguf_weight_bytes"]
    assert gen.latency_b1_s > 0 and gen.tokens_per_s > 0
    assert all(q.new_tokens > 0 for q in gen.questions)
    ll = evaluate(model, tokenizer, records, batch_size=4, scoring="loglik", progress=False)
    assert ll.n == 4 and all(set(q.option_logprobs) == {"yes", "no", "maybe"} for q in ll.questions)
