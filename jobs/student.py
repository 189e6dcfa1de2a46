"""The student's base model: its own weights, or the fine-tuned teacher with layers removed.

Layer pruning follows Minitron (Muralidharan et al. 2024) in its simplest, depth-only form:
keep `keepLayers` decoder layers, either evenly spaced (always the first and the last, which
carry the embedding- and output-facing features) or the first N. The result is saved as a plain
model directory so every worker and every later stage loads the same base.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def keep_layer_indices(total: int, keep: int, strategy: str) -> list[int]:
    """Indices of the decoder layers a derived student keeps."""
    if keep > total:
        raise ValueError(f"spec.student.derive.keepLayers={keep} exceeds the teacher's {total} layers; use <= {total}")
    if strategy == "first" or keep == total:
        return list(range(keep))
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


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


def materialize_student_base(ctx, teacher_model_dir: Path, target: Path) -> str:
    """The student's base as a model source: spec.student.model, or a pruned copy of the teacher."""
    student = ctx.spec.student
    if student.model is not None:
        return student.model
    if (target / "config.json").is_file():
        return str(target)
    from meddistill.modelsource import load_model

    model, tokenizer = load_model(str(teacher_model_dir), dtype="float32")
    indices = keep_layer_indices(model.config.num_hidden_layers, student.derive.keep_layers, student.derive.strategy)
    prune_layers(model, indices)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "kept_layers.txt").write_text(" ".join(map(str, indices)) + "\n")
    tmp.rename(target)
    return str(target)
