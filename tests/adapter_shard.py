"""An in-process shard over an adapter root with good and broken adapters, and the gRPC calls
the adapter tests make to it. Its fixtures (`root`, `shard`: one per test module that asks) are
registered in tests/conftest.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from protos import generate_pb2, generate_pb2_grpc, shard_pb2, shard_pb2_grpc
from shard.adapters.cache import AdapterCache
from shard.compose import build_engine
from shard.config import parse_config
from shard.edge.server import GeneratorServicer, ShardServicer
from shard.parallel.group import SINGLE

NEW = 12
SOURCES = ("r8-all", "r16-attn", "r8-all", "r16-attn", "r8-all", "r16-attn")
CROWD = tuple(f"crowd-{i}" for i in range(len(SOURCES)))  # distinct ids, 3x what fits
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def copy_adapter(tiny, source: str, root: Path, name: str) -> Path:
    return Path(shutil.copytree(tiny.adapter_dir(source), root / name))


def edit_weights(folder: Path, key_part: str, fn) -> None:
    tensors = load_file(folder / WEIGHTS)
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = fn(tensors[key]).contiguous()
    save_file(tensors, folder / WEIGHTS)


def edit_config(folder: Path, **changes: object) -> None:
    conf = json.loads((folder / CONFIG).read_text())
    conf.update(changes)
    (folder / CONFIG).write_text(json.dumps(conf))


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter root with good copies of the tiny adapters and one folder per way to fail."""
    base = tmp_path_factory.mktemp("adapter-root")
    root = base / "root"
    root.mkdir()
    for a in tiny.adapter_ids:
        copy_adapter(tiny, a, root, a)
    for name, source in zip(CROWD, SOURCES, strict=True):
        copy_adapter(tiny, source, root, name)
    copy_adapter(tiny, "r8-all", root, "hot")

    bad = copy_adapter(tiny, "r4-qv", root, "bad-target")
    edit_config(bad, target_modules=["q_proj", "lm_head"])
    edit_weights(
        copy_adapter(tiny, "r8-all", root, "bad-shape"), "q_proj.lora_A", lambda t: t[:, :32]
    )
    # GQA: k_proj's output is num_kv_heads * head_dim = 32 wide, not hidden_size = 64.
    edit_weights(
        copy_adapter(tiny, "r8-all", root, "bad-gqa"), "k_proj.lora_B", lambda t: t.repeat(2, 1)
    )
    pickled = copy_adapter(tiny, "r4-qv", root, "pickle-only")
    (pickled / WEIGHTS).rename(pickled / "adapter_model.bin")
    no_config = copy_adapter(tiny, "r4-qv", root, "no-config")
    (no_config / CONFIG).unlink()
    for name in ("other-base-warn", "other-base-error"):
        edit_config(
            copy_adapter(tiny, "r4-qv", root, name),
            base_model_name_or_path="meta-llama/Llama-2-7b-hf",
        )
    outside = copy_adapter(tiny, "r4-qv", base, "outside")
    (root / "escape-link").symlink_to(outside, target_is_directory=True)
    file_link = copy_adapter(tiny, "r4-qv", root, "file-link")
    (file_link / WEIGHTS).unlink()
    (file_link / WEIGHTS).symlink_to(outside / WEIGHTS)
    return root


class InProcessShard:
    """A shard's engine and both gRPC services on a loopback port, served from a thread."""

    def __init__(self, tiny, root: Path, *flags: str) -> None:
        argv = ["--model", str(tiny.model_dir), "--adapters", str(root), "--device", "cpu"]
        self.engine, self.service, _ = build_engine(
            parse_config([*argv, "--page-size", "4", *flags], env={}), SINGLE
        )
        self.adapters: AdapterCache = self.service.adapters
        self.engine.start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.address = f"127.0.0.1:{port}"

    async def _start(self) -> int:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        generate_pb2_grpc.add_GeneratorServicer_to_server(
            GeneratorServicer(self.service), self.server
        )
        shard_pb2_grpc.add_ShardServicer_to_server(ShardServicer(self.service), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine.stop()
        self.adapters.close()

    def metric(self, name: str, **labels: str) -> float:
        return self.engine.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def shard(tiny, root: Path) -> Iterator[InProcessShard]:
    s = InProcessShard(tiny, root, "--max-lora-rank", "32")
    try:
        yield s
    finally:
        s.close()


def request(adapter: str, prompt: list[int], new: int = NEW) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        adapter_id=adapter,
        prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=new, ignore_eos=True),
    )


def generate(address: str, req: generate_pb2.GenerateRequest, timeout: float = 120) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        stream = generate_pb2_grpc.GeneratorStub(ch).Generate(req, timeout=timeout)
        return [t for m in stream for t in m.token_ids]


def load_adapter(address: str, adapter: str) -> generate_pb2.AdapterInfo:
    with grpc.insecure_channel(address) as ch:
        stub = shard_pb2_grpc.ShardStub(ch)
        return stub.LoadAdapter(
            shard_pb2.LoadAdapterRequest(adapter_id=adapter), timeout=60
        ).adapter
