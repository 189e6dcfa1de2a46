"""The gguf format on the tiny random Llama: our HF -> GGUF converter, llama.cpp's quantizer, the
quantize stage's artifact (manifest), and the same model answering in llama.cpp as in transformers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import llama_cpp  # noqa: E402,F401 - a core dependency: missing is a failure, never a skip

from meddistill.jobs.hf_to_gguf import ConversionError, hf_to_gguf  # noqa: E402
from meddistill.jobs.quantize_gguf import gguf_weight_bytes, quantize_file  # noqa: E402
from meddistill.llamacpp_model import LlamaCppModel, Row  # noqa: E402

PROMPT = [1, 504, 3458, 314, 253, 1345, 30, 216, 892, 2133, 28]


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with 8x q/k weights: its attention is peaked, so a wrong rotary layout (or
    position) changes the logits; at the random init's scale attention is almost uniform and hides it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    target = tmp_path_factory.mktemp("sharp") / "tiny-sharp"
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def f16_gguf(sharp_model_dir, tmp_path_factory) -> Path:
    return hf_to_gguf(sharp_model_dir, tmp_path_factory.mktemp("gguf") / "model-F16.gguf")


@pytest.fixture(scope="module")
def hf_logits(sharp_model_dir) -> np.ndarray:
    """transformers' logits at every position of PROMPT (fp32): the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32)
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0].numpy()


def test_converted_model_computes_what_transformers_computes(f16_gguf, hf_logits):
    """Every position's logits in llama.cpp match transformers' (f16 weights): the q/k permutation,
    RoPE, GQA and tied embeddings are written as llama.cpp reads them."""
    model = LlamaCppModel(f16_gguf, n_ctx=64, n_seq_max=1, threads=1)
    [ours] = model.decode([Row(0, PROMPT, 0, all_logits=True)])
    theirs = hf_logits
    assert ours.shape == theirs.shape
    # f16 weights: close, and far closer than the positions are to each other (attention matters)
    error = np.abs(ours - theirs).max()
    assert error < 1e-2 * np.abs(theirs).max()
    assert error < 0.1 * np.abs(theirs[1:] - theirs[:-1]).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M", "Q4_0"])
def test_quantized_file_is_smaller_and_close(f16_gguf, hf_logits, tmp_path, gguf_type):
    target = tmp_path / f"model-{gguf_type}.gguf"
    quantize_file(f16_gguf, target, gguf_type, threads=1)
    assert gguf_weight_bytes(target) < 0.6 * gguf_weight_bytes(f16_gguf)
    model = LlamaCppModel(target, n_ctx=64, n_seq_max=1, threads=1)
    [ours] = model.decode([Row(0, PROMPT, 0)])
    theirs = hf_logits[-1]
    assert np.corrcoef(ours[0], theirs)[0, 1] > (0.999 if gguf_type == "Q8_0" else 0.98)
    assert model.weight_bytes() == gguf_weight_bytes(target)


def test_sequences_in_one_decode_do_not_see_each_other(f16_gguf):
    """Three prompts decoded together give each the logits it gets alone (separate KV streams)."""
    prompts = [PROMPT, PROMPT[:5], [1, 77, 78, 79]]
    alone = [LlamaCppModel(f16_gguf, n_ctx=64, n_seq_max=1, threads=1).decode([Row(0, p, 0)])[0] for p in prompts]
    model = LlamaCppModel(f16_gguf, n_ctx=64, n_seq_max=3, threads=1)
    together = model.decode([Row(s, p, 0) for s, p in enumerate(prompts)])
    assert model.decode_calls == 1
    for a, t in zip(alone, together):
        np.testing.assert_allclose(a, t, atol=1e-3 * np.abs(a).max())



def test_rows_out_of_sequence_order_reach_llama_cpp_sorted_and_keep_their_logits(f16_gguf):
    """The engine hands freed sequence ids out in any order; llama.cpp steps a batch whose rows are
    not in sequence-id order up to 4x slower (a non-unified cache is split per sequence), so decode
    sorts them, and each row must still get its own logits back."""
    prompts = [PROMPT, PROMPT[:5], [1, 77, 78, 79]]
    alone = [LlamaCppModel(f16_gguf, n_ctx=64, n_seq_max=1, threads=1).decode([Row(0, p, 0)])[0] for p in prompts]
    model = LlamaCppModel(f16_gguf, n_ctx=64, n_seq_max=3, threads=1)
    seqs = [2, 0, 1]  # row i is sequence seqs[i]
    together = model.decode([Row(s, p, 0) for s, p in zip(seqs, prompts)])
    for a, t in zip(alone, together):
        np.testing.assert_allclose(a, t, atol=1e-3 * np.abs(a).max())
    sent = [model.batch.seq_id[k][0] for k in range(model.batch.n_tokens)]  # the batch llama_decode last got
    assert sent == sorted(sent) and set(sent) == {0, 1, 2}
    # and the next step (one token per row, rows again out of order) continues each sequence
    step = model.decode([Row(s, [9], len(p)) for s, p in zip(seqs, prompts)])
    ref = [LlamaCppModel(f16_gguf, n_ctx=64, n_seq_max=1, threads=1).decode([Row(0, p + [9], 0)])[0] for p in prompts]
    for a, t in zip(ref, step):
        np.testing.assert_allclose(a, t, atol=1e-3 * np.abs(a).max())

def test_architectures_llama_cpp_would_compute_wrongly_are_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "gpt"
    folder.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ConversionError, match="quantization.formats gguf: the student is a GPTNeoXForCausalLM"):
        hf_to_gguf(folder, tmp_path / "x.gguf")
