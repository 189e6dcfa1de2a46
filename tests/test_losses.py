"""Distillation losses, numerically: KL, cached top-k KL, ULD, and LoRA-only gradients."""
from __future__ import annotations

import pytest
import torch

from meddistill.jobs import losses

V = 300


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(7, V)
    assert losses.kl_full(logits, logits.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    ids, logprobs = losses.topk_teacher(logits, 20)
    # Same distribution, cached top-k: renormalised teacher vs the student's full-vocab probs
    # differs only by the tail mass term, which vanishes as k -> V.
    ids_all, logprobs_all = losses.topk_teacher(logits, V)
    assert losses.kl_topk(logits, ids_all, logprobs_all, 1.0).item() == pytest.approx(0.0, abs=2e-3)
    assert losses.kl_full(logits, torch.randn(7, V), 2.0).item() > 0.01


def test_kl_is_positive_and_grows_with_distance():
    student = torch.randn(5, V)
    near, far = student + 0.1 * torch.randn(5, V), student + 2.0 * torch.randn(5, V)
    assert 0 < losses.kl_full(student, near, 1.0) < losses.kl_full(student, far, 1.0)


def test_cached_topk_matches_online_when_k_covers_the_vocabulary():
    student, teacher = torch.randn(9, V), torch.randn(9, V)
    ids, logprobs = losses.topk_teacher(teacher, V)
    online = losses.kl_full(student, teacher, 2.0)
    # fp16 log-probs in the cache: relative error ~1e-3 of |log p| (~6), summed over p -> < 1e-2
    assert losses.kl_topk(student, ids, logprobs, 2.0).item() == pytest.approx(online.item(), abs=1e-2)


def test_cached_topk_bound_on_a_peaked_teacher():
    """Bound: with the teacher's top-k holding all but eps of its tempered mass, the cached loss
    differs from the online one by at most eps*(max |log q| + 1) + fp16 error; here eps < 1e-3."""
    torch.manual_seed(0)
    student = torch.randn(16, V)
    teacher = torch.randn(16, V)
    teacher[:, :20] += 24.0  # a confident teacher: 20 tokens hold nearly all the mass
    ids, logprobs = losses.topk_teacher(teacher, 20)
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher / temperature, -1)
        eps = (1 - p.topk(20, -1).values.sum(-1)).max().item()
        assert eps < 1e-3
        log_q = torch.log_softmax(student / temperature, -1)
        bound = eps * (log_q.abs().max().item() + 1) + 1e-2
        diff = abs(losses.kl_topk(student, ids, logprobs, temperature).item() - losses.kl_full(student, teacher, temperature).item())
        assert diff <= bound, (temperature, diff, bound)


def test_uld_zero_for_identical_sorted_distributions_positive_otherwise():
    logits = torch.randn(6, V)
    probs = torch.softmax(logits, -1).topk(10, -1).values
    assert losses.uld(logits, probs).item() == pytest.approx(0.0, abs=1e-6)
    # A permuted vocabulary (another tokenizer's ids) has the same sorted vector: still zero.
    assert losses.uld(logits[:, torch.randperm(V)], probs).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.uld(torch.randn(6, V) * 3, probs).item() > 0.05


def test_distillation_loss_weights():
    ce, kd = torch.tensor(2.0), torch.tensor(0.5)
    assert losses.distillation_loss(ce, kd, alpha=0.0, temperature=2.0).item() == pytest.approx(2.0)
    assert losses.distillation_loss(ce, kd, alpha=1.0, temperature=2.0).item() == pytest.approx(4 * 0.5)
    assert losses.distillation_loss(ce, kd, alpha=0.5, temperature=2.0).item() == pytest.approx(0.5 * 2.0 + 0.5 * 4 * 0.5)


def test_cross_entropy_only_counts_answer_tokens():
    logits = torch.randn(1, 5, 11)
    labels = torch.tensor([[-100, -100, -100, 3, 4]])
    expected = torch.nn.functional.cross_entropy(logits[0, 2:4], labels[0, 3:5])
    assert losses.cross_entropy(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_only_lora_parameters_receive_gradients():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    teacher = LlamaForCausalLM(config)
    ids = torch.randint(0, V, (2, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    logits = model(input_ids=ids).logits
    mask = labels[:, 1:] != -100
    with torch.no_grad():
        t = teacher(input_ids=ids).logits
    loss = losses.distillation_loss(losses.cross_entropy(logits, labels),
                                    losses.kl_full(losses.answer_logits(logits, mask), losses.answer_logits(t, mask), 2.0), 0.5, 2.0)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    # lora_B starts at zero (PEFT), so at step 0 only B's gradient is non-zero; A's is exactly 0.
    assert any("lora_B" in n and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
