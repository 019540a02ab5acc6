"""Adapter versions on a tensor-parallel shard (TP=2, gloo): every rank reads the adapter's files
itself, so files replaced between rank 0's read and a follower's read must neither crash the
shard nor mix two versions in one forward; a reload must not take the old version away from a
follower while requests still run on it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port
from tests.processes import start, stop, wait_serving
from tests.reference import greedy

pytestmark = pytest.mark.slow
NEW = 10
LONG = 60  # tokens of the stream that must outlive a reload
PROMPT = [9, 18, 27, 36]


def replace_files(src: Path, dst: Path) -> None:
    """Replaces an adapter's two files (new file, then rename), with a new mtime."""
    time.sleep(0.01)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        tmp = dst / f".{name}.new"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


def request(adapter: str, new: int) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        adapter_id=adapter,
        prompt_token_ids=generate_pb2.TokenIds(ids=PROMPT),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=new, ignore_eos=True),
    )


class Stream:
    """One Generate call consumed by a thread: its tokens, or the error that ended it."""

    def __init__(self, address: str, req: generate_pb2.GenerateRequest) -> None:
        self.channel = grpc.insecure_channel(address)
        self.call = generate_pb2_grpc.GeneratorStub(self.channel).Generate(req, timeout=120)
        self.tokens: list[int] = []
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for msg in self.call:
                self.tokens.extend(msg.token_ids)
        except grpc.RpcError as e:
            self.error = e

    def wait_tokens(self, n: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.tokens) < n and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(self.tokens) >= n, self.error

    def result(self) -> list[int]:
        self.thread.join(120)
        self.channel.close()
        if self.error is not None:
            raise self.error
        return self.tokens

    def cancel(self) -> None:
        self.call.cancel()
        self.thread.join(30)
        self.channel.close()


def residency(address: str, adapter: str) -> int:
    with grpc.insecure_channel(address) as ch:
        listed = generate_pb2_grpc.GeneratorStub(ch).ListAdapters(
            generate_pb2.ListAdaptersRequest(), timeout=10
        )
    return next(a.residency for a in listed.adapters if a.adapter_id == adapter)


@pytest.fixture
def tp_shard(tiny, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path, Path]]:
    """A TP=2 shard with a batch of two over an adapter root holding `swap` (r8-all's files)."""
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(tiny.adapter_dir("r8-all"), root / "swap")
    port = free_port()
    log = tmp_path / "shard.log"
    args = [
        *("shard", "--model", str(tiny.model_dir), "--adapters", str(root)),
        *("--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--page-size", "4"),
        *("--tp", "2", "--tp-timeout-s", "20", "--max-batch-size", "2"),
    ]
    proc = start(args, log)
    try:
        wait_serving(f"127.0.0.1:{port}", proc, log)
        yield f"127.0.0.1:{port}", proc, log, root
    finally:
        stop(proc, signal.SIGKILL)


def test_files_replaced_between_rank_reads_run_one_version_and_shard_stays_up(
    tp_shard, tiny
) -> None:
    address, proc, log, root = tp_shard
    v1, v2 = tiny.adapter_dir("r8-all"), tiny.adapter_dir("r16-attn")
    assert greedy(tiny.model_dir, v1, PROMPT, NEW)[0] != greedy(tiny.model_dir, v2, PROMPT, NEW)[0]
    # Two long base-model streams fill the batch, so the adapter request waits in the queue
    # after rank 0 has read its files (at lookup) and before any follower has.
    fillers = [Stream(address, request("", 240)) for _ in range(2)]
    for s in fillers:
        s.wait_tokens(2)
    waiting = Stream(address, request("swap", NEW))
    deadline = time.monotonic() + 30
    while residency(address, "swap") != generate_pb2.ADAPTER_RESIDENCY_HOST:
        assert time.monotonic() < deadline, "rank 0 never read the adapter"
        time.sleep(0.01)
    replace_files(v2, root / "swap")
    for s in fillers:
        s.cancel()
    # Rank 0 read v1 and the follower reads v2: the request runs on one version (v2, re-read
    # by rank 0 once the follower reports the difference), never on a mix of both.
    assert waiting.result() == greedy(tiny.model_dir, v2, PROMPT, NEW)[0]
    assert proc.poll() is None, log.read_text()[-3000:]
    assert "adapter files changed while followers read them" in log.read_text()
    assert (
        Stream(address, request("swap", NEW)).result() == greedy(tiny.model_dir, v2, PROMPT, NEW)[0]
    )

    # A reload while a stream runs on the old version: the followers keep that version until
    # the stream ends, so both streams finish exactly on their own weights.
    v3 = tiny.adapter_dir("r4-qv")
    old = Stream(address, request("swap", LONG))
    old.wait_tokens(3)
    replace_files(v3, root / "swap")
    new_tokens = Stream(address, request("swap", NEW)).result()
    old_tokens = old.result()
    assert new_tokens == greedy(tiny.model_dir, v3, PROMPT, NEW)[0]
    assert old_tokens == greedy(tiny.model_dir, v2, PROMPT, LONG)[0]
    assert proc.poll() is None, log.read_text()[-3000:]
