"""The model: pure math over weights, knowing nothing of scheduling or kernel backends.

Owns: the Llama family (``llama``) and its tensor-parallel layers (``layers/``), the names of
the projections adapters target (``projections``), the checkpoint's config (``config``) and
loader (``loader``), which weight slice and KV heads each rank holds (``sharding``), the
per-forward metadata (``forward_meta``), optional elementwise fusion (``fusion``), and one
adapter version's LoRA weights as the layers apply them (``lora_weights``: the adapters package
loads them).

May import: ``parallel.group`` (collectives), ``ops/`` (kernels).
"""
