"""The shard's one frozen configuration, built from flags with `LORAFLEET_*` env defaults."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from protos.cli import EnvArgumentParser, float_range, int_range
from shard.adapters.lora_ranks import MAX_RANK as MAX_KERNEL_RANK
from shard.adapters.lora_ranks import RANK_CLASSES
from shard.model.config import ModelConfigError, load_model_config

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
BASE_MISMATCH_MODES = ("warn", "error")
BLAS = ("cublas", "cublaslt")
# The default per-step prompt-token budget. 2,048 prompt rows are ~28 TFLOP at 7B, about five
# decode steps' time on an H100: lower it where inter-token latency matters more than time to
# first token. A CPU runs far fewer rows per second.
PREFILL_TOKENS = {"cuda": 2048, "cpu": 512}


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
    max_prefill_tokens: int  # prompt tokens per step (the token budget beside the decode rows):
    # a longer prompt is prefilled in chunks over several steps
    kv_pages: int | None  # explicit KV pool size; None: planned from the memory settings
    kv_memory_fraction: float  # share of device memory free after the weights for activations,
    # KV pages and adapters (CUDA)
    kv_memory_mb: int  # most memory for KV pages on CPU
    page_size: int  # tokens per KV page
    prefix_cache: bool  # share the KV pages of full prompt blocks among requests of one adapter
    # version that start with the same tokens
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


class GraphWarmupError(argparse.ArgumentTypeError, ValueError):
    """--graph-warmup names a class that is not a LoRA rank class."""


def parse_graph_warmup(value: str) -> tuple[int, ...]:
    """`off` -> (); `16,0` -> (0, 16). ArgumentTypeError (a ValueError to callers outside
    argparse) unless every entry is 0 or a LoRA rank class."""
    if value.strip() == "off":
        return ()
    valid = (0, *RANK_CLASSES)
    try:
        classes = {int(v) for v in value.split(",")}
    except ValueError:
        classes = set()
    if not classes or not classes <= set(valid):
        raise GraphWarmupError(
            f"--graph-warmup must be off or a comma list of LoRA rank classes {valid}, "
            f"got {value!r}"
        )
    return tuple(sorted(classes))


def model_folder_problem(model: Path, load_format: str) -> str | None:
    """Why `model` cannot be served, found before anything loads; None when it looks servable."""
    try:
        load_model_config(model)
    except ModelConfigError as err:
        return str(err)
    except (ValueError, KeyError, TypeError) as err:
        return f"{model / 'config.json'} is not a usable model config ({err!r})"
    if not (model / "tokenizer.json").is_file():
        return f"{model / 'tokenizer.json'} not found: the shard needs a fast tokenizer file"
    index = model / "model.safetensors.index.json"
    if load_format == "safetensors" and not (index.is_file() or any(model.glob("*.safetensors"))):
        return f"no *.safetensors weights in {model} (pickle .bin checkpoints are not loaded)"
    return None


def build_parser(env: Mapping[str, str]) -> EnvArgumentParser:
    """The `lorafleet-shard` command line; every flag defaults to a LORAFLEET_* variable."""
    p = EnvArgumentParser(
        prog="lorafleet-shard",
        description="Serve one base model and its LoRA adapters over gRPC: a lorafleet shard.",
        env=env,
    )
    positive, port = int_range(1), int_range(1, 65535)
    add = p.add_env
    add("--model", "Hugging Face Llama-family model folder; required")
    add("--adapters", "adapter root, one PEFT folder per adapter id; required")
    add("--host", "address to bind", "0.0.0.0")
    add("--port", "gRPC port", 50061, type=port)
    add(
        "--device",
        "cpu, cuda, or auto (cuda when available)",
        "auto",
        choices=("cpu", "cuda", "auto"),
    )
    add("--dtype", "weights dtype (default: bfloat16 on cuda, float32 on cpu)", choices=DTYPES)
    add("--tp", "tensor-parallel size (GPUs in this shard)", 1, type=positive)
    add("--max-batch-size", "requests in the running batch", 32, type=positive)
    add(
        "--max-prefill-tokens",
        "prompt tokens per step, beside the decode rows; a longer prompt is prefilled in chunks "
        f"(default: {PREFILL_TOKENS['cuda']} on cuda, {PREFILL_TOKENS['cpu']} on cpu)",
        type=positive,
    )
    add(
        "--kv-pages",
        "KV pool size in pages (default: planned from "
        "--kv-memory-fraction on cuda, --kv-memory-mb on cpu)",
        type=positive,
    )
    add(
        "--kv-memory-fraction",
        "cuda: share of the memory the weights "
        "leave free, for activations, decode graphs, adapters and KV pages",
        0.85,
        type=float_range(0.0, 1.0, low_open=True),
    )
    add(
        "--kv-memory-mb",
        "cpu: most memory for KV pages (fewer when a full batch at full context needs less)",
        1024,
        type=positive,
    )
    add("--page-size", "tokens per KV page", 16, type=positive)
    add(
        "--prefix-cache",
        "keep the KV pages of full prompt blocks for later requests of the same adapter version",
        "on",
        choices=("on", "off"),
    )
    add("--adapter-memory-mb", "device budget for resident adapters (LRU)", 2048, type=int_range(0))
    add(
        "--adapter-host-memory-mb",
        "host-memory adapter tier between disk and device (LRU)",
        8192,
        type=int_range(0),
    )
    add(
        "--adapter-base-mismatch",
        "an adapter trained on another base model: warn or error",
        "warn",
        choices=BASE_MISMATCH_MODES,
    )
    add(
        "--max-lora-rank",
        f"largest adapter rank accepted, at most {MAX_KERNEL_RANK} (the SGMV kernels' limit)",
        MAX_KERNEL_RANK,
        type=int_range(1, MAX_KERNEL_RANK),
    )
    add("--max-queue", "waiting requests before RESOURCE_EXHAUSTED", 1024, type=int_range(0))
    add(
        "--metrics-port",
        "Prometheus /metrics port; 0: off (default: off)",
        type=int_range(0, 65535),
    )
    add("--shard-id", "name in load snapshots (default: host:port)")
    add(
        "--drain-timeout-s",
        "on SIGTERM, seconds running requests may finish before they migrate",
        25.0,
        type=float_range(0.0),
    )
    add(
        "--log-format",
        "log lines: json, console, or auto (console on a terminal)",
        "auto",
        choices=("auto", "json", "console"),
    )
    add(
        "--tp-timeout-s",
        "limit in seconds of every tensor-parallel collective",
        120.0,
        type=float_range(1.0),
    )
    add("--cuda-graphs", "replay decode steps from CUDA graphs", "on", choices=("on", "off"))
    add(
        "--graph-warmup",
        "LoRA rank classes whose decode graphs are captured "
        f"at start (comma list of {', '.join(map(str, (0, *RANK_CLASSES)))}), or off",
        "0,16",
        type=parse_graph_warmup,
    )
    add(
        "--load-format",
        "weights: safetensors, or dummy (seeded random, for benchmarks)",
        "safetensors",
        choices=LOAD_FORMATS,
    )
    add(
        "--compile",
        "torch.compile the norm, RoPE and SwiGLU chains (cuda)",
        "on",
        choices=("on", "off"),
    )
    add("--blas", "library of the base model's matmuls (cuda)", "cublaslt", choices=BLAS)
    return p


def parse_config(
    argv: list[str] | None = None, env: Mapping[str, str] | None = None
) -> ShardConfig:
    """Flags win over env vars (`LORAFLEET_MODEL`, ...), which win over defaults. A bad value of
    either exits with a usage error (status 2)."""
    p = build_parser(os.environ if env is None else env)
    a = p.parse_args(argv)
    if not a.model or not a.adapters:
        p.error("--model and --adapters are required (or LORAFLEET_MODEL / LORAFLEET_ADAPTERS)")
    model, adapters = Path(a.model), Path(a.adapters)
    if not model.is_dir():
        p.error(f"{p.flag_and_env('model')}: {model} is not a folder")
    if not adapters.is_dir():
        p.error(f"{p.flag_and_env('adapters')}: {adapters} is not a folder")
    if (why := model_folder_problem(model, a.load_format)) is not None:
        p.error(f"{p.flag_and_env('model')}: {why}")
    device = a.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = a.dtype or ("bfloat16" if device == "cuda" else "float32")
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
        max_prefill_tokens=a.max_prefill_tokens or PREFILL_TOKENS[device],
        kv_pages=a.kv_pages,
        kv_memory_fraction=a.kv_memory_fraction,
        kv_memory_mb=a.kv_memory_mb,
        page_size=a.page_size,
        prefix_cache=a.prefix_cache == "on",
        adapter_memory_mb=a.adapter_memory_mb,
        adapter_host_memory_mb=a.adapter_host_memory_mb,
        adapter_base_mismatch=a.adapter_base_mismatch,
        max_lora_rank=a.max_lora_rank,
        max_queue=a.max_queue,
        metrics_port=a.metrics_port or None,
        shard_id=a.shard_id or f"{host_name}:{a.port}",
        drain_timeout_s=a.drain_timeout_s,
        log_format=a.log_format,
        tp_timeout_s=a.tp_timeout_s,
        cuda_graphs=a.cuda_graphs == "on",
        graph_warmup=a.graph_warmup,
        load_format=a.load_format,
        compile=a.compile == "on",
        blas=a.blas,
    )
