"""LoRA adapters from the adapter root to the device.

Owns: reading and checking PEFT folders and slicing them per tensor-parallel rank (``loader``),
which version of each adapter is current (``versions``), the host and device tiers
(``host``, ``device``, ``tiers``) and what they keep or evict (``residency``), the cache that
loads, claims, pins and evicts adapters (``cache``), replication of loads to follower ranks
(``replicas``), and the LoRA ranks the kernels serve (``lora_ranks``, torch-free).

May import: ``model/`` (projection shapes, weight slicing), ``parallel.group``, ``ops/``, and
the process-wide ``shard.metrics``. Still against the grain (issue 20): ``loader`` takes
``quote`` from ``engine.faults``.
"""
