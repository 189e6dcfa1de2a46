"""The Ray Serve app: `build_app(args)`, the one import path for `serve run` and RayService.

`args` is `meddistill.serve.config.app_args(job, model_uri)`, validated once into `args.ServeArgs`
(an unknown or bad key fails here, its path named). Three engines behind it:
  vllm          Ray Serve LLM (`ray.serve.llm.build_openai_app`): vLLM's continuous batching,
                FlashAttention and 4-bit weights on GPU, configured from our spec, not re-implemented.
  transformers  our `MedDistillServer` deployment below, around `engine.TransformersEngine`
                (CPU and edge): the OpenAI API plus the medical endpoint.
  llamacpp      the same deployment around `llamacpp_engine.LlamaCppEngine`: the gguf format on CPU.

Endpoints (transformers and llamacpp engines): GET /v1/models, POST /v1/chat/completions, POST /v1/completions
(both with SSE streaming and usage), POST /v1/medical/answer, GET /health (no auth).
"""
# No `from __future__ import annotations`: FastAPI must see `Request` as a class, not a string.
import asyncio
import importlib.util
import logging
import os
import threading
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from meddistill.serve import protocol as P
from meddistill.serve.args import ServeArgs
from meddistill.serve.auth import MISSING, authorized, expected_digest
from meddistill.serve.config import DEPLOYMENT_NAME, pick_engine_here

# A child of Ray Serve's logger, so lines land in the replica log with the request id.
log = logging.getLogger("ray.serve").getChild("meddistill")
api = FastAPI(title="MedDistill", description="OpenAI-compatible API and medical QA endpoint")


