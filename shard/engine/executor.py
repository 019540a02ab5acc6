"""Runs a step: the engine's one way to the model.

`LocalExecutor` runs the model of this process (no tensor parallelism). With tensor parallelism
rank 0's executor is the group's leader (`shard.parallel.leader.Leader`), which broadcasts each
plan to the follower ranks before it runs its own slice of the model.
"""

from __future__ import annotations

from typing import Protocol

import torch

from shard.engine.model_runner import ModelRunner
from shard.engine.step_plan import Step


class Executor(Protocol):
    @property
    def retry_alone(self) -> bool:
        """Whether the requests of a failed forward may run again one by one, to find the one
        at fault (not with tensor parallelism: the followers replay every forward)."""
        ...

    def execute(self, step: Step) -> torch.Tensor:
        """float32 logits [B, vocab] of the rows in step.plan.logits_rows (on CUDA possibly a
        view of a graph's output: read it before the next call)."""
        ...


class LocalExecutor:
    """The executor of a shard without tensor parallelism: the model runs in this process."""

    retry_alone = True

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, step: Step) -> torch.Tensor:
        return self.runner.forward(step)
