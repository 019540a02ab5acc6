"""Tensor parallelism: the only part that touches ``torch.distributed``.

Owns: the tensor-parallel group and its collectives (``group``, which imports only torch), and
the ranks of a group: the leader that broadcasts each step plan and the followers that replay it
(``rank``).

``group`` sits below every other part. ``rank`` also builds each rank's model, KV cache and
runner, so it imports the parts above (issue 20 moves that composition out).
"""
