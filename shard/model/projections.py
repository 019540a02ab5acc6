"""The projections of a Llama layer that LoRA adapters may target, by their HF module names:
the one home of that vocabulary (torch-free), for the model, its loader and the adapters."""

from __future__ import annotations

QKV = ("q_proj", "k_proj", "v_proj")  # computed by one merged column-parallel layer
GATE_UP = ("gate_proj", "up_proj")  # likewise
ATTENTION = (*QKV, "o_proj")  # under `self_attn.`
MLP = (*GATE_UP, "down_proj")  # under `mlp.`
LORA_MODULES = (*ATTENTION, *MLP)
# Row-parallel projections (their input is split across tensor-parallel ranks); the others are
# column-parallel (their output is).
ROW_PARALLEL = ("o_proj", "down_proj")
# Projections that read the same input: each group runs as one shrink and one expand launch,
# its modules in the column order of the merged layer that computes them.
LORA_GROUPS = (QKV, ("o_proj",), GATE_UP, ("down_proj",))
# Projections in the largest group: the shrink's scratch holds this many ranks' columns a row.
MAX_GROUP_PROJECTIONS = max(len(g) for g in LORA_GROUPS)
