"""`lorafleet-shard`: load the base model, build the KV cache and engine, serve gRPC."""

from __future__ import annotations

import asyncio

import structlog

from protos.cli import LogFormat, configure_logging
from shard.config import parse_config
from shard.model.config import ModelConfigError

log = structlog.get_logger("shard")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(argv)
    # torch and the engine load only once the flags are good: `--help` and a usage error answer
    # in well under a second instead of after torch's import.
    import torch

    from shard.compose import build_engine, follower_main, rank_device
    from shard.edge.health import loading_health
    from shard.edge.serve import serve
    from shard.parallel.group import TPGroup, init_group
    from shard.parallel.shutdown import shutdown_group
    from shard.parallel.spawn import spawn_followers

    configure_logging(LogFormat(cfg.log_format))
    torch.set_grad_enabled(False)
    followers = spawn_followers(cfg, follower_main)
    try:
        with loading_health(cfg):
            group = init_group(0, cfg.tp, rank_device(cfg, TPGroup(0, cfg.tp)), cfg.tp_timeout_s)
            engine, service, leader = build_engine(cfg, group)
    except ModelConfigError as err:
        # The folder passed the checks of parse_config, but its weights do not fit its config.
        log.error("the model folder cannot be served", error=str(err))
        raise SystemExit(f"lorafleet-shard: {err}") from None
    try:
        asyncio.run(serve(cfg, engine, service))
    finally:
        shutdown_group(leader.channel, followers)


if __name__ == "__main__":
    main()
