"""Prompt templates (data files in templates/), question-type detection, rendering and answer extraction."""
from meddistill.prompts.detect import detect_question_type
from meddistill.prompts.extract import TRUNCATED, Extraction, extract_answer, split_reasoning
from meddistill.prompts.render import (
    STYLES,
    PromptTemplate,
    build_messages,
    get_template,
    prompt_prefills_think,
    render_prompt,
    render_target,
)

__all__ = [
    "STYLES",
    "TRUNCATED",
    "Extraction",
    "PromptTemplate",
    "build_messages",
    "detect_question_type",
    "extract_answer",
    "get_template",
    "prompt_prefills_think",
    "render_prompt",
    "render_target",
    "split_reasoning",
]
