"""The `gguf` row of the evaluation: the llama.cpp student scored by the same harness as every other row.

`GGUFCausalLM` answers the two calls the harness makes of a transformers model, so the prompts,
greedy decoding, EOS handling, answer extraction, latency passes and statistics are the harness's
own, not a second copy:
  generate(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)  generative scoring:
      every row of the (left-padded) batch is its own llama.cpp sequence, prefilled together and
      decoded greedily, one llama_decode per step for all unfinished rows;
  __call__(input_ids, attention_mask).logits    log-likelihood scoring: every position's logits of
      the (right-padded) rows, from one llama_decode.
Weight bytes are llama.cpp's tensor bytes (see buffers()).
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from meddistill.llamacpp_model import LlamaCppModel, Row

CPU = torch.device("cpu")


class GGUFCausalLM:
    """A GGUF in llama.cpp, shaped like the part of a transformers causal LM the harness uses."""

    def __init__(self, path: Path, *, batch_size: int, n_ctx: int = 2048, threads: int | None = None):
        from transformers import GenerationConfig

        self.llama = LlamaCppModel(path, n_ctx=n_ctx, n_seq_max=batch_size, threads=threads)
        folder = Path(path).parent
        self.generation_config = (GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file()
                                  else GenerationConfig())
        self._embeddings = SimpleNamespace(weight=SimpleNamespace(device=CPU))

    # what the harness and modelsource read of a model
    def eval(self) -> "GGUFCausalLM":
        return self

    def get_input_embeddings(self):
        return self._embeddings

    def parameters(self):
        return iter(())

    def buffers(self):
        # modelsource.model_weight_bytes sums numel * element_size over these: one uint8 view of
        # llama.cpp's tensor bytes (expanded: no memory) makes the harness report the GGUF's weights.
        return iter((torch.zeros(1, dtype=torch.uint8).expand(self.llama.weight_bytes()),))

    def _rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        if len(input_ids) > self.llama.n_seq_max:
            raise ValueError(f"batch of {len(input_ids)} rows > the llama.cpp context's {self.llama.n_seq_max} sequences")
        return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_token_id: list[int] | int, pad_token_id: int, **_: Any) -> torch.Tensor:
        """Greedy continuation of each row: [B, prompt width + new], finished rows padded with pad_token_id."""
        stop = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
        prompts = self._rows(input_ids, attention_mask)
        self.llama.forget_all()
        new: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        rows = [Row(b, p, 0) for b, p in enumerate(prompts)]
        while live:
            logits = self.llama.decode(rows)
            nxt = []
            for b, out in zip(live, logits):
                token = int(np.argmax(out[-1]))
                new[b].append(token)
                if token not in stop and len(new[b]) < max_new_tokens:
                    nxt.append(b)
            rows = [Row(b, [new[b][-1]], len(prompts[b]) + len(new[b]) - 1) for b in nxt]
            live = nxt
        width = max(len(t) for t in new)
        tail = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        for b, tokens in enumerate(new):
            tail[b, :len(tokens)] = torch.tensor(tokens)
        return torch.cat([input_ids.cpu(), tail], dim=1)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: Any = 0,
                 **_: Any) -> SimpleNamespace:
        """Logits at every position of right-padded rows (zeros at padding); `logits_to_keep` as
        transformers reads it: an int keeps the last N positions (0: all), a tensor those positions."""
        rows = self._rows(input_ids, attention_mask)
        self.llama.forget_all()
        outs = self.llama.decode([Row(b, ids, 0, all_logits=True) for b, ids in enumerate(rows)])
        logits = torch.zeros((len(rows), input_ids.shape[1], self.llama.n_vocab), dtype=torch.float32)
        for b, out in enumerate(outs):
            logits[b, :len(out)] = torch.from_numpy(out)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep.cpu()]
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits)


def load_gguf_for_eval(path: Path, batch_size: int, threads: int | None = None) -> tuple[GGUFCausalLM, Any, str]:
    """(model, tokenizer, dtype label) for the evaluate stage's gguf row."""
    from meddistill.modelsource import load_tokenizer

    model = GGUFCausalLM(path, batch_size=batch_size, threads=threads)
    gguf_type = Path(path).stem.removeprefix("model-")
    return model, load_tokenizer(Path(path).parent), f"gguf {gguf_type} (llama.cpp)"
