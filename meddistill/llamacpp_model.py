"""A GGUF model in llama.cpp (llama-cpp-python's low-level API): several sequences per decode call.

    model = LlamaCppModel("student/gguf/model-Q4_K_M.gguf", n_ctx=2048, n_seq_max=16)
    logits = model.decode([Row(seq=0, tokens=prompt_a, pos=0), Row(seq=1, tokens=[tok], pos=57)])
    model.forget(0)

One `decode` fills one `llama_batch` with every row's tokens, each tagged with its sequence id and
position, and runs one `llama_decode` (more only when the tokens exceed n_batch), so a step of 16
running sequences costs one forward pass over 16 tokens. The serving engine
(serve/llamacpp_engine.py) and the evaluation row (meddistill/evaluation/llamacpp.py) share it.
Tokens are ids of the model's Hugging Face tokenizer, which the converter wrote into the GGUF
(jobs/hf_to_gguf.py): llama.cpp's own tokenizer is not used.

llama.cpp is checked first (meddistill/llamacpp_check.py: once per machine, in a child process), so a
build that cannot run on this processor raises LlamaCppUnusable here instead of killing the process.

Each sequence has its own KV stream of n_ctx tokens (llama.cpp's non-unified cache: a decode step
attends only to its own sequence's cells, as llama-server's parallel slots do).
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class Row:
    seq: int  # sequence id in [0, n_seq_max)
    tokens: list[int]  # appended to the sequence at positions pos, pos+1, ...
    pos: int
    all_logits: bool = False  # logits for every token (log-likelihood) instead of the last one only


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level, text, user_data):  # llama.cpp prints every tensor it loads; keep errors only
    if level == 4 and text:  # GGML_LOG_LEVEL_ERROR (5 continues the previous line)
        log.error("llama.cpp: %s", text.decode(errors="replace").rstrip())


class LlamaCppModel:
    """A loaded GGUF with one context of n_seq_max sequences of up to n_ctx tokens each."""

    def __init__(self, path: "str | os.PathLike", *, n_ctx: int = 2048, n_seq_max: int = 16, n_batch: int = 2048,
                 threads: int | None = None, checked: bool = False):
        if not checked:  # a build this processor cannot run kills the process: refuse it with the reason instead
            from meddistill.llamacpp_check import require_llamacpp

            require_llamacpp(f"the GGUF model {path}")
        import llama_cpp as L

        self.L, self.path = L, Path(path)
        L.llama_log_set(_quiet, None)
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {self.path}: not a GGUF model file, or damaged")
        self.n_ctx_train = L.llama_model_n_ctx_train(self.model)
        self.n_ctx = min(n_ctx, self.n_ctx_train)
        self.n_seq_max, self.n_batch = n_seq_max, n_batch
        threads = threads or os.cpu_count() or 1
        ctx = L.llama_context_default_params()
        ctx.n_ctx = self.n_ctx * n_seq_max
        ctx.n_batch = ctx.n_ubatch = n_batch
        ctx.n_seq_max = n_seq_max
        ctx.n_threads = ctx.n_threads_batch = threads
        ctx.kv_unified = False
        ctx.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, ctx)
        if not self.ctx:
            raise ValueError(f"llama.cpp could not create a context of {n_seq_max} x {self.n_ctx} tokens for {self.path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.decode_calls = 0  # llama_decode calls so far (tests: several sequences per call)

    def weight_bytes(self) -> int:
        """Bytes of the model's tensors as llama.cpp holds them (the quantized blocks)."""
        return int(self.L.llama_model_size(self.model))

    def forget(self, seq: int) -> None:
        """Drop a sequence's KV cells, so its id can start a new sequence at position 0."""
        self.L.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def forget_all(self) -> None:
        self.L.llama_memory_clear(self.memory, True)

    def decode(self, rows: list[Row]) -> list[np.ndarray]:
        """Append every row's tokens to its sequence in one llama_decode (split only past n_batch);
        per row, float32 logits [1 or len(tokens), n_vocab] (a copy)."""
        L, batch = self.L, self.batch
        # In sequence-id order: llama.cpp splits a batch over a non-unified cache into per-sequence
        # streams, and rows out of order cost up to 4x per step (measured: 39 ms sorted, 150 ms
        # reversed, 104 ms shuffled for 16 sequences), while the engine hands out freed ids in any order.
        order = sorted(range(len(rows)), key=lambda r: rows[r].seq)
        flat = [(r, i) for r in order for i in range(len(rows[r].tokens))]
        out: list[list[np.ndarray]] = [[] for _ in rows]
        for start in range(0, len(flat), self.n_batch):
            chunk = flat[start:start + self.n_batch]
            for k, (r, i) in enumerate(chunk):
                row = rows[r]
                batch.token[k] = row.tokens[i]
                batch.pos[k] = row.pos + i
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = row.seq
                batch.logits[k] = row.all_logits or i == len(row.tokens) - 1
            batch.n_tokens = len(chunk)
            rc = L.llama_decode(self.ctx, batch)
            self.decode_calls += 1
            if rc != 0:
                raise RuntimeError(f"llama_decode failed (return code {rc}): the KV cache of {self.n_seq_max} x "
                                   f"{self.n_ctx} tokens is full or a position is out of order")
            for k, (r, i) in enumerate(chunk):
                if batch.logits[k]:
                    pointer = L.llama_get_logits_ith(self.ctx, k)
                    out[r].append(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy())
        return [np.stack(parts) for parts in out]

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