@api.exception_handler(P.APIError)
async def _api_error(_: Request, err: P.APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def replica_device(cuda_available: bool) -> tuple[str, str]:
    """(device, dtype) of the transformers engine: bf16 on a GPU, fp32 on CPU (bf16 matmuls are slow there)."""
    return ("cuda", "bfloat16") if cuda_available else ("cpu", "float32")


def with_system_prompt(messages: list[dict], system: str) -> list[dict]:
    """`messages` led by `system` when the client sent no system message of its own (and system != "")."""
    if not system or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system}, *messages]


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class MedDistillServer:
    """One replica: the student model behind a continuous-batching engine."""

    def __init__(self, args: ServeArgs):
        import torch

        from meddistill.modelsource import load_model
        from meddistill.serve.engine import TransformersEngine
        from meddistill.serve.metrics import ServeMetrics
        from meddistill.serve.model_source import local_model_dir

        self.model_name = args.model_name
        self.prompt_style = args.prompt_style
        self.log_prompts = args.log_prompts
        self.chat_system = args.chat_system_prompt
        self.token_digest = expected_digest() if args.require_auth else None
        if args.require_auth and not self.token_digest:
            raise RuntimeError(MISSING)
        # Resolved here, in the replica: its PVC mount, its cache, its GPU (Ray gives one when reserved).
        path = local_model_dir(args.model_source, gguf=args.engine == "llamacpp")
        if args.engine == "llamacpp":  # the gguf format (serve/llamacpp_engine.py)
            from meddistill.serve.llamacpp_engine import load_llamacpp_engine

            self.engine, self.tokenizer = load_llamacpp_engine(path, args)
        else:
            device, dtype = replica_device(torch.cuda.is_available())
            log.info("engine transformers: %s from %s on %s (%s)", args.model_source, path, device, dtype)
            model, self.tokenizer = load_model(path, dtype=dtype, device=device)
            self.engine = TransformersEngine(
                model, self.tokenizer, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                max_waiting=args.waiting_limit, num_threads=args.num_threads, stream_interval=args.stream_interval or 1,
            )
        self.metrics = ServeMetrics(self.model_name)
        threading.Thread(target=self._report_engine_metrics, daemon=True).start()

    def _report_engine_metrics(self) -> None:
        last_tokens, last_time = 0, time.monotonic()
        while True:
            time.sleep(2.0)
            tokens, now = self.engine.generated_tokens, time.monotonic()
            self.metrics.engine_state(self.engine.queue_length, self.engine.running,
                                      (tokens - last_tokens) / (now - last_time))
            last_tokens, last_time = tokens, now

    # ------------------------------------------------------------------ plumbing
    def _authorize(self, request: Request) -> None:
        if self.token_digest is None:
            return
        if not authorized(request.headers.get("authorization", ""), self.token_digest):
            raise P.APIError(401, "missing or wrong bearer token: send the header 'Authorization: Bearer <token>'",
                             type="authentication_error", code="invalid_api_key")

    def _check_model(self, model: "str | None") -> None:
        if model is not None and model != self.model_name:
            raise P.APIError(404, f"model: {model!r} does not exist; this server serves {self.model_name!r}",
                             param="model", code="model_not_found")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _params(self, prompt_len: int, max_tokens: "int | None", temperature: float, top_p: float = 1.0,
                stop: tuple = (), ignore_eos: bool = False):
        from meddistill.serve.engine import GenerationParams

        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise P.APIError(400, f"messages: the prompt has {prompt_len} tokens, the model's context is {limit} "
                                  f"tokens; shorten the prompt", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = max(1, min(512, limit - prompt_len))
        if max_tokens > limit:
            raise P.APIError(400, f"max_tokens: {max_tokens} is more than the model's context of {limit} tokens; "
                                  f"use 1..{limit - prompt_len}", param="max_tokens", code="invalid_value")
        if prompt_len + max_tokens > limit:
            raise P.APIError(400, f"messages: the prompt has {prompt_len} tokens and max_tokens is {max_tokens}; "
                                  f"together more than the model's context of {limit} tokens. Shorten the prompt "
                                  f"or lower max_tokens", param="messages", code="context_length_exceeded")
        return GenerationParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                ignore_eos=ignore_eos)

    async def _start(self, kind: str, prompt: str, params) -> tuple[Any, Any, float]:
        """Submit and wait for the first chunk, so overload and errors answer before any stream starts."""
        from meddistill.serve.engine import EngineOverloaded

        started = time.perf_counter()
        if self.log_prompts:
            log.info("%s prompt: %r", kind, prompt)
        stream = self.engine.stream(self._encode(prompt), params)
        try:
            first = await stream.__anext__()
        except EngineOverloaded as err:
            self.metrics.rejected(kind)
            raise P.APIError(429, f"server over capacity: {err}; retry after a second", type="rate_limit_error",
                             code="overloaded", headers={"Retry-After": "1"}) from None
        self.metrics.first_token(kind, time.perf_counter() - started)
        return stream, first, started

    async def _collect(self, kind: str, stream, first, started: float):
        parts, last = [first.text], first
        if first.finish_reason is None:
            async for last in stream:
                parts.append(last.text)
        text = "".join(parts)
        self._finish(kind, last, started, text)
        return text, last

    def _finish(self, kind: str, last, started: float, text: str) -> None:
        elapsed = time.perf_counter() - started
        self.metrics.finished(kind, last.completion_tokens, elapsed)
        log.info("%s done: prompt_tokens=%d completion_tokens=%d finish=%s %.0f ms", kind, last.prompt_tokens,
                 last.completion_tokens, last.finish_reason, elapsed * 1000)
        if self.log_prompts:
            log.info("%s answer: %r", kind, text)

    async def _sse(self, kind: str, stream, first, started: float, chunk_body, include_usage: bool
                   ) -> AsyncIterator[bytes]:
        last, parts = first, [first.text]
        try:
            yield P.sse(chunk_body(first.text, first.finish_reason, role=True))
            if first.finish_reason is None:
                async for last in stream:
                    parts.append(last.text)
                    yield P.sse(chunk_body(last.text, last.finish_reason))
        finally:
            await stream.aclose()  # a client that disconnects frees its batch row now
        if include_usage:
            yield P.sse({**chunk_body("", None), "choices": [],
                         "usage": P.usage(last.prompt_tokens, last.completion_tokens)})
        yield P.sse("[DONE]")
        self._finish(kind, last, started, "".join(parts))

    # ------------------------------------------------------------------ endpoints
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "queue_length": self.engine.queue_length, "running": self.engine.running}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "meddistill", "max_model_len": self.engine.max_model_len}]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        body = P.parse_body(await request.body(), P.ChatCompletionRequest)
        self._check_model(body.model)
        messages = with_system_prompt(
            [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages],
            self.chat_system)
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        params = self._params(len(self._encode(prompt)), body.max_completion_tokens or body.max_tokens,
                              body.temperature, body.top_p, body.stop_list(), body.ignore_eos)
        stream, first, started = await self._start("chat", prompt, params)
        rid, created = P.new_id("chatcmpl"), P.now()
        if body.stream:
            def chunk(text, finish, role=False):
                delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse("chat", stream, first, started, chunk, include),
                                     media_type="text/event-stream")
        text, last = await self._collect("chat", stream, first, started)
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": last.finish_reason}],
                "usage": P.usage(last.prompt_tokens, last.completion_tokens)}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        body = P.parse_body(await request.body(), P.CompletionRequest)
        self._check_model(body.model)
        prompt = body.prompt_text()
        params = self._params(len(self._encode(prompt)), body.max_tokens, body.temperature, body.top_p,
                              body.stop_list(), body.ignore_eos)
        stream, first, started = await self._start("completion", prompt, params)
        rid, created = P.new_id("cmpl"), P.now()

        def chunk(text, finish, role=False):
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse("completion", stream, first, started, chunk, include),
                                     media_type="text/event-stream")
        text, last = await self._collect("completion", stream, first, started)
        return {**chunk(text, last.finish_reason), "usage": P.usage(last.prompt_tokens, last.completion_tokens)}

    @api.post("/v1/medical/answer")
    async def medical_answer(self, request: Request) -> dict:
        """A question (+ options / context) -> the template's prompt -> the parsed final answer."""
        from meddistill.data.records import MedicalRecord
        from meddistill.prompts import detect_question_type, extract_answer, render_prompt

        self._authorize(request)
        body = P.parse_body(await request.body(), P.MedicalAnswerRequest)
        self._check_model(body.model)
        question_type = body.question_type or detect_question_type(body.question, body.options, body.context)
        try:
            record = MedicalRecord(id="request", question=body.question, options=body.options, context=body.context,
                                   answer=None, question_type=question_type, source="api")
        except ValueError as err:
            raise P.APIError(400, f"options: {err}", param="options", code="invalid_value") from None
        style = body.style or self.prompt_style
        prompt = render_prompt(record, self.tokenizer, style)
        params = self._params(len(self._encode(prompt)), body.max_tokens, body.temperature)
        stream, first, started = await self._start("medical", prompt, params)
        text, last = await self._collect("medical", stream, first, started)
        parsed = extract_answer(text, record)
        return {"model": self.model_name, "question_type": question_type, "style": style,
                "answer": parsed.answer, "reasoning": parsed.reasoning, "final_text": parsed.final_text,
                "parse_note": parsed.reason, "text": text, "finish_reason": last.finish_reason,
                "usage": P.usage(last.prompt_tokens, last.completion_tokens)}


def build_app(args: dict):
    """The Serve application for `args` (see `config.app_args`); engine `auto` is decided here.

    This runs where Serve builds the app (on the cluster, from the serving image): vllm is importable
    here exactly when it is in the replicas, and a replica that reserves GPUs always gets one.
    """
    args = ServeArgs.parse(args)
    gpu = args.deployment.gpus > 0
    vllm = importlib.util.find_spec("vllm") is not None
    engine = pick_engine_here(args.engine, gpu=gpu, formats=tuple(args.formats))
    log.info("engine %s (requested %s; replica GPU %s, vllm installed %s)", engine, args.engine, gpu, vllm)
    if engine == "vllm":
        from meddistill.serve.vllm_app import build_vllm_app

        if args.llm_config is None:
            raise ValueError("engine vllm needs args.llm_config; render args with meddistill.serve.config.app_args")
        return build_vllm_app(args)
    options = args.deployment.model_dump(exclude_none=True)
    return MedDistillServer.options(**options).bind(args.model_copy(update={"engine": engine}))
