"""The prefix cache on a tensor-parallel shard (TP=2, gloo): rank 0 chooses the cached pages, and
the follower, which replays every forward, holds the same keys and values in them; a hit and a
hot reload give PEFT's tokens on every rank."""

from __future__ import annotations

import shutil
import signal
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import generate_pb2
from router.local_process import free_port
from tests.processes import start, stop, wait_serving
from tests.reference import greedy
from tests.test_tp_adapters import NEW, Stream, replace_files

pytestmark = pytest.mark.slow
SYSTEM = [(17 * i + 5) % 290 + 5 for i in range(16)]  # 4 full pages of 4 tokens


def hit_tokens(metrics: str) -> float:
    text = urllib.request.urlopen(metrics, timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(
        s.value
        for s in families["lorafleet_shard_prefix_hit_tokens"].samples
        if s.name.endswith("_total")
    )


def request(prompt: list[int]) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        adapter_id="swap",
        prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=NEW, ignore_eos=True),
    )


def test_hits_and_a_reload_on_a_tensor_parallel_shard_match_peft(tiny, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    v1, v2 = tiny.adapter_dir("r8-all"), tiny.adapter_dir("r32-mlp")
    shutil.copytree(v1, root / "swap")
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "shard.log"
    args = [
        *("shard", "--model", str(tiny.model_dir), "--adapters", str(root)),
        *("--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--page-size", "4"),
        *("--tp", "2", "--tp-timeout-s", "20", "--metrics-port", str(metrics_port)),
    ]
    proc = start(args, log)
    address, metrics = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        wait_serving(address, proc, log)
        first, second = [*SYSTEM, 201, 202], [*SYSTEM, 90, 91, 92]
        assert Stream(address, request(first)).result() == greedy(tiny.model_dir, v1, first, NEW)[0]
        assert hit_tokens(metrics) == 0
        assert (
            Stream(address, request(second)).result() == greedy(tiny.model_dir, v1, second, NEW)[0]
        )
        assert hit_tokens(metrics) == 16
        replace_files(v2, root / "swap")
        assert (
            Stream(address, request(second)).result() == greedy(tiny.model_dir, v2, second, NEW)[0]
        )
        assert hit_tokens(metrics) == 16  # nothing of the old version was used
        assert proc.poll() is None, log.read_text()[-3000:]
    finally:
        stop(proc, signal.SIGKILL)
