"""The wire format: OpenAI-compatible request bodies, the medical endpoint's body, and error bodies.

Requests are parsed here (not by FastAPI) so every bad input, malformed JSON included, gets an
OpenAI-style `{"error": {"message", "type", "param", "code"}}` body with a 4xx status.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered as OpenAI does: a status and `{"error": {...}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    # Clients send fields we do not use (user, logprobs=False, ...): ignore them, like OpenAI.
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)  # greedy by default: medical answers should be reproducible
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (benchmarks)

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for /v1/completions

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise APIError(400, f"prompt: {len(self.prompt)} prompts given; send one prompt per request",
                           param="prompt")
        return self.prompt[0]


class MedicalAnswerRequest(_Request):
    question: str = Field(..., min_length=1)
    options: dict[str, str] | None = None
    context: str | None = None
    question_type: Literal["multiple_choice", "yes_no_maybe", "open", "case_diagnosis", "medication"] | None = None
    style: Literal["plain", "r1"] | None = None
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """Validate a JSON body; any problem becomes a 400 naming the field."""
    try:
        data = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body is a JSON {type(data).__name__}; send a JSON object",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        value = first.get("input")
        shown = "" if first["type"] == "missing" else f" (got {json.dumps(value, default=str)[:80]})"
        raise APIError(400, f"{param}: {first['msg']}{shown}", param=param, code="invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"data: {payload}\n\n".encode()
