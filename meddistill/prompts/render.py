"""Turn a MedicalRecord into chat messages, a model prompt and a training target.

The wording lives in `templates/<question_type>.yaml` (data, not code); this module only fills
them in. Two styles:
  plain  answer directly, ending with the template's final line ("Final answer: B");
  r1     DeepSeek-R1 style: reasoning inside <think>...</think>, then the same final line.
Every stage (teacher fine-tuning, distillation, evaluation, serving) renders prompts here, so
training and evaluation always see the same text.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from meddistill.data.records import QUESTION_TYPES, MedicalRecord

STYLES = ("plain", "r1")
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class PromptTemplate:
    question_type: str
    system: str
    instructions: dict[str, str]  # style -> instruction sentence(s)
    user: str  # str.format template: {context_block} {question} {options_block} {instructions}
    final_line: str  # str.format template with {answer}
    answer_pattern: str | None  # regex; group 1 is the answer


@lru_cache(maxsize=None)
def get_template(question_type: str) -> PromptTemplate:
    """The prompt template for one of QUESTION_TYPES, read from templates/<type>.yaml."""
    if question_type not in QUESTION_TYPES:
        raise ValueError(f"question_type={question_type!r} has no template; use one of {QUESTION_TYPES}")
    path = TEMPLATES_DIR / f"{question_type}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = {"system", "instructions", "user", "final_line"} - set(data)
    if missing or set(data["instructions"]) != set(STYLES):
        raise ValueError(f"{path}: needs keys system, instructions ({'/'.join(STYLES)}), user, final_line")
    return PromptTemplate(
        question_type=question_type,
        system=data["system"].strip(),
        instructions={k: v.strip() for k, v in data["instructions"].items()},
        user=data["user"],
        final_line=data["final_line"],
        answer_pattern=data.get("answer_pattern"),
    )


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style={style!r} is unknown; use one of {STYLES}")


def _letters_phrase(options: dict[str, str] | None) -> str:
    letters = sorted(options) if options else ["A", "B", "C", "D"]
    return ", ".join(letters[:-1]) + " or " + letters[-1] if len(letters) > 1 else letters[0]


def build_messages(record: MedicalRecord, style: str = "plain") -> list[dict[str, str]]:
    """System + user chat messages for a record (no assistant turn)."""
    _check_style(style)
    template = get_template(record.question_type)
    context_block = f"Context:\n{record.context.strip()}\n\n" if record.context else ""
    options_block = "\n".join(f"{k}. {v}" for k, v in sorted((record.options or {}).items()))
    instructions = template.instructions[style].replace("{letters}", _letters_phrase(record.options))
    user = template.user.format(
        context_block=context_block,
        question=record.question.strip(),
        options_block=options_block,
        instructions=instructions,
    )
    return [{"role": "system", "content": template.system}, {"role": "user", "content": user.strip()}]


def render_prompt(record: MedicalRecord, tokenizer: Any, style: str = "plain") -> str:
    """The generation prompt as text, through the tokenizer's chat template.

    Tokenizers without a chat template (e.g. a GGUF base model) get a plain-text fallback; chat
    templates that reject a system role (some Gemma versions) get the system text folded into
    the user turn.
    """
    messages = build_messages(record, style)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return render_fallback(messages)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja raises plain exceptions for "system role not supported"
        merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


def ends_with_open_think(prompt: str) -> bool:
    """True when the prompt's last <think> is not closed: the model continues inside its reasoning."""
    lowered = prompt.lower()
    return lowered.rfind("<think>") > lowered.rfind("</think>")


def prompt_prefills_think(tokenizer: Any, style: str = "r1") -> bool:
    """Whether the tokenizer's chat template opens <think> itself (DeepSeek-R1 and its distilled
    models end the generation prompt with "<think>\n"), so generations have no opening tag and an
    answer without </think> was cut off. Checked on a rendered probe prompt."""
    probe = MedicalRecord("probe", "Is this a probe?", None, None, None, "open", "probe")
    return ends_with_open_think(render_prompt(probe, tokenizer, style))


def render_fallback(messages: list[dict[str, str]]) -> str:
    """A neutral text prompt for tokenizers that carry no chat template."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


def render_target(record: MedicalRecord, style: str = "plain", reasoning: str | None = None) -> str:
    """The supervised completion for training: [<think>reasoning</think>] + final answer line.

    For open questions the final "line" is the reference answer text itself. In r1 style a record
    without reasoning gets an empty think block, so every r1 target has the same shape.
    """
    _check_style(style)
    if record.answer is None or not str(record.answer).strip():
        raise ValueError(f"record {record.id!r} has no answer; it cannot be a training target")
    template = get_template(record.question_type)
    final = template.final_line.format(answer=str(record.answer).strip())
    if style == "plain":
        return final
    thought = (reasoning if reasoning is not None else record.reasoning) or ""
    return f"<think>\n{thought.strip()}\n</think>\n\n{final}"
