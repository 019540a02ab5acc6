"""LoRA adapters from the adapter root to the device.

Owns: reading and checking PEFT folders and slicing them per tensor-parallel rank (``loader``),
the host and device tiers and their eviction (``host``, ``device``, ``tiers``), the cache that
loads, pins and evicts adapters (``cache``), replication of loads to follower ranks
(``replicas``), and the LoRA ranks the kernels serve (``lora_ranks``, torch-free).

May import: ``model/`` (projection shapes, weight slicing), ``parallel/``, ``ops/``, and the
process-wide ``shard.config`` and ``shard.metrics``. Still against the grain (issue 20):
``loader`` takes ``quote`` from ``engine.faults``, and ``model.layers.lora`` takes
``AdapterWeights`` from here.
"""
