"""Starts ranks 1..tp-1 of a shard as child processes of rank 0 (when torchrun did not)."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from collections.abc import Callable

from shard.config import ShardConfig


def spawn_followers(
    cfg: ShardConfig, target: Callable[[ShardConfig, int], None]
) -> list[mp.process.BaseProcess]:
    """Starts `target(cfg, rank)` for ranks 1..tp-1 with an env:// rendezvous."""
    if cfg.tp == 1:
        return []
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    ctx = mp.get_context("spawn")
    procs: list[mp.process.BaseProcess] = [
        ctx.Process(target=target, args=(cfg, r), daemon=True) for r in range(1, cfg.tp)
    ]
    for proc in procs:
        proc.start()
    return procs
