"""The adapter benchmark's synthetic model: a Llama-7B-shaped config (or a tiny one for a CPU
check) and a step of its dense projections as plain matmuls, no attention, with the q_proj LoRA
term applied per segment from the weights the scheduler claimed, so a step costs a 7B step's
time and every request really waits for its adapter's copy."""

from __future__ import annotations

import time

import torch

from shard.adapters.cache import AdapterCache
from shard.engine.step_plan import Step
from shard.model.config import ModelConfig

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VOCAB = 512  # the synthetic head's width; token ids are never decoded into real text


def model_config(small: bool) -> ModelConfig:
    h, i, layers = (256, 688, 4) if small else (4096, 11008, 32)
    heads = 4 if small else 32
    return ModelConfig(
        name="synthetic-llama",
        vocab_size=VOCAB,
        hidden_size=h,
        intermediate_size=i,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_ids=(),
    )


class SyntheticForward:
    """A 7B-shaped step: per layer the fused qkv, o, gate_up and down matmuls, plus the q_proj
    LoRA term of every segment from its resident weights; logits from a small head.

    The LoRA term takes a fixed number of launches per layer whatever the number of distinct
    adapters, as the SGMV kernels do: rows are gathered into [segments, longest] (short segments
    padded with a spare row, whose results land in that spare row), then two batched matmuls and
    one scatter-add. `loop=True` launches per segment instead (the first GPU run's forward, whose
    step time grew with the number of distinct adapters in the batch)."""

    def __init__(
        self,
        cfg: ModelConfig,
        cache: AdapterCache,
        max_rows: int,
        min_step_s: float = 0.0,
        segment_s: float = 0.0,
        loop: bool = False,
    ) -> None:
        d, dt = cache.device, cache.dtype
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.cfg, self.cache, self.loop = cfg, cache, loop
        # `--sim-step-ms`, `--sim-segment-ms`: a CPU step lasts as long as a GPU's, and may cost
        # more per distinct adapter.
        self.min_step_s, self.segment_s = min_step_s, segment_s
        self.layers = [
            (
                torch.randn(h, 3 * h, device=d, dtype=dt) * 0.01,
                torch.randn(h, h, device=d, dtype=dt) * 0.01,
                torch.randn(h, 2 * i, device=d, dtype=dt) * 0.01,
                torch.randn(i, h, device=d, dtype=dt) * 0.01,
            )
            for _ in range(cfg.num_layers)
        ]
        self.head = torch.randn(h, VOCAB, device=d, dtype=dt)
        self.x = torch.randn(max_rows + 1, h, device=d, dtype=dt)

    retry_alone = True

    @torch.inference_mode()
    def execute(self, step: Step) -> torch.Tensor:
        start = time.perf_counter()
        plan = step.plan
        t, hid = plan.num_rows, self.cfg.hidden_size
        bounds = [row for row, _ in plan.segments] + [t]
        loras = [(bounds[n], bounds[n + 1], w) for n, w in enumerate(step.weights) if w is not None]
        if loras and not self.loop:
            longest = max(hi - lo for lo, hi, _ in loras)
            rows = [[*range(lo, hi), *[t] * (longest - hi + lo)] for lo, hi, _ in loras]
            idx = torch.tensor(rows, device=self.x.device)  # [S, longest]; t: the spare row
            a = torch.stack([w.a["q_proj"] for *_, w in loras])  # [S, L, r, hidden]
            b = torch.stack([w.b["q_proj"] for *_, w in loras])  # [S, L, r, hidden]
        h = self.x[: t + 1]  # the last row is the spare one
        for layer, (qkv, o, gate_up, down) in enumerate(self.layers):
            q = h @ qkv
            if loras and self.loop:
                for lo, hi, w in loras:
                    v = h[lo:hi] @ w.a["q_proj"][layer].T
                    q[lo:hi, :hid] += v @ w.b["q_proj"][layer]
            elif loras:
                v = torch.bmm(h[idx], a[:, layer].transpose(1, 2))  # [S, longest, r]
                q[:, :hid].index_add_(0, idx.flatten(), torch.bmm(v, b[:, layer]).flatten(0, 1))
            h = h + q[:, :hid] @ o
            g = h @ gate_up
            h = h + (g[:, : self.cfg.intermediate_size] * g[:, self.cfg.intermediate_size :]) @ down
            h = h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(h.dtype)
        out = torch.tensor(plan.logits_rows, device=h.device)
        logits = (h[out] @ self.head).float()
        least = self.min_step_s + self.segment_s * len(loras)
        time.sleep(max(0.0, start + least - time.perf_counter()))
        return logits
