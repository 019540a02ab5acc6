"""CUDA graphs for decode steps.

A decode-only step is padded to a fixed shape — (batch bucket, LoRA rank class, page-table width
class) — and replayed from a graph captured once for that shape. Everything that changes from step
to step (token ids, positions, KV slots, page tables, adapter segments and weight pointers) lives
in one device buffer with a host mirror, so a step costs one host-to-device copy and one replay.

The padding (`shard.engine.forward_inputs`, which builds eager steps' inputs too) is harmless:
padding rows write into the KV cache's scratch page and their logits are dropped; padding
segments are empty with rank 0.

On a CPU the same padded path runs eagerly (no graph), which is how the padding is tested in CI.
"""

from __future__ import annotations

import time

import structlog
import torch

from shard.adapters.lora_ranks import RANK_CLASSES
from shard.engine.forward_inputs import NO_ROWS, DecodePadding, ForwardInputs
from shard.engine.graph_shapes import (
    BATCH_BUCKETS,
    GraphKey,
    ceil_to,
    table_width,
    warm_keys,
    width_classes,
)
from shard.engine.kv_cache import KvCache
from shard.engine.step_plan import StepPlan
from shard.engine.tensor_tree import replace_leaves, tensor_leaves
from shard.metrics import ShardMetrics
from shard.model.layers.lora import LoraBatch
from shard.model.llama import LlamaForCausalLM
from shard.model.lora_weights import AdapterWeights

log = structlog.get_logger(__name__)

# Leaves of a LoraBatch that are scratch space, not per-step data.
SCRATCH_LEAVES = frozenset({"buffer"})


def step_leaves(lora: LoraBatch | None) -> dict[str, torch.Tensor]:
    """The per-step data of a LoraBatch (its scratch left out), by arena name."""
    return {
        f"lora.{name}": t
        for name, t in tensor_leaves(lora).items()
        if name.split(".")[-1] not in SCRATCH_LEAVES
    }


def lora_signature(starts: list[int], weights: list[AdapterWeights | None]) -> tuple:
    """What a step's LoRA tables depend on: the segment starts and, per segment, the adapter
    version and where its weights sit (they are carved from one device buffer per residency)."""
    return tuple(starts), tuple(None if w is None else w.placement for w in weights)


