"""The model: pure math over weights, knowing nothing of scheduling or kernel backends.

Owns: the Llama family (``llama``) and its tensor-parallel layers (``layers/``), the names of
the projections adapters target (``projections``), the checkpoint's config (``config``) and
loader (``loader``), which weight slice and KV heads each rank holds (``sharding``), the
per-forward metadata (``forward_meta``) and optional elementwise fusion (``fusion``).

May import: ``parallel/`` (collectives), ``ops/`` (kernels). Still against the grain
(issue 20): ``layers.lora`` takes ``AdapterWeights`` from ``adapters/``.
"""
