"""Tiny checkpoints of each supported family beside the default Llama, written with transformers
(`shard.tiny`): Qwen2 with tied and untied embeddings, Mistral with a sliding window shorter than
its positions, and Llama 3 with llama3 RoPE scaling."""

from __future__ import annotations

from shard.tiny import LLAMA3_ROPE_SCALING, TinySpec

# Two layers keep each family's reference runs short; the engine and PEFT see the same adapters
# as the default tiny model (every target subset, ranks 4..64, rsLoRA).
FAMILY_SPECS: dict[str, TinySpec] = {
    "qwen2-tied": TinySpec(family="qwen2", num_layers=2, tie_word_embeddings=True),
    # One KV head: at TP=2 both ranks hold a replica of it and of its k/v biases.
    "qwen2-untied": TinySpec(family="qwen2", num_layers=2, num_kv_heads=1),
    # Prompts + 32 new tokens fit in 48, so the capped context is all the tests need.
    "mistral": TinySpec(family="mistral", num_layers=2, sliding_window=48),
    "llama3": TinySpec(num_layers=2, rope_scaling=LLAMA3_ROPE_SCALING),
}
