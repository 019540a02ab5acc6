"""How a tensor-parallel group ends: in order when whole, at once when a rank was lost."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from multiprocessing.process import BaseProcess

from shard.parallel.channel import PlanChannel
from shard.parallel.group import destroy


def shutdown_group(channel: PlanChannel, followers: Sequence[BaseProcess]) -> None:
    """Ends rank 0's group: when whole, followers are told to exit and joined; when a rank was
    lost, the surviving followers are killed and this process exits 1 at once."""
    channel.close()
    if channel.lost is None:
        destroy(channel.group)  # with the followers, which tear down on the same message
        for proc in followers:
            proc.join(10)
        return
    for proc in followers:
        proc.kill()
    abandon()


def abandon(code: int = 1) -> None:
    """Exits without tearing anything down: destroying (or finalizing Python with) a
    communicator whose peer died can block forever, and Kubernetes restarts the pod anyway."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
