"""A saved Hugging Face Llama or Qwen2 causal LM (a merged student) -> one 16-bit GGUF file for llama.cpp.

Why our own converter: llama.cpp's `convert_hf_to_gguf.py` (and its `conversion/` package) ship in
the llama-cpp-python sdist but not in the wheel pip installs, so it is not importable. What it does
for these two architectures is short, and mirrored here with the `gguf` package (llama.cpp's own
gguf-py, the same 0.19.0):
  * hyper-parameters under `{arch}.*` (layers, widths, heads, RoPE base, RMSNorm epsilon);
  * Llama's q_proj / k_proj rows permuted back from Hugging Face's rotary layout to llama.cpp's
    interleaved one (Qwen2 uses NEOX RoPE in llama.cpp: no permutation);
  * 2-D weights in float16, norms and biases in float32 (llama.cpp computes norms in f32);
  * a byte-level BPE vocabulary ("gpt2"): tokens, types, merges, special ids, chat template, and the
    pre-tokenizer name llama.cpp looks up from the hash of a reference string's token ids.
Other architectures or tokenizers are refused with the reason (the converter would write a file
llama.cpp loads but computes wrongly).
"""
from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ARCHITECTURES = {"LlamaForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2"}
# llama.cpp's pre-tokenizer names by sha256 of str(tokenizer.encode(CHECK_TEXT)) (convert_hf_to_gguf's table).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
}
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 '
    '333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на '
    'Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll '
    'make it, \'D you like some tea? We\'Ve a\'lL'
)


class ConversionError(ValueError):
    """The model cannot be written as GGUF by this converter (the message says why and what to do)."""


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's half-split rotary rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def pre_tokenizer(tokenizer) -> str:
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        log.warning("hf_to_gguf: unknown pre-tokenizer (sha256 %s); writing 'default': llama.cpp's own "
                    "tokenization may differ (MedDistill serving tokenizes with the Hugging Face tokenizer)", digest)
    return PRE_TOKENIZERS.get(digest, "default")


def write_vocab(writer, model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, as convert_hf_to_gguf's _set_vocab_gpt2."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").is_file() or '"merges"' not in (model_dir / "tokenizer.json").read_text()[:10**8]:
        raise ConversionError(f"{model_dir}: only byte-level BPE tokenizers (tokenizer.json with merges) convert to GGUF here")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer)


def hf_to_gguf(model_dir: Path, target: Path) -> Path:
    """Write `model_dir` (config.json + safetensors + tokenizer) as a 16-bit GGUF at `target`."""
    import gguf
    from safetensors import safe_open

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    hf_arch = (config.get("architectures") or ["?"])[0]
    if hf_arch not in ARCHITECTURES:
        raise ConversionError(
            f"quantization.formats gguf: the student is a {hf_arch}; the GGUF converter handles "
            f"{', '.join(ARCHITECTURES)}; use formats [nf4] or w4a16 for this model")
    arch = getattr(gguf.MODEL_ARCH, ARCHITECTURES[hf_arch])
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer = gguf.GGUFWriter(str(target), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    writer.add_block_count(n_layers)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    if (rope.get("rope_type") or "default") not in ("default",):
        raise ConversionError(f"{model_dir}: RoPE scaling {rope.get('rope_type')!r} is not converted; serve this model with nf4")
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    write_vocab(writer, model_dir, config["vocab_size"])

    names = gguf.get_tensor_name_map(arch, n_layers)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{model_dir}: no *.safetensors files to convert")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                data = f.get_tensor(name).float().numpy()
                if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
                    data = permute_rotary(data, n_head)
                elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
                    data = permute_rotary(data, n_kv)
                new = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ConversionError(f"{model_dir}: tensor {name} has no GGUF name for {hf_arch}")
                writer.add_tensor(new, data.astype(np.float16 if data.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
