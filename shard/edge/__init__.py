"""The shard's edge: where gRPC requests enter and domain objects leave.

Owns: the ``Generator`` and ``Shard`` services (``server``), protobuf -> domain translation and
validation of requests (``request_validation``), chat templates (``chat_template``), the
``WatchLoad`` snapshots (``load_feed``), the health service and the server that answers it while
the weights load (``health``), and serving until a signal, then draining (``serve``). The only
part that touches protobuf types.

May import: ``protos``, ``engine/``, ``adapters/``, ``model/`` (the model's config), and the
process-wide ``shard.config`` and ``shard.metrics``. Nothing below imports the edge.
"""
