"""Log-likelihood scoring with the real SmolLM2-135M-Instruct, checked against a plain forward pass."""
import pytest
import torch

from meddistill.data import MedicalRecord
from meddistill.evaluation import evaluate
from meddistill.evaluation.loglik import context_and_continuations, score_choices
from meddistill.prompts.render import render_prompt

RECORDS = [
    MedicalRecord("ynm", "Is aspirin used to reduce fever?", None,
                  "Aspirin is a drug that lowers fever and relieves mild pain.", "yes", "yes_no_maybe", "t"),
    MedicalRecord("mc", "Which organ pumps blood through the body?",
                  {"A": "Liver", "B": "Heart", "C": "Kidney"}, None, "B", "multiple_choice", "t"),
    MedicalRecord("open", "What is a fever?", None, None, "A high body temperature.", "open", "t"),
]


@pytest.fixture(scope="module")
def smollm2():
    from meddistill.modelsource import load_model

    return load_model("builtin:smollm2-135m-instruct")


def _independent_logprob(model, tok, record, label):
    """Sum of log P(continuation tokens | context), from one unbatched, unpadded forward pass."""
    context = render_prompt(record, tok, "plain") + "Final answer:"
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(" " + label, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(logprobs[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))


def test_context_and_continuations_follow_the_template(smollm2):
    _, tok = smollm2
    context, conts = context_and_continuations(RECORDS[0], tok, "plain")
    assert context.endswith("<|im_start|>assistant\nFinal answer:")  # trailing space moved to the continuation
    assert conts == [("yes", " yes"), ("no", " no"), ("maybe", " maybe")]
    context, conts = context_and_continuations(RECORDS[1], tok, "r1")
    assert context.endswith("assistant\n<think>\n\n</think>\n\nFinal answer:")
    assert [c for _, c in conts] == [" A", " B", " C"]


def test_loglik_picks_the_option_with_the_larger_summed_logprob(smollm2):
    model, tok = smollm2
    closed = RECORDS[:2]
    expected = [{label: _independent_logprob(model, tok, r, label)
                 for label in (sorted(r.options) if r.options else ["yes", "no", "maybe"])} for r in closed]
    # one row per option, right-padded in one batch: the path for multi-token continuations
    separate = score_choices(model, tok, closed, style="plain", batch_size=6, share_context=False)
    for want, got in zip(expected, separate):
        assert got.logprobs == pytest.approx(want, abs=2e-3) and got.predicted == max(want, key=want.get)
    # single-token options share one forward pass of the context (evaluate's default path)
    result = evaluate(model, tok, RECORDS, scoring="loglik", batch_size=8, progress=False)
    assert result.n == 2 and [q.id for q in result.questions] == ["ynm", "mc"]  # open skipped
    for want, q in zip(expected, result.questions):
        assert q.option_logprobs == pytest.approx(want, abs=2e-3)
    assert [q.predicted for q in result.questions] == [max(w, key=w.get) for w in expected]
    assert result.correct == sum(q.predicted == r.answer for q, r in zip(result.questions, closed))
    # acc_norm divides by characters: " maybe" (6) vs " no" (3) can flip the choice, letters cannot
    for q, w in zip(result.questions, expected):
        assert q.correct_norm == (max(w, key=lambda k: w[k] / (len(k) + 1)) == q.gold)



class _SplitMaybe:
    """SmolLM2's tokenizer, except that " maybe" is two tokens (" may" + "be"), as in tokenizers
    that split it: the path where a continuation has several positions."""

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        if text == " maybe":
            ids = self._tok(" may", **kwargs)["input_ids"] + self._tok("be", add_special_tokens=False)["input_ids"]
            return {"input_ids": ids}
        return self._tok(text, **kwargs)


def test_multi_token_options_are_scored_at_every_continuation_position(smollm2):
    """The LM head runs only where a continuation token is predicted (logits_to_keep): with a
    two-token option, rows of different lengths in one batch, every position must map back."""
    model, real = smollm2
    tok = _SplitMaybe(real)
    assert len(tok(" maybe", add_special_tokens=False)["input_ids"]) == 2
    expected = [{label: _independent_logprob(model, tok, r, label) for label in ("yes", "no", "maybe")}
                for r in (RECORDS[0], SHORT)]
    got = score_choices(model, tok, [RECORDS[0], SHORT], style="plain", batch_size=6)
    for want, score in zip(expected, got):
        assert score.logprobs == pytest.approx(want, abs=2e-3)
        assert score.predicted == max(want, key=want.get)


SHORT = MedicalRecord("short", "Is water wet?", None, None, "yes", "yes_no_maybe", "t")
