"""One tensor-parallel rank: its slice of the model, KV cache and adapters; followers replay the
step plans that rank 0 broadcasts."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import structlog
import torch
from tokenizers import Tokenizer

from shard.adapters.cache import AdapterCache
from shard.adapters.loader import AdapterError, AdapterErrorKind
from shard.config import ShardConfig
from shard.engine.decode_graphs import DecodeGraphs
from shard.engine.kv_cache import KvCache, pages_for
from shard.engine.memory_plan import activation_peak, decode_graph_bytes, plan_kv_pages
from shard.engine.model_runner import ModelRunner
from shard.engine.step_plan import StepPlan
from shard.model import fusion
from shard.model.config import ModelConfig, load_model_config
from shard.model.llama import LlamaForCausalLM
from shard.model.loader import build_model, load_tokenizer
from shard.parallel.group import (
    GroupLost,
    TPGroup,
    broadcast_object,
    destroy,
    gather_object,
    init_group,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RankState:
    """What one rank holds."""

    model_cfg: ModelConfig
    tokenizer: Tokenizer
    runner: ModelRunner
    adapters: AdapterCache
    kv: KvCache
    group: TPGroup


def rank_device(cfg: ShardConfig, group: TPGroup) -> torch.device:
    return torch.device("cuda", group.rank) if cfg.device == "cuda" else torch.device("cpu")


def build_rank(cfg: ShardConfig, group: TPGroup) -> RankState:
    """Loads this rank's slice of everything; every rank agrees on rank 0's KV pool size."""
    device = rank_device(cfg, group)
    dtype = getattr(torch, cfg.dtype)
    fusion.set_enabled(cfg.compile)
    if device.type == "cuda":
        # Process-wide: every rank of a process serves the same model with the same flags.
        torch.backends.cuda.preferred_blas_library(cfg.blas)
    model_cfg = load_model_config(cfg.model)
    model = build_model(model_cfg, cfg.model, group, dtype, device, cfg.load_format)
    page_bytes = KvCache.bytes_per_page(model_cfg, group, cfg.page_size, dtype)
    activations = activation_peak(model, cfg, model_cfg, group)
    activations += decode_graph_bytes(cfg, model_cfg, dtype)
    max_context = model_cfg.max_context
    pages = plan_kv_pages(cfg, page_bytes, device, max_context, activations)
    pages = int(broadcast_object(pages, group))  # type: ignore[arg-type]
    kv = KvCache(model_cfg, group, pages, cfg.page_size, dtype, device)
    adapters = AdapterCache.from_config(cfg, model_cfg, group, dtype, device)
    graphs = build_decode_graphs(cfg, model, kv, device, max_context)
    runner = ModelRunner(model, kv, adapters.weights, device, graphs)
    return RankState(model_cfg, load_tokenizer(cfg.model), runner, adapters, kv, group)


def build_decode_graphs(
    cfg: ShardConfig,
    model: LlamaForCausalLM,
    kv: KvCache,
    device: torch.device,
    max_context: int,
) -> DecodeGraphs | None:
    """The rank's decode graphs (CUDA with --cuda-graphs on), with the --graph-warmup rank
    classes captured before the shard serves. Every rank captures the same shapes in the same
    order, as the tensor-parallel collectives inside each captured forward require."""
    if device.type != "cuda" or not cfg.cuda_graphs:
        return None
    max_pages = pages_for(max_context, cfg.page_size)
    graphs = DecodeGraphs(model, kv, cfg.max_batch_size, max_pages, device, use_graphs=True)
    graphs.warm_up(cfg.graph_warmup)
    return graphs


class Leader:
    """Rank 0's end of the step-plan channel: it sends every plan before running it, and a
    heartbeat whenever nothing was sent for `heartbeat_s`, so that a follower's timed wait for
    the next plan never expires on an idle shard, and a dead follower is noticed (its connection
    closes) within a heartbeat even when no request runs. `on_lost` hears of a lost rank once."""

    def __init__(self, state: RankState, heartbeat_s: float = 1.0) -> None:
        self.state = state
        if state.group.size > 1:
            state.adapters.attach_replicas(self.replicate)
        self.heartbeat_s = heartbeat_s
        self.lost: GroupLost | None = None
        self._on_lost: Callable[[GroupLost], None] = lambda _: None
        self._lock = threading.Lock()  # one sender at a time on the metadata group
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tp-heartbeat", daemon=True)

    def start(self, on_lost: Callable[[GroupLost], None]) -> None:
        self._on_lost = on_lost
        if self.state.group.size > 1:
            self._thread.start()

    # A failed forward is not run again request by request: the followers replay every forward.
    retry_alone = False

    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Broadcasts the plan, then runs it like every other rank (the engine's executor)."""
        self._send(plan)
        return self.state.runner.forward(plan)

    def replicate(self, key: str, keep: tuple[str, ...]) -> AdapterError | None:
        """Asks every follower to hold adapter version `key` (reading it if needed) and to keep
        holding `keep`; the first follower error, naming its rank, or None when all hold it."""
        replies = self._send(Hold(key, keep), answered=True)
        for rank, err in enumerate(replies):
            if isinstance(err, AdapterError):
                return AdapterError(err.kind, f"{err} (tensor-parallel rank {rank})")
        return None

    def close(self) -> None:
        """Stops the heartbeat and, if the group is whole, tells the followers to exit."""
        self._closed.set()
        with contextlib.suppress(GroupLost):
            self._send(None)

    def _send(self, msg: Message, answered: bool = False) -> list[object]:
        """Broadcasts `msg`; with `answered`, every rank's answer (gathered in the same turn
        of the lock, so no heartbeat comes between)."""
        if self.state.group.size == 1:
            return []
        with self._lock:
            if self.lost is not None:
                raise self.lost
            try:
                broadcast_object(msg, self.state.group)
                replies = gather_object(None, self.state.group) if answered else []
            except GroupLost as e:
                self.lost = e
            else:
                self._last_send = time.monotonic()
                return replies
        log.error("tensor-parallel group lost", error=str(self.lost))
        self._on_lost(self.lost)
        raise self.lost

    def _beat(self) -> None:
        while not self._closed.wait(self.heartbeat_s / 4):
            if time.monotonic() - self._last_send < self.heartbeat_s:
                continue
            try:
                self._send(HEARTBEAT)
            except GroupLost:
                return


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Rank 0 is alive; nothing to run."""


HEARTBEAT = Heartbeat()


@dataclass(frozen=True, slots=True)
class Hold:
    """Rank 0 has adapter version `key` on its device and claims it for a request once every
    follower answers that it holds the same version; followers let go of held versions that
    are neither `key` nor in `keep` (rank 0 no longer has them on its device)."""

    key: str  # id@version
    keep: tuple[str, ...]  # id@version


Message = StepPlan | Heartbeat | Hold | None


class Holds:
    """A follower's adapter versions held for rank 0: one reference each in its cache, so its
    own LRU never evicts, and a reload never drops, a version that a running request uses."""

    def __init__(self, adapters: AdapterCache, timeout_s: float) -> None:
        self.adapters = adapters
        self.timeout_s = timeout_s  # below the group timeout: rank 0 waits for the answer
        self.held: set[str] = set()

    def replicate(self, msg: Hold) -> AdapterError | None:
        """Holds `msg.key` (the error if this rank cannot: e.g. the files now hold another
        version) and lets go of what rank 0 no longer keeps."""
        for key in self.held - {msg.key, *msg.keep}:
            self.held.discard(key)
            self.adapters.release(key)
        if msg.key in self.held:
            return None
        deadline = time.monotonic() + self.timeout_s
        state = self.adapters.wait_resident(msg.key, deadline, claim=True)
        if state is None:
            return AdapterError(
                AdapterErrorKind.EXHAUSTED,
                f"adapter {msg.key!r} did not become resident within {self.timeout_s:.0f} s",
            )
        if isinstance(state, AdapterError):
            return state
        self.held.add(msg.key)
        return None

    def check(self, plan: StepPlan) -> None:
        """Rank 0 puts only versions every rank holds into a plan; anything else is a bug."""
        missing = set(plan.adapters) - self.held
        if missing:
            raise RuntimeError(
                f"step plan names adapter versions this rank does not hold: {missing}"
            )


def follower_main(cfg: ShardConfig, rank: int) -> None:
    """Entry point of ranks 1..N-1: replay plans until rank 0 sends None."""
    group = init_group(rank, cfg.tp, rank_device(cfg, TPGroup(rank, cfg.tp)), cfg.tp_timeout_s)
    torch.set_grad_enabled(False)
    state = build_rank(cfg, group)
    holds = Holds(state.adapters, cfg.tp_timeout_s / 2)
    log.info("follower ready", rank=rank)
    try:
        while (msg := broadcast_object(None, group)) is not None:
            if isinstance(msg, Hold):
                gather_object(holds.replicate(msg), group)
            elif isinstance(msg, StepPlan):
                holds.check(msg)
                state.runner.forward(msg)
    except GroupLost:
        log.exception("tensor-parallel group lost: rank 0 is gone or silent", rank=rank)
        abandon()
    destroy(group)
    abandon(0)  # nothing left to finalize that could block the exit


def shutdown_group(leader: Leader, followers: Sequence[BaseProcess]) -> None:
    """Ends rank 0's group: when whole, followers are told to exit and joined; when a rank was
    lost, the surviving followers are killed and this process exits 1 at once."""
    leader.close()
    if leader.lost is None:
        destroy(leader.state.group)  # with the followers, which tear down on the same message
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
