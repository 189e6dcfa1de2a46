"""Distillation losses, numerically: KL, cached top-k KL, ULD, and LoRA-only gradients."""
from __future__ import annotations

import pytest
import torch

from meddistill.jobs import losses

V = 300


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(7, V)
    assert losses.kl_full(logits, logits.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.kl_full(logits, torch.randn(7, V), 2.0).item() > 0.01


def test_kl_is_positive_and_grows_with_distance():
    student = torch.randn(5, V)
    near, far = student + 0.1 * torch.randn(5, V), student + 2.0 * torch.randn(5, V)
    assert 0 < losses.kl_full(student, near, 1.0) < losses.kl_full(student, far, 1.0)


def test_cached_topk_matches_online_when_k_covers_the_vocabulary():
    student, teacher = torch.randn(9, V), torch.randn(9, V)
    online = losses.kl_full(student, teacher, 2.0)
    ids, buckets = losses.topk_teacher(teacher, V, 2.0)
    # fp16 log-probs in the cache: relative error ~1e-3 of |log p| (~6), summed over p -> < 1e-2
    assert losses.kl_topk(student, ids, buckets, 2.0).item() == pytest.approx(online.item(), abs=1e-2)


def test_cached_topk_bound_on_a_peaked_teacher():
    """Bound: with the teacher's top-k holding all but eps of its tempered mass, the cached loss
    differs from the online one by at most eps*(max |log q| + 1) + fp16 error; here eps < 1e-3."""
    torch.manual_seed(0)
    student = torch.randn(16, V)
    teacher = torch.randn(16, V)
    teacher[:, :20] += 24.0  # a confident teacher: 20 tokens hold nearly all the mass
    for temperature in (1.0, 2.0):
        ids, buckets = losses.topk_teacher(teacher, 20, temperature)
        p = torch.softmax(teacher / temperature, -1)
        eps = (1 - p.topk(20, -1).values.sum(-1)).max().item()
        assert eps < 1e-3
        log_q = torch.log_softmax(student / temperature, -1)
        bound = eps * (log_q.abs().max().item() + 1) + 1e-2
        diff = abs(losses.kl_topk(student, ids, buckets, temperature).item() - losses.kl_full(student, teacher, temperature).item())
        assert diff <= bound, (temperature, diff, bound)


VOCAB = 49_152  # SmolLM2's vocabulary


def flat_tailed_logits(rows: int, seed: int) -> torch.Tensor:
    """Logits with a heavy tail: Gumbel noise over the whole vocabulary plus a few favoured tokens,
    so at T = 2 the top 20 hold well under half of the tempered mass (as real LM logits do)."""
    g = torch.Generator().manual_seed(seed)
    logits = -torch.log(-torch.log(torch.rand(rows, VOCAB, generator=g)))  # standard Gumbel
    favoured = torch.randint(0, VOCAB, (rows, 5), generator=g)
    return logits.scatter_add(-1, favoured, torch.full((rows, 5), 6.0))


def test_cached_topk_of_a_perfect_student_is_zero_on_a_flat_tailed_teacher():
    teacher = flat_tailed_logits(12, seed=0)
    ids, buckets = losses.topk_teacher(teacher, 20, 2.0)
    top_mass = buckets[:, :20].float().exp().sum(-1)
    assert top_mass.max() < 0.5  # the tail matters: renormalising over the top 20 would be far off
    kd = losses.kl_topk(teacher.clone(), ids, buckets, 2.0)
    assert abs(kd.item()) < 1e-3, kd


def test_cached_topk_is_positive_and_bounded_by_the_full_kl():
    """Merging tokens into buckets can only lose information (data-processing inequality):
    0 < bucketed KL <= full KL, for near and far students alike."""
    teacher = flat_tailed_logits(12, seed=1)
    ids, buckets = losses.topk_teacher(teacher, 20, 2.0)
    for scale in (0.3, 1.0, 3.0):
        student = teacher + scale * torch.randn(teacher.shape, generator=torch.Generator().manual_seed(2))
        bucketed = losses.kl_topk(student, ids, buckets, 2.0).item()
        full = losses.kl_full(student, teacher, 2.0).item()
        assert 0 < bucketed <= full + 1e-4, (scale, bucketed, full)


def test_cached_topk_gradient_moves_the_student_toward_the_teacher():
    teacher = flat_tailed_logits(8, seed=3)
    ids, buckets = losses.topk_teacher(teacher, 20, 2.0)
    student = (teacher + torch.randn(teacher.shape, generator=torch.Generator().manual_seed(4))).requires_grad_()
    before = losses.kl_full(student.detach(), teacher, 2.0).item()
    losses.kl_topk(student, ids, buckets, 2.0).backward()
    with torch.no_grad():
        student -= 50.0 * student.grad  # one SGD step (per-row gradients are ~1/V small)
    after = losses.kl_full(student.detach(), teacher, 2.0).item()
    assert after < before, (before, after)


def test_cached_topk_of_the_real_model_copying_itself_is_zero(real_answer_logits):
    """SmolLM2-135M's own logits on a medical sentence as teacher and student (the issue's case)."""
    ids, buckets = losses.topk_teacher(real_answer_logits, 20, 2.0)
    assert abs(losses.kl_topk(real_answer_logits, ids, buckets, 2.0).item()) < 1e-3


@pytest.fixture(scope="module")
def real_answer_logits():
    from meddistill.modelsource import load_model

    model, tokenizer = load_model("builtin:smollm2-135m-instruct", dtype="float32")
    text = "Metformin lowers blood glucose by reducing hepatic gluconeogenesis in type 2 diabetes."
    with torch.no_grad():
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
    return logits


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
