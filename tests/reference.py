"""transformers + PEFT as the independent reference for greedy tokens and logits."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig


@cache
def _model(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is None:
        return base.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir).eval()


def greedy(
    model_dir: Path, adapter_dir: Path | None, prompt: list[int], new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens of one request run alone, and the raw logits of each step [new, vocab]."""
    model = _model(model_dir, adapter_dir)
    gen = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=-1,  # never stop early: the engine runs with ignore_eos
        pad_token_id=0,
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            generation_config=gen,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, torch.cat(out.logits, dim=0).float()
