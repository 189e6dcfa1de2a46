"""Serving replicas load pvc:// and s3:// model artifacts through one function (both engines), and
refuse an artifact whose files no longer match its manifest. s3 runs against moto's S3 server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from meddistill import artifacts
from meddistill.serve.model_source import ModelArtifactError, local_model_dir
from tests.test_artifacts_s3 import bucket, s3_endpoint  # noqa: F401 - the moto fixtures


def tiny_model(directory: Path) -> Path:
    """A real (random, 2-layer) Llama checkpoint with a word-level tokenizer, as the quantize stage's artifact."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "what", "is", "hypertension", "?", "high", "blood", "pressure"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    artifacts.write_manifest(directory, stage="quantize", config={"method": "none"})
    return directory


def generates(path: Path) -> bool:
    import torch

    from meddistill.modelsource import load_model

    model, tok = load_model(path)
    ids = tok("what is hypertension ?", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    return out.shape[1] > ids.shape[1]


def test_pvc_source_is_the_claims_mount_and_a_tampered_file_is_refused(tmp_path, monkeypatch):
    root = tmp_path / "pvc"
    monkeypatch.setenv(artifacts.PVC_ROOT_ENV, str(root))  # what the operator sets in every pod
    stage = tiny_model(root / "models" / "runs" / "job" / "quantize")
    path = local_model_dir("pvc://models/runs/job/quantize")
    assert path == stage and generates(path)

    (stage / "config.json").write_text(json.dumps({**json.loads((stage / "config.json").read_text()), "num_hidden_layers": 1}))
    with pytest.raises(ModelArtifactError, match="does not match the sha256"):
        local_model_dir("pvc://models/runs/job/quantize")
    with pytest.raises(ModelArtifactError, match="must be mounted at"):
        local_model_dir("pvc://other-claim/runs/job/quantize")


def test_s3_source_is_fetched_verified_and_refused_when_changed(bucket, tmp_path, monkeypatch):  # noqa: F811
    import boto3

    uri = f"s3://{bucket}/runs/job/quantize"
    artifacts.ArtifactStore(uri).publish(tiny_model(tmp_path / "published"))
    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "replica-cache"))  # the replica's own node
    path = local_model_dir(uri)
    assert str(path).startswith(str(tmp_path / "replica-cache")) and generates(path)

    # Someone replaces the weights in the bucket after publication: a replica on a fresh node refuses
    # them (the first replica's cached copy still matches the manifest, so it is kept, not re-fetched).
    boto3.client("s3").put_object(Bucket=bucket, Key="runs/job/quantize/model.safetensors", Body=b"not the model")
    assert local_model_dir(uri) == path
    monkeypatch.setenv("MEDDISTILL_CACHE", str(tmp_path / "new-replica-cache"))
    with pytest.raises(ModelArtifactError, match="do not match the sha256s"):
        local_model_dir(uri)
    with pytest.raises(ModelArtifactError, match="no manifest.json"):
        local_model_dir(f"s3://{bucket}/runs/job/never-published")
