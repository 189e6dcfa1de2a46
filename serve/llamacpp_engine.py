"""The llama.cpp engine: the `gguf` student served on CPU with continuous batching.

Same interface, scheduler and text handling as serve/engine.py's TransformersEngine (stream(),
generate(), the bounded waiting queue and 429s, stop strings, cancellation, metrics counters): only
the model steps differ. Each step is ONE llama_decode over a llama_batch that holds
  * one token for every running sequence (its last sampled token at its next position), and
  * the whole prompt of every request that joins at this step boundary,
each token tagged with its sequence's id (meddistill/llamacpp_model.py). A finished or cancelled
request frees its sequence id and KV cells; a new request takes them at the next step.
Sampling (greedy, temperature, top-p) is the transformers engine's, on llama.cpp's logits.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddistill.llamacpp_model import LlamaCppModel, Row
from meddistill.serve.args import ServeArgs
from meddistill.serve.engine import TransformersEngine, _Request

log = logging.getLogger(__name__)


class LlamaCppEngine(TransformersEngine):
    """Continuous batching over llama.cpp sequences (one KV stream per batch slot)."""

    def __init__(self, model: LlamaCppModel, tokenizer: Any, *, eos_ids: set[int], max_batch_size: int = 16,
                 max_waiting: int = 64, stream_interval: int = 1):
        # Not TransformersEngine.__init__: no torch model; the attributes its scheduler reads are set here.
        if model.n_seq_max < max_batch_size:
            raise ValueError(f"max_batch_size {max_batch_size} > the llama.cpp context's {model.n_seq_max} sequences")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.stream_interval = stream_interval
        self.max_model_len = model.n_ctx
        self.eos_ids = set(eos_ids)
        self._ids = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._free_seqs = list(range(max_batch_size))
        self._seq: dict[int, int] = {}  # request id -> llama.cpp sequence id
        self._pos: dict[int, int] = {}  # request id -> position of its next token
        self._last: torch.Tensor | None = None  # [len(_running)] last sampled token (TransformersEngine._emit writes it)
        self._wake = threading.Condition()
        self._stopped = False
        self.generated_tokens = 0
        self.steps = 0  # scheduler steps (each one llama_decode unless prompts exceed n_batch)
        self._thread = threading.Thread(target=self._loop, name="meddistill-llamacpp", daemon=True)
        self._thread.start()

    def _release_orphans(self) -> None:
        """Free the sequences of requests no longer running (after a failed step the scheduler drops them all)."""
        running = {r.rid for r in self._running}
        for rid in [rid for rid in self._seq if rid not in running]:
            seq = self._seq.pop(rid)
            self._pos.pop(rid, None)
            self.model.forget(seq)
            self._free_seqs.append(seq)
        if self._last is None or len(self._last) != len(self._running):
            self._last = torch.zeros(len(self._running), dtype=torch.long)

    def _prefill(self, joining: list[_Request]) -> None:
        """Joining prompts and one decode token of every running sequence, in one llama_decode."""
        self._release_orphans()
        rows = [Row(self._seq[r.rid], [int(self._last[i])], self._pos[r.rid]) for i, r in enumerate(self._running)]
        for req in joining:
            seq = self._free_seqs.pop()
            self._seq[req.rid], self._pos[req.rid] = seq, 0
            rows.append(Row(seq, list(req.prompt_ids), 0))
        self._step(rows, self._running + joining)

    def _decode(self) -> None:
        self._release_orphans()
        self._step([Row(self._seq[r.rid], [int(self._last[i])], self._pos[r.rid]) for i, r in enumerate(self._running)],
                   self._running)

    def _step(self, rows: list[Row], requests: list[_Request]) -> None:
        logits = torch.from_numpy(np.concatenate(self.model.decode(rows)))
        self.steps += 1
        for row, req in zip(rows, requests):
            self._pos[req.rid] = row.pos + len(row.tokens)
        self._running = list(requests)
        self._last = torch.cat([self._last, torch.zeros(len(requests) - len(self._last), dtype=torch.long)])
        self._emit(logits, rows=range(len(requests)))

    def _leave(self, done: list[int]) -> None:
        gone = set(done)
        for i in gone:
            rid = self._running[i].rid
            seq = self._seq.pop(rid)
            self._pos.pop(rid, None)
            self.model.forget(seq)
            self._free_seqs.append(seq)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in keep]
        self._last = self._last[keep] if keep else None


def gguf_path(model_dir: Path, gguf_file: str | None) -> Path:
    """The GGUF to serve: `gguf_file` under the model folder (the quantize artifact), or the folder's only .gguf."""
    if model_dir.is_file():
        return model_dir
    if gguf_file:
        return model_dir / gguf_file
    found = sorted(model_dir.glob("*.gguf")) + sorted(model_dir.glob("gguf/*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"{model_dir}: expected one .gguf file (quantization.formats gguf), found {len(found)}")
    return found[0]


def load_llamacpp_engine(model_dir: Path, args: ServeArgs) -> tuple[LlamaCppEngine, Any]:
    """(engine, Hugging Face tokenizer) for a replica: the GGUF and the tokenizer files beside it."""
    from meddistill.modelsource import load_tokenizer

    path = gguf_path(Path(model_dir), args.gguf_file)
    tokenizer = load_tokenizer(path.parent)
    max_batch = args.max_batch_size
    model = LlamaCppModel(path, n_ctx=args.max_model_len, n_seq_max=max_batch, threads=args.num_threads)
    engine = LlamaCppEngine(model, tokenizer, eos_ids=stop_ids(path.parent, tokenizer), max_batch_size=max_batch,
                            max_waiting=args.waiting_limit, stream_interval=args.stream_interval or 1)
    log.info("engine llamacpp: %s (%d sequences x %d tokens)", path, max_batch, model.n_ctx)
    return engine, tokenizer


def stop_ids(folder: Path, tokenizer: Any) -> set[int]:
    """EOS ids from generation_config.json beside the GGUF, plus the tokenizer's (as the transformers engine)."""
    from transformers import GenerationConfig

    ids = set()
    if (folder / "generation_config.json").is_file():
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids}