class StagingArena:
    """Named tensors packed into one device buffer, filled through a host mirror (pinned on CUDA)
    and uploaded with a single copy."""

    ALIGN = 16

    def __init__(
        self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device
    ) -> None:
        offsets, total = {}, 0
        for name, (shape, dtype) in specs.items():
            offsets[name] = total
            nbytes = max(1, torch.Size(shape).numel()) * dtype.itemsize
            total += -(-nbytes // self.ALIGN) * self.ALIGN
        pinned = device.type == "cuda"
        self._device_buf = torch.zeros(total, dtype=torch.uint8, device=device)
        self._host_buf = torch.zeros(total, dtype=torch.uint8, pin_memory=pinned)
        self._uploaded = torch.cuda.Event() if pinned else None
        self.device = self._views(self._device_buf, specs, offsets)
        self.host = self._views(self._host_buf, specs, offsets)

    @staticmethod
    def _views(
        buf: torch.Tensor,
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        offsets: dict[str, int],
    ) -> dict[str, torch.Tensor]:
        views = {}
        for name, (shape, dtype) in specs.items():
            n = torch.Size(shape).numel() * dtype.itemsize
            views[name] = buf[offsets[name] : offsets[name] + n].view(dtype).view(shape)
        return views

    def wait_host(self) -> None:
        """Blocks until the last upload has read the host mirror, so it may be refilled."""
        if self._uploaded is not None:
            self._uploaded.synchronize()

    def upload(self) -> None:
        self._device_buf.copy_(self._host_buf, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()


class PaddedDecode:
    """One padded decode shape: its static inputs, and its graph once captured."""

    def __init__(
        self,
        key: GraphKey,
        kv: KvCache,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.key = key
        self.dtype = dtype
        self.inputs = ForwardInputs(kv.page_size)
        self.padding = DecodePadding(key.batch, key.width, key.rank, kv.scratch_page)
        # Until a step fills them, every row is a padding row, in one base-model segment: what a
        # graph captured at start, before any step, runs and writes.
        template = self.inputs.fields(NO_ROWS, self.padding)
        template_lora = self.inputs.lora(NO_ROWS, [], dtype, self.padding, device)
        lora_leaves = step_leaves(template_lora)
        specs = {name: (tuple(t.shape), t.dtype) for name, t in (template | lora_leaves).items()}
        self.arena = StagingArena(specs, device)
        for name, t in (template | lora_leaves).items():
            self.arena.host[name].copy_(t)
        dev = self.arena.device
        lora: LoraBatch | None = None
        if template_lora is not None:
            static = {name.removeprefix("lora."): dev[name] for name in lora_leaves}
            rebuilt = replace_leaves(template_lora, static)
            assert isinstance(rebuilt, LoraBatch)
            lora = rebuilt
        self.meta = self.inputs.meta(dev, (), lora)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._lora_signature: tuple | None = None  # what the host mirror's LoRA tables hold

    def fill(self, plan: StepPlan, weights: list[AdapterWeights | None]) -> None:
        """Writes the plan's rows into the host mirror; rows past the plan become padding."""
        self.arena.wait_host()
        host = self.arena.host
        for name, t in self.inputs.fields(plan, self.padding).items():
            host[name].copy_(t)
        if self.key.rank:
            starts = [row for row, _ in plan.segments] + [plan.num_rows]
            signature = lora_signature(starts, weights)
            # The same segments on the same resident adapters as this shape's last step (most
            # decode steps): the host mirror still holds their tables.
            if signature != self._lora_signature:
                lora = self.inputs.lora(plan, weights, self.dtype, self.padding)
                for name, t in step_leaves(lora).items():
                    host[name].copy_(t)
                self._lora_signature = signature
        self.arena.upload()


class DecodeGraphs:
    """Runs decode-only steps through padded shapes: graph replay on CUDA, eager on CPU."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv: KvCache,
        max_batch: int,
        max_pages: int,
        device: torch.device,
        use_graphs: bool,
        metrics: ShardMetrics | None = None,
    ) -> None:
        """`metrics`: rank 0's counters, whose gauge reads `captured`."""
        self.model = model
        self.kv = kv
        self.kv_layers = kv.layers()
        self.dtype = kv.k.dtype
        self.device = device
        self.use_graphs = use_graphs and device.type == "cuda"
        self.max_batch = ceil_to(max_batch, BATCH_BUCKETS) or max_batch
        self.max_pages = max_pages
        self._shapes: dict[GraphKey, PaddedDecode] = {}
        self._captured = 0
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # One stream for every capture's warm-up run: with a fresh stream per capture the
        # start-up warm-up took 18.4 MiB a graph on an H200, with one 4.25 MiB (most likely the
        # cuBLAS workspace torch keeps for every stream it has seen).
        self._warm_stream = torch.cuda.Stream(device) if self.use_graphs else None
        self.warm_up_bytes = 0  # device memory the start-up warm-up took (CUDA)
        if metrics is not None:
            # Read at scrape time: captures on first use happen on the engine thread.
            metrics.decode_graphs.set_function(lambda: self.captured)

    def key(self, plan: StepPlan, weights: list[AdapterWeights | None]) -> GraphKey | None:
        """The padded shape of a decode-only plan, or None when it must run eagerly."""
        if plan.prefills or plan.num_rows > self.max_batch:
            return None
        batch = ceil_to(plan.num_rows, BATCH_BUCKETS) or self.max_batch
        ranks = [w.rank for w in weights if w is not None]
        rank = ceil_to(max(ranks), RANK_CLASSES) if ranks else 0
        if rank is None:
            return None
        pages = max((len(p) for p in plan.decode_pages), default=1)
        return GraphKey(batch, rank, min(table_width(pages), table_width(self.max_pages)))

    def run(
        self, plan: StepPlan, weights: list[AdapterWeights | None], key: GraphKey
    ) -> torch.Tensor:
        """float32 logits [B, vocab] of the plan's rows (a view of the graph's output on CUDA:
        valid until the next step)."""
        shape = self._shape(key)
        shape.fill(plan, weights)
        if not self.use_graphs:
            return self._forward(shape)[: plan.num_rows]
        if shape.graph is None:
            started = time.perf_counter()
            self._capture(shape)
            # A shape the start-up warm-up left out: this step stalled for the capture.
            log.info(
                "decode graph captured on first use",
                batch=key.batch,
                rank=key.rank,
                width=key.width,
                seconds=round(time.perf_counter() - started, 3),
                graphs=self.captured,
            )
        assert shape.graph is not None and shape.logits is not None
        shape.graph.replay()
        return shape.logits[: plan.num_rows]

    def _shape(self, key: GraphKey) -> PaddedDecode:
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = PaddedDecode(key, self.kv, self.dtype, self.device)
        return shape

    def _forward(self, shape: PaddedDecode) -> torch.Tensor:
        return self.model(shape.arena.device["input_ids"], shape.meta, self.kv_layers)

    def _capture(self, shape: PaddedDecode) -> None:
        # Warm up on a side stream first (lazy initialisation must not land in the graph); the
        # inputs hold the current step, and the warm-up's KV writes are rewritten identically.
        side = self._warm_stream
        assert side is not None
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Thread-local: the adapter loader copies weights on its own thread and stream during
        # a capture; in global mode its (legal) calls would invalidate the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            shape.logits = self._forward(shape)
        shape.graph = graph
        self._captured += 1

    @property
    def captured(self) -> int:
        """Decode graphs captured so far (0 on CPU, where padded shapes run eagerly); a counter,
        so other threads (a metrics scrape) may read it while the engine adds shapes."""
        return self._captured

    def warm_up(self, ranks: tuple[int, ...]) -> None:
        """Captures every batch bucket and page-table width class of these LoRA rank classes
        before the shard serves, so no request waits for a capture; other shapes are still
        captured on first use. Widths stop at the widest table a request can have: it holds
        at most the longest context's pages, and no more pages than the KV pool has."""
        if not ranks:
            return
        widths = width_classes(min(self.max_pages, self.kv.pool.total))
        started = time.perf_counter()
        reserved = torch.cuda.memory_reserved(self.device) if self.use_graphs else 0
        self._capture_all(ranks, widths)
        if self.use_graphs:
            torch.cuda.synchronize(self.device)
            reserved = torch.cuda.memory_reserved(self.device) - reserved
            self.warm_up_bytes = reserved
        log.info(
            "decode graphs captured at start",
            graphs=self.captured,
            ranks=list(ranks),
            widths=list(widths),
            seconds=round(time.perf_counter() - started, 2),
            mib=round(reserved / 2**20, 1),
        )

    @torch.inference_mode()
    def _capture_all(self, ranks: tuple[int, ...], widths: tuple[int, ...]) -> None:
        # In warm_keys' order: largest batch first, so smaller graphs reuse its memory.
        for key in warm_keys(self.max_batch, ranks, widths):
            shape = self._shape(key)
            shape.arena.upload()
            if self.use_graphs and shape.graph is None:
                self._capture(shape)
