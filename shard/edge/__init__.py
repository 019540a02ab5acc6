"""The shard's edge: where gRPC requests enter and domain objects leave.

Owns: the ``Generator`` and ``Shard`` services (``server``), protobuf -> domain translation and
validation of requests (``request_validation``), chat templates (``chat_template``) and the
``WatchLoad`` snapshots (``load_feed``). The only part that touches protobuf types.

May import: ``protos``, ``engine/``, ``adapters/``, ``model/`` (the model's config), and the
process-wide ``shard.config`` and ``shard.metrics``. Nothing below imports the edge.
"""
