"""The CPU/edge generation engine: step-level continuous batching over one padded KV cache.

Why our own loop: on 2 CPU cores with SmolLM2-135M, one request at a time gives ~16 tok/s,
transformers' `generate_batch` ~40 tok/s, and one static padded `generate` over 16 prompts ~115
tok/s. A server needs the static-batch rate *and* requests that come and go, so:

  * one background thread owns the model and runs `step()` forever;
  * new requests are prefilled together (left padded) at a step boundary, and their KV cache is
    left-padded to the running cache's length and concatenated on the batch axis (join);
  * every step decodes one token for every running row in a single forward pass;
  * finished or cancelled rows are dropped from the cache with an index_select (leave), and
    cache columns that are padding for every remaining row are trimmed away.

Callers talk to it from asyncio (`stream()` yields `Chunk`s); the thread hands events back with
`call_soon_threadsafe`. The waiting queue is bounded: past `max_waiting` a submit raises
`EngineOverloaded` (the app answers 429) instead of growing memory until an OOM.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later (HTTP 429)."""


class RequestTooLong(ValueError):
    """prompt + max_tokens does not fit the model's context (HTTP 400)."""


@dataclass
class GenerationParams:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM's ignore_eos


@dataclass
class Chunk:
    """New text since the previous chunk; `finish_reason` set on the last one."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "error"


@dataclass
class _Request:
    rid: int
    prompt_ids: list[int]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generated: list[int] = field(default_factory=list)
    text: str = ""  # decoded text already sent
    cancelled: bool = False


class TransformersEngine:
    """Continuous batching for a transformers causal LM (SDPA attention, any dtype, CPU or GPU)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 16, max_model_len: int = 2048,
                 max_waiting: int = 64, num_threads: int | None = None, stream_interval: int = 1):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.stream_interval = stream_interval  # tokens per streamed chunk after the first (serving.streamInterval)
        context = getattr(model.config, "max_position_embeddings", None) or max_model_len
        self.max_model_len = min(max_model_len, context)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos + [tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token, 0 = padding
        self._positions: torch.Tensor | None = None  # [B] position id of the next token
        self._last: torch.Tensor | None = None  # [B] last sampled token
        self._wake = threading.Condition()
        self._stopped = False
        self.generated_tokens = 0  # for tokens/s metrics
        self._thread = threading.Thread(target=self._loop, name="meddistill-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side
    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len + max_tokens > self.max_model_len:
            raise RequestTooLong(
                f"prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                f"{prompt_len + max_tokens} > the model's context of {self.max_model_len} tokens; "
                f"shorten the prompt or lower max_tokens"
            )

    async def stream(self, prompt_ids: list[int], params: GenerationParams) -> AsyncIterator[Chunk]:
        """Generate for one prompt; yields text deltas, the last chunk carries finish_reason."""
        self.check_fits(len(prompt_ids), params.max_tokens)
        req = _Request(next(self._ids), list(prompt_ids), params, asyncio.get_running_loop(), asyncio.Queue())
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                raise EngineOverloaded(f"{len(self._waiting)} requests already wait for a batch slot")
            self._waiting.append(req)
            self._wake.notify()
        sent = 0  # completion tokens already yielded; the first chunk goes out at once (time to first token)
        try:
            while True:
                chunk = _coalesce(await req.queue.get(), req.queue)
                if isinstance(chunk, BaseException):
                    raise chunk
                while sent and chunk.finish_reason is None and chunk.completion_tokens - sent < self.stream_interval:
                    more = _coalesce(await req.queue.get(), req.queue)
                    if isinstance(more, BaseException):
                        req.queue.put_nowait(more)  # raised on the next read, after the text gathered so far
                        break
                    chunk = _joined(chunk, more)
                sent = chunk.completion_tokens
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            req.cancelled = True  # a client that went away frees its batch row at the next step

    async def generate(self, prompt_ids: list[int], params: GenerationParams) -> Chunk:
        """The whole completion as one Chunk."""
        parts, last = [], None
        async for last in self.stream(prompt_ids, params):
            parts.append(last.text)
        return Chunk("".join(parts), last.prompt_tokens, last.completion_tokens, last.finish_reason)

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopped and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopped:
                    return
                free = self.max_batch_size - len(self._running)
                joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            joining = [r for r in joining if not r.cancelled]
            try:
                with torch.inference_mode():
                    if joining:
                        self._prefill(joining)
                    else:
                        self._decode()
            except Exception as err:  # noqa: BLE001 - fail the requests, keep the server alive
                log.exception("generation step failed")
                failed = {id(r): r for r in self._running + joining}.values()
                for req in failed:
                    req.loop.call_soon_threadsafe(req.queue.put_nowait, RuntimeError(f"generation failed: {err}"))
                self._running = []
                self._cache = self._mask = self._positions = self._last = None

    def _prefill(self, joining: list[_Request]) -> None:
        longest = max(len(r.prompt_ids) for r in joining)
        ids = torch.full((len(joining), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(joining), longest), dtype=torch.long)
        for i, r in enumerate(joining):
            ids[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device), cache=cache, use_cache=True, logits_to_keep=1,
        )
        new_positions = mask.sum(-1).to(self.device)
        self._join(out.cache, mask.to(self.device), new_positions)
        self._running += joining
        self._emit(out.logits[:, -1, :], rows=range(len(self._running) - len(joining), len(self._running)))

    def _join(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
            self._last = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        layers = []
        for old, new in zip(self._cache.layers, cache.layers):
            layers.append((torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)]),
                           torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])))
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)])

    def _decode(self) -> None:
        batch = self._mask.shape[0]
        self._mask = torch.cat([self._mask, self._mask.new_ones((batch, 1))], dim=1)
        out = self.model(
            input_ids=self._last[:, None], attention_mask=self._mask, position_ids=self._positions[:, None],
            cache=self._cache, use_cache=True, logits_to_keep=1,
        )
        self._cache = out.cache
        self._positions = self._positions + 1
        self._emit(out.logits[:, -1, :], rows=range(batch))

    def _emit(self, logits: torch.Tensor, rows: range) -> None:
        """Sample one token for `rows`, send text deltas, then drop finished rows from the batch."""
        offset = rows.start
        tokens = self._sample(logits, [self._running[i].params for i in rows])
        self._last[offset:offset + len(tokens)] = tokens
        done, outbox = [], {}
        for i, token in zip(rows, tokens.tolist()):
            req = self._running[i]
            if req.cancelled:
                done.append(i)
                continue
            finish = None
            if token in self.eos_ids and not req.params.ignore_eos:
                finish = "stop"
            else:
                req.generated.append(token)
                self.generated_tokens += 1
            text = self.tokenizer.decode(req.generated, skip_special_tokens=True)
            if finish is None and text.endswith("\ufffd"):
                text = req.text  # half a UTF-8 character: wait for the rest
            hit = [text.find(s, max(0, len(req.text) - len(s))) for s in req.params.stop]
            hit = [h for h in hit if h >= 0]
            if hit:
                text, finish = text[:min(hit)], "stop"
            if finish is None and len(req.generated) >= req.params.max_tokens:
                finish = "length"
            delta, req.text = text[len(req.text):], text
            chunk = Chunk(delta, len(req.prompt_ids), len(req.generated), finish)
            if delta or finish:
                outbox.setdefault(req.loop, []).append((req.queue, chunk))
            if finish:
                done.append(i)
        # One wake-up per event loop and step, not one per row: the loop's thread competes with
        # this one for the GIL, which costs decode speed (most visible on GPU, where a step is short).
        for loop, items in outbox.items():
            loop.call_soon_threadsafe(_deliver, items)
        if done:
            self._leave(done)

    def _leave(self, done: list[int]) -> None:
        keep = [i for i in range(len(self._running)) if i not in set(done)]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._positions = self._last = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int((mask.sum(0) > 0).nonzero()[0])  # columns before this are padding for every row
        layers = [(layer.keys.index_select(0, index)[:, :, first:], layer.values.index_select(0, index)[:, :, first:])
                  for layer in self._cache.layers]
        self._cache = DynamicCache(ddp_cache_data=layers)
        self._mask = mask[:, first:]
        self._positions = self._positions.index_select(0, index)
        self._last = self._last.index_select(0, index)

    @staticmethod
    def _sample(logits: torch.Tensor, params: list[GenerationParams]) -> torch.Tensor:
        tokens = logits.argmax(-1)
        for i, p in enumerate(params):
            if p.temperature > 0:
                probs = torch.softmax(logits[i].float() / p.temperature, -1)
                if p.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    cut = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
                    probs[order[cut]] = 0
                tokens[i] = torch.multinomial(probs / probs.sum(), 1)[0]
        return tokens


def _coalesce(first: Chunk | BaseException, queue: asyncio.Queue) -> Chunk | BaseException:
    """`first` plus every chunk already waiting behind it, as one chunk.

    When the consumer (SSE writer, Serve's proxy, the client) is slower than decoding, deltas pile
    up here; sending them as one event costs one pass through that path instead of one per token,
    and costs no latency: nothing waits for tokens that are not there yet. An error queued behind
    text stays queued, so the text goes out first and the error on the next read."""
    if isinstance(first, BaseException):
        return first
    chunk = first
    while chunk.finish_reason is None and not queue.empty():
        nxt = queue.get_nowait()
        if isinstance(nxt, BaseException):
            queue.put_nowait(nxt)  # the only item left: it is read next
            break
        chunk = _joined(chunk, nxt)
    return chunk


def _joined(chunk: Chunk, later: Chunk) -> Chunk:
    """Two consecutive chunks as one: both texts, the later one's counts and finish reason."""
    return Chunk(chunk.text + later.text, later.prompt_tokens, later.completion_tokens, later.finish_reason)


def _deliver(items: list[tuple[asyncio.Queue, Chunk]]) -> None:
    for queue, chunk in items:
        queue.put_nowait(chunk)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)

