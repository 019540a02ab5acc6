"""The shard's one frozen configuration, built from flags with `LORAFLEET_*` env defaults."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
BASE_MISMATCH_MODES = ("warn", "error")
BLAS = ("cublas", "cublaslt")


@dataclass(frozen=True, slots=True)
class ShardConfig:
    model: Path  # Hugging Face Llama-family folder
    adapters: Path  # adapter root: one PEFT folder per adapter id
    host: str
    port: int
    device: str  # "cpu" or "cuda" (resolved from "auto")
    dtype: str
    tp: int  # tensor-parallel size (GPUs in this shard)
    max_batch_size: int  # requests in the running batch
    max_prefill_tokens: int  # prompt tokens per step
    kv_pages: int | None  # explicit KV pool size; None: planned from kv_memory_fraction
    kv_memory_fraction: float  # share of device memory free after the weights for activations,
    # KV pages and adapters
    page_size: int  # tokens per KV page
    adapter_memory_mb: int  # device budget for resident adapters
    adapter_host_memory_mb: int  # host-memory tier between disk and device (LRU beyond it)
    adapter_base_mismatch: str  # "warn" or "error": adapter trained on another base model
    max_lora_rank: int
    max_queue: int  # requests waiting on this shard before RESOURCE_EXHAUSTED
    metrics_port: int | None
    shard_id: str  # how this shard names itself in load snapshots
    drain_timeout_s: float  # SIGTERM: longest wait for running requests before exit
    log_format: str  # "json" or "console"; "auto" picks console on a TTY
    tp_timeout_s: float  # longest wait of any tensor-parallel collective before the shard exits
    cuda_graphs: bool  # replay decode steps from CUDA graphs (CUDA only)
    graph_warmup: tuple[int, ...]  # LoRA rank classes (0: no adapter) whose decode graphs are
    # captured at start, every batch bucket and page-table width; (): all on first use
    load_format: str  # "safetensors", or "dummy": seeded random weights (benchmarks)
    compile: bool  # torch.compile the elementwise chains (CUDA only)
    blas: str  # "cublas" or "cublaslt": the library of torch's matmuls (CUDA only)


def _env(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    return env.get(f"LORAFLEET_{name}", default)


def parse_graph_warmup(value: str) -> tuple[int, ...]:
    """`off` -> (); `16,0` -> (0, 16). ValueError unless every entry is 0 or a LoRA rank class."""
    # Imported here, as torch is below: --help and flag errors answer without loading torch.
    from shard.decode_graphs import RANK_CLASSES

    if value.strip() == "off":
        return ()
    valid = (0, *RANK_CLASSES)
    try:
        classes = {int(v) for v in value.split(",")}
    except ValueError:
        classes = set()
    if not classes or not classes <= set(valid):
        raise ValueError(
            f"--graph-warmup must be off or a comma list of LoRA rank classes {valid}, "
            f"got {value!r}"
        )
    return tuple(sorted(classes))


def parse_config(
    argv: list[str] | None = None, env: Mapping[str, str] | None = None
) -> ShardConfig:
    """Flags win over env vars (`LORAFLEET_MODEL`, ...), which win over defaults."""
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="lorafleet-shard", description=__doc__)

    def add(flag: str, env_name: str, default: str | None, help: str, **kw: object) -> None:
        p.add_argument(flag, default=_env(env, env_name, default), help=help, **kw)  # type: ignore[arg-type]

    add("--model", "MODEL", None, "Hugging Face Llama-family model folder")
    add("--adapters", "ADAPTERS", None, "adapter root (one PEFT folder per adapter id)")
    add("--host", "HOST", "0.0.0.0", "address to bind")
    add("--port", "PORT", "50061", "gRPC port", type=int)
    add("--device", "DEVICE", "auto", "cpu, cuda or auto", choices=("cpu", "cuda", "auto"))
    add("--dtype", "DTYPE", None, "weights dtype (default bfloat16 on cuda, float32 on cpu)")
    add("--tp", "TP", "1", "tensor-parallel size", type=int)
    add("--max-batch-size", "MAX_BATCH_SIZE", "32", "requests per running batch", type=int)
    add("--max-prefill-tokens", "MAX_PREFILL_TOKENS", "4096", "prompt tokens per step", type=int)
    add("--kv-pages", "KV_PAGES", None, "KV pool size in pages (overrides the fraction)", type=int)
    add("--kv-memory-fraction", "KV_MEMORY_FRACTION", "0.85", "free memory share", type=float)
    add("--page-size", "PAGE_SIZE", "16", "tokens per KV page", type=int)
    add("--adapter-memory-mb", "ADAPTER_MEMORY_MB", "2048", "device adapter budget", type=int)
    add(
        "--adapter-host-memory-mb",
        "ADAPTER_HOST_MEMORY_MB",
        "8192",
        "host-memory adapter tier",
        type=int,
    )
    add(
        "--adapter-base-mismatch",
        "ADAPTER_BASE_MISMATCH",
        "warn",
        "adapter of another base model: warn or error",
        choices=BASE_MISMATCH_MODES,
    )
    add("--max-lora-rank", "MAX_LORA_RANK", "128", "largest adapter rank accepted", type=int)
    add("--max-queue", "MAX_QUEUE", "1024", "waiting requests before refusing", type=int)
    add("--metrics-port", "METRICS_PORT", None, "Prometheus /metrics port", type=int)
    add("--shard-id", "SHARD_ID", None, "name in load snapshots (default host:port)")
    add("--drain-timeout-s", "DRAIN_TIMEOUT_S", "25", "SIGTERM drain limit", type=float)
    add("--log-format", "LOG_FORMAT", "auto", "log lines", choices=("auto", "json", "console"))
    add("--tp-timeout-s", "TP_TIMEOUT_S", "120", "tensor-parallel collective limit", type=float)
    add("--cuda-graphs", "CUDA_GRAPHS", "on", "decode via CUDA graphs", choices=("on", "off"))
    add(
        "--graph-warmup",
        "GRAPH_WARMUP",
        "0,16",
        "LoRA rank classes whose decode graphs are captured at start (comma list), or off",
    )
    add("--load-format", "LOAD_FORMAT", "safetensors", "weights", choices=LOAD_FORMATS)
    add("--compile", "COMPILE", "on", "fuse norm/RoPE/SwiGLU (CUDA)", choices=("on", "off"))
    add("--blas", "BLAS", "cublaslt", "library of the base-model matmuls (CUDA)", choices=BLAS)
    a = p.parse_args(argv)

    if not a.model or not a.adapters:
        p.error("--model and --adapters are required (or LORAFLEET_MODEL / LORAFLEET_ADAPTERS)")
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype not in DTYPES:
        p.error(f"--dtype must be one of {DTYPES}")
    for name, value, low in (
        ("--tp", a.tp, 1),
        ("--max-batch-size", a.max_batch_size, 1),
        ("--page-size", a.page_size, 1),
        ("--max-prefill-tokens", a.max_prefill_tokens, 1),
        ("--max-lora-rank", a.max_lora_rank, 1),
        ("--tp-timeout-s", a.tp_timeout_s, 1),
    ):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if not 0.0 < a.kv_memory_fraction < 1.0:
        p.error("--kv-memory-fraction must be in (0, 1)")
    try:
        graph_warmup = parse_graph_warmup(a.graph_warmup)
    except ValueError as err:
        p.error(str(err))
    model, adapters = Path(a.model), Path(a.adapters)
    if not model.is_dir():
        p.error(f"--model {model} is not a folder")
    if not adapters.is_dir():
        p.error(f"--adapters {adapters} is not a folder")
    host_name = socket.gethostname() if a.host in ("0.0.0.0", "::") else a.host
    return ShardConfig(
        model=model,
        adapters=adapters,
        host=a.host,
        port=a.port,
        device=device,
        dtype=dtype,
        tp=a.tp,
        max_batch_size=a.max_batch_size,
        max_prefill_tokens=a.max_prefill_tokens,
        kv_pages=a.kv_pages,
        kv_memory_fraction=a.kv_memory_fraction,
        page_size=a.page_size,
        adapter_memory_mb=a.adapter_memory_mb,
        adapter_host_memory_mb=a.adapter_host_memory_mb,
        adapter_base_mismatch=a.adapter_base_mismatch,
        max_lora_rank=a.max_lora_rank,
        max_queue=a.max_queue,
        metrics_port=a.metrics_port,
        shard_id=a.shard_id or f"{host_name}:{a.port}",
        drain_timeout_s=a.drain_timeout_s,
        log_format=a.log_format,
        tp_timeout_s=a.tp_timeout_s,
        cuda_graphs=a.cuda_graphs == "on",
        graph_warmup=graph_warmup,
        load_format=a.load_format,
        compile=a.compile == "on",
        blas=a.blas,
    )
