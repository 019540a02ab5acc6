"""Rank 0's executor with tensor parallelism."""

from __future__ import annotations

import torch

from shard.engine.step_plan import Step
from shard.parallel.channel import PlanChannel
from shard.parallel.rank import RankState


class Leader:
    """Runs each step on rank 0 after sending its plan to the followers, which run it too."""

    # A failed forward is not run again request by request: the followers replay every forward.
    retry_alone = False

    def __init__(self, state: RankState, channel: PlanChannel) -> None:
        self.state = state
        self.channel = channel

    def execute(self, step: Step) -> torch.Tensor:
        """Broadcasts the step's plan (not its weights: each rank has its own), then runs the
        step like every other rank (the engine's executor)."""
        self.channel.send(step.plan)
        return self.state.runner.forward(step)
