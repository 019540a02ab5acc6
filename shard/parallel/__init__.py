"""Tensor parallelism: the only part that touches ``torch.distributed``.

Owns: the group and its collectives (``group``, which imports only torch and sits below every
other part); what one rank holds (``rank``); rank 0's step-plan channel (``channel``), what it
sends (``messages``), rank 0's executor that sends each plan before running it (``leader``) and
the followers that replay it (``follower``); starting follower processes (``spawn``) and ending
the group (``shutdown``).

``group`` sits below every other part. The ranks above it run the engine's plans on the
engine's runner, so ``rank``, ``leader``, ``follower`` and ``messages`` may import ``engine/``
(plans, runner, KV cache) and ``adapters/``. Building a rank is ``shard.compose``'s job.
"""
