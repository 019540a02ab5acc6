"""lorafleet shard: one base model plus many LoRA adapters behind gRPC.

The packages are the parts of a shard, highest first; a part imports only the parts below it:
- ``edge/``: the gRPC services, request validation, chat templates and the load feed; the only
  part that touches protobuf types.
- ``engine/``: the step loop, scheduler, sequences, step plans, KV cache, prefix cache, sampling,
  detokenizer, model runner and decode graphs.
- ``adapters/``: LoRA adapters from disk to device: loader, host and device tiers, the cache that
  owns them, replication to tensor-parallel followers.
- ``model/``: the Llama family, its layers, its checkpoint config and loader, forward metadata.
- ``parallel/``: the tensor-parallel group, its collectives, and the leader/follower ranks.
- ``ops/``: the custom kernels (compiled from csrc/) and their plain-torch references.

Beside them: ``__main__`` (the entry point), ``compose`` (the composition root: builds a rank,
and on rank 0 the engine and gRPC service, from the config), ``config`` (the process's one frozen
``ShardConfig``) and ``metrics`` (its Prometheus counters), both built once and passed down;
``tiny`` writes a tiny random checkpoint and adapters (``python -m shard.tiny``).
"""
