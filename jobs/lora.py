"""The one LoRA builder (teacher lora/qlora, distill student) and its one merge.

Adapters are created in fp32 whatever the base's dtype (PEFT's autocast_adapter_dtype): a bf16
base keeps its memory, the few trainable weights keep full-precision updates. The merge happens
once, on the base loaded in its own precision, so a saved model never passes through a second
fp32 copy.
"""
from __future__ import annotations

from pathlib import Path


def add_lora(model, lora):
    """`model` with fresh LoRA adapters from a spec Lora section (only the adapters train)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def save_adapter(state: dict, peft_config, base: str, target: Path) -> None:
    """A PEFT adapter directory from an adapter state dict (as get_peft_model_state_dict gives it)."""
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    peft_config.base_model_name_or_path = base
    peft_config.save_pretrained(str(target))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(target / "adapter_model.safetensors"))


def merge_adapter(base: str, adapter_dir: Path, dtype: str):
    """(merged plain model, tokenizer): the base in `dtype` plus the adapter folded into its weights."""
    from peft import PeftModel

    from meddistill.modelsource import load_model

    model, tokenizer = load_model(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model, tokenizer
