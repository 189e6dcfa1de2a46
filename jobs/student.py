"""The student's base model: its own weights, or the fine-tuned teacher with layers removed.

Layer pruning in its depth-only form (Minitron, Muralidharan et al. 2024; ShortGPT, Men et al.
2024): keep `keepLayers` decoder layers, chosen by `strategy`:
  importance  (default) the layers that change the hidden state most on calibration text
              (the job's own training records), measured as ShortGPT's Block Influence
              BI_i = 1 - mean_token cos(h_i, h_{i+1}). Layers that barely rotate the residual
              stream are dropped first; uniform spacing drops useful ones and breaks the model
              (SmolLM2-135M, 24 of 30 kept uniformly: it answers "What is hypertension?" with "").
  uniform     evenly spaced layers (always the first and the last)
  first       the first N
The result is saved as a plain model directory (with `layer_importance.json`: every layer's
score and the kept indices, and its own manifest.json) so every worker and every later stage loads
the same base: the distill artifact's `base/`, which its adapter names as `../base`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
CALIBRATION_RECORDS, CALIBRATION_TOKENS = 32, 256
BASE_STAGE = "student-base"  # the pruned base's own manifest names it so


def keep_layer_indices(total: int, keep: int, strategy: str, importance: list[float] | None = None) -> list[int]:
    """Indices of the decoder layers a derived student keeps (sorted)."""
    if keep > total:
        raise ValueError(f"spec.student.derive.keepLayers={keep} exceeds the teacher's {total} layers; use <= {total}")
    if strategy == "importance":
        if importance is None or len(importance) != total:
            raise ValueError(f"strategy importance needs one score per layer ({total}), got {importance!r}")
        ranked = sorted(range(total), key=lambda i: (-importance[i], i))  # most influential first
        return sorted(ranked[:keep])
    if strategy == "first" or keep == total:
        return list(range(keep))
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def block_influence(model, tokenizer, texts: list[str], max_tokens: int = CALIBRATION_TOKENS) -> list[float]:
    """ShortGPT Block Influence per decoder layer: 1 - mean cosine(input, output) over real tokens."""
    import torch
    import torch.nn.functional as F

    n_layers = model.config.num_hidden_layers
    totals, count = torch.zeros(n_layers, dtype=torch.float64), 0
    model.eval()
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            hidden = model(**enc, output_hidden_states=True).hidden_states  # n_layers + 1 states
            n_tokens = enc["input_ids"].shape[1]
            for i in range(n_layers):
                totals[i] += F.cosine_similarity(hidden[i][0].float(), hidden[i + 1][0].float(), dim=-1).sum().item()
            count += n_tokens
    return [round(1.0 - t / max(count, 1), 6) for t in totals.tolist()]


def _decoder_layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no model.layers to prune; use spec.student.model instead of derive")
    return inner


def prune_layers(model, indices: list[int]):
    """Keep only `indices` of the decoder stack (in place), renumbering KV-cache slots and config."""
    import torch

    inner = _decoder_layers(model)
    kept = [inner.layers[i] for i in indices]
    for new_idx, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    inner.layers = torch.nn.ModuleList(kept)
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in indices]  # e.g. Gemma's sliding/full pattern
    config.num_hidden_layers = len(indices)
    return model


def calibration_texts(ctx, tokenizer) -> list[str]:
    """Prompt + reference answer of the job's first training records, rendered as training sees them."""
    from meddistill.jobs.sft_data import load_training_records
    from meddistill.prompts import render_prompt, render_target

    spec = ctx.spec
    data = load_training_records(ctx, spec.teacher.datasets, CALIBRATION_RECORDS, spec.student.training.seed)
    style = spec.teacher.prompt_style
    return [render_prompt(r, tokenizer, style) + render_target(r, style) for r in data.records]


def base_provenance(ctx, teacher_model_dir: Path) -> dict:
    """What a pruned base is a function of: the teacher's weights (its artifact digest), the
    derive settings and the calibration text (datasets, seed, prompt style)."""
    from meddistill.artifacts import read_manifest

    spec = ctx.spec
    teacher = read_manifest(Path(teacher_model_dir).parent)
    return json.loads(json.dumps({
        "teacher_digest": teacher.digest if teacher else "",
        "derive": spec.student.derive.model_dump(by_alias=True),
        "calibration": {"datasets": list(spec.teacher.datasets), "seed": spec.student.training.seed,
                        "promptStyle": spec.teacher.prompt_style, "records": CALIBRATION_RECORDS},
    }, default=str))  # as the manifest reads it back


def materialize_student_base(ctx, teacher_model_dir: Path, target: Path) -> str:
    """The student's base as a model source: spec.student.model, or a pruned copy of the teacher.

    The pruned copy carries its own manifest (BASE_STAGE): every training worker fetches and
    verifies it on its own node (storage.fetch_input), and a later run reuses it only when it
    verifies and was pruned from the same teacher with the same settings (base_provenance).
    """
    from meddistill.artifacts import verify, write_manifest

    student = ctx.spec.student
    if student.model is not None:
        return student.model
    provenance = base_provenance(ctx, teacher_model_dir)
    made = verify(target) if (target / "config.json").is_file() else None
    if made is not None and made.stage == BASE_STAGE and made.config == provenance:
        return str(target)
    from meddistill.modelsource import load_model

    model, tokenizer = load_model(str(teacher_model_dir), dtype="float32")
    derive, total = student.derive, model.config.num_hidden_layers
    importance = block_influence(model, tokenizer, calibration_texts(ctx, tokenizer)) if derive.strategy == "importance" else None
    indices = keep_layer_indices(total, derive.keep_layers, derive.strategy, importance)
    log.info("student: keeping %d of %d layers (%s); dropped %s", len(indices), total, derive.strategy,
             sorted(set(range(total)) - set(indices)))
    prune_layers(model, indices)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "kept_layers.txt").write_text(" ".join(map(str, indices)) + "\n")
    (tmp / "layer_importance.json").write_text(json.dumps(
        {"strategy": derive.strategy, "block_influence": importance, "kept": indices}, indent=1))
    write_manifest(tmp, stage=BASE_STAGE, config=provenance)
    shutil.rmtree(target, ignore_errors=True)  # a base pruned for other settings, or unfinished
    tmp.rename(target)
    return str(target)
