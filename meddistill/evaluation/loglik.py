"""Log-likelihood scoring of closed questions, with lm-evaluation-harness's `acc` / `acc_norm` definitions.

For a record with options (letters) or a yes/no/maybe question, every option is scored as a
continuation of one context:

    context      = the rendered generation prompt (chat template, as in generative mode)
                   + the start of the training target up to the answer: "Final answer:" in plain
                   style, "<think>\\n\\n</think>\\n\\nFinal answer:" in r1 style (render_target
                   with an empty reasoning; its <think> is dropped when the chat template already
                   opened one), so the model is asked exactly what training taught it.
    continuation = " " + the option label: " A" ... " E", or " yes" / " no" / " maybe".

As lm-eval does, trailing whitespace moves from the context to the continuation, context and
continuation are tokenized separately and their ids concatenated (no merge across the boundary),
and the score is the sum of the continuation tokens' log-probabilities. `acc` takes the argmax of
that sum; `acc_norm` the argmax of the sum divided by the continuation's length in characters.
When every option of a record is a single token (letters usually are), one forward pass scores
them all, as lm-eval's grouping does; otherwise each option is its own row of a padded batch.

lm-evaluation-harness itself (PyPI `lm-eval` 0.4.x) was not added: it requires `datasets`,
`evaluate`, `scikit-learn`, `sacrebleu`, `rouge-score` and more, and loads its tasks through
`datasets`, which is too heavy for this package for one scoring rule we can match in 100 lines.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

from meddistill.data.records import YES_NO_MAYBE, MedicalRecord
from meddistill.modelsource import input_device
from meddistill.prompts.render import ends_with_open_think, render_prompt, render_target

_SENTINEL = "\x00ANSWER\x00"


@dataclass(frozen=True)
class ChoiceScore:
    predicted: str  # argmax of summed log-prob (acc)
    predicted_norm: str  # argmax of log-prob per character (acc_norm)
    logprobs: dict[str, float]  # option -> summed continuation log-prob


def option_labels(record: MedicalRecord) -> list[str]:
    """The labels scored for a record: its option letters, or yes/no/maybe."""
    if record.options:
        return sorted(record.options)
    if record.question_type == "yes_no_maybe":
        return list(YES_NO_MAYBE)
    raise ValueError(f"record {record.id!r} ({record.question_type}) has no options to score by log-likelihood")


def context_and_continuations(record: MedicalRecord, tokenizer: Any, style: str) -> tuple[str, list[tuple[str, str]]]:
    """(context, [(label, continuation), ...]) after moving trailing whitespace, as lm-eval does."""
    prompt = render_prompt(record, tokenizer, style)
    target = render_target(dataclasses.replace(record, answer=_SENTINEL), style, reasoning="")
    if ends_with_open_think(prompt) and target.startswith("<think>"):  # the template opened it already
        target = target[len("<think>"):].lstrip(" ")
    context = prompt + target[: target.index(_SENTINEL)]
    stripped = context.rstrip()
    moved = context[len(stripped):]
    return stripped, [(label, moved + label) for label in option_labels(record)]


def score_choices(model: Any, tokenizer: Any, records: Sequence[MedicalRecord], *, style: str,
                  batch_size: int, share_context: bool = True) -> list[ChoiceScore]:
    """One ChoiceScore per record, in order; batched forward passes of up to batch_size rows.

    share_context=False gives every option its own row even when all are single tokens (same
    numbers, more compute: the tests compare the two paths).
    """
    import torch  # noqa: PLC0415

    add_special = not getattr(tokenizer, "chat_template", None)  # as in generation: chat templates add BOS
    # A row is (record index, token ids, [(label, first continuation position, continuation ids)]).
    rows: list[tuple[int, list[int], list[tuple[str, int, list[int]]]]] = []
    chars: list[dict[str, int]] = []  # label -> continuation length in characters (acc_norm)
    for i, record in enumerate(records):
        context, conts = context_and_continuations(record, tokenizer, style)
        chars.append({label: len(text) for label, text in conts})
        ctx_ids = tokenizer(context, add_special_tokens=add_special)["input_ids"]
        cont_ids = [(label, tokenizer(text, add_special_tokens=False)["input_ids"]) for label, text in conts]
        if share_context and all(len(ids) == 1 for _, ids in cont_ids):
            rows.append((i, ctx_ids, [(label, len(ctx_ids), ids) for label, ids in cont_ids]))
        else:
            rows += [(i, ctx_ids + ids, [(label, len(ctx_ids), ids)]) for label, ids in cont_ids]

    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sums: list[dict[str, float]] = [{} for _ in records]
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][1]))
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [rows[r] for r in order[start:start + batch_size]]
            width = max(len(ids) for _, ids, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, (_, row_ids, _) in enumerate(batch):  # right padding: positions stay 0..len-1
                ids[b, : len(row_ids)] = torch.tensor(row_ids)
                mask[b, : len(row_ids)] = 1
            # token cont[k] sits at position first + k and is predicted from position first + k - 1: the
            # LM head runs on those positions only (logits_to_keep), not on every prompt token
            keep = sorted({first - 1 + k for _, _, targets in batch for _, first, cont in targets for k in range(len(cont))})
            column = {position: j for j, position in enumerate(keep)}
            # The positions stay on the CPU: with a model split over GPUs (accelerate's device_map) the final
            # hidden states they index are on the last GPU, not on the embedding's; a CPU index works on any.
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           logits_to_keep=torch.tensor(keep)).logits
            for b, (i, _, targets) in enumerate(batch):
                for label, first, cont in targets:
                    at = [column[first - 1 + k] for k in range(len(cont))]
                    logprobs = torch.log_softmax(logits[b, at].float(), -1)
                    picked = logprobs.gather(-1, torch.tensor(cont, device=logprobs.device)[:, None])
                    sums[i][label] = float(picked.sum())
            del logits

    return [
        ChoiceScore(predicted=max(length, key=lambda k: by_label[k]),
                    predicted_norm=max(length, key=lambda k: by_label[k] / length[k]), logprobs=by_label)
        for by_label, length in zip(sums, chars)
    ]
