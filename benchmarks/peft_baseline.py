"""The baseline users have without a multi-LoRA server: transformers + PEFT `generate` with
`adapter_names` mixing adapters in one batch (and with adapters disabled), over the same PEFT
folders lorafleet serves; plus the writer of those folders."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch

from benchmarks.workloads import POPULARITY, TARGETS, Result, Workload, format_row


def peft_results(
    model_dir: Path, adapter_dir: Path, works: list[Workload], new_tokens: int, device: str
) -> list[Result]:
    """transformers + PEFT generate over the same adapters, mixed in one batch by
    `adapter_names`; decode step = median gap between generated steps, timed by a streamer."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    names = sorted({a for w in works for a in w.adapters if a}, key=lambda a: int(a[1:]))
    model = PeftModel.from_pretrained(base, adapter_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dir / name, adapter_name=name)
    model.eval()
    out: list[Result] = []

    def timed(work: Workload, k: int, adapters: list[str] | None) -> TokenClock:
        width = max(len(p) for p in work.prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in work.prompts], device=device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in work.prompts], device=device
        )
        gen = GenerationConfig(
            max_new_tokens=k, min_new_tokens=k, do_sample=False, eos_token_id=-1, pad_token_id=0
        )
        kwargs = {"adapter_names": adapters} if adapters is not None else {}
        clock = TokenClock()
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, generation_config=gen, streamer=clock, **kwargs
            )
        clock.end()
        return clock

    for work in works:
        systems = [("peft", work.adapters)]
        if work.name == POPULARITY[0]:
            systems.append(("hf-base", None))
        for system, adapters in systems:
            with contextlib.ExitStack() as stack:
                if adapters is None:
                    stack.enter_context(model.disable_adapter())
                timed(work, 2, adapters)  # warm-up
                clock = timed(work, 1 + new_tokens, adapters)
            step = statistics.median(clock.gaps)
            out.append(
                Result(
                    system=system,
                    case=work.name,
                    batch=len(work.prompts),
                    tokens_per_s=len(work.prompts) * (1 + new_tokens) / clock.total,
                    decode_tokens_per_s=len(work.prompts) / step,
                    step_ms=step * 1e3,
                    ttft_p50_ms=clock.ttft * 1e3,
                    ttft_p99_ms=clock.ttft * 1e3,
                )
            )
            print(format_row(out[-1]), flush=True)
    return out


class TokenClock:
    """A transformers streamer that only timestamps: `generate` calls put() once with the
    prompt, then once per generated step (every row's token together)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        self.finish = time.perf_counter()

    @property
    def ttft(self) -> float:
        return self.times[1] - self.start  # times[0] is the prompt

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times[1:], self.times[2:], strict=False)]

    @property
    def total(self) -> float:
        return self.finish - self.start


def write_adapters(model_dir: Path, adapter_dir: Path, count: int, rank: int, device: str) -> None:
    """`count` PEFT folders a0..a{count-1}: rank `rank` on all seven projections, random A and B
    (generated on the GPU), written by PEFT itself from a meta-device copy of the base."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), lora_dropout=0.0)
    peft_model = get_peft_model(base, lora)
    shapes = {
        name.replace(".default", ""): tuple(p.shape)
        for name, p in peft_model.named_parameters()
        if "lora_" in name
    }
    gen = torch.Generator(device).manual_seed(1)
    for i in range(count):
        folder = adapter_dir / f"a{i}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            name: (torch.randn(shape, generator=gen, device=device) * 0.01).to(torch.bfloat16).cpu()
            for name, shape in shapes.items()
        }
        save_file(tensors, folder / "adapter_model.safetensors")
        lora.base_model_name_or_path = str(model_dir)
        lora.save_pretrained(folder)
