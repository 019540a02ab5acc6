"""`make run`: a shard and a router on localhost, completions for several adapters side by side.

Environment: MODEL and ADAPTERS (a Hugging Face Llama folder and a PEFT adapter root; when either
is empty a tiny random model is written with `python -m shard.tiny`), DEMO_DIR (scratch folder for
the tiny model and the logs). Every child process is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from protos import generate_pb2, generate_pb2_grpc
from router.local_process import free_port
from router.local_process import wait_serving as probe_serving

PROMPT = "Once upon a time, in a land far away,"
MAX_STREAMS = 6
BASE = "(base model)"


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What the demo serves and where it writes."""

    model: Path | None
    adapters: Path | None
    demo_dir: Path
    max_new_tokens: int = 64
    # Seconds to wait for the shard: loading a real model or building kernels takes a while.
    start_timeout_s: float = 600.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DemoConfig:
        """MODEL, ADAPTERS, DEMO_DIR (default .demo)."""
        model, adapters = env.get("MODEL", ""), env.get("ADAPTERS", "")
        both = bool(model and adapters)
        if bool(model) != bool(adapters):
            raise SystemExit("demo: give both MODEL and ADAPTERS, or neither for the tiny model")
        return cls(
            model=Path(model) if both else None,
            adapters=Path(adapters) if both else None,
            demo_dir=Path(env.get("DEMO_DIR") or ".demo"),
        )


class Children:
    """Child processes of the demo; leaving the block stops them (SIGTERM, SIGKILL after 30 s)."""

    def __init__(self, log_dir: Path):
        self._log_dir = log_dir
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Children:
        return self

    def start(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        """Starts `python -m ARGS` in its own session (Ctrl-C reaches only the demo)."""
        with open(self._log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        try:
            for proc in reversed(self._procs):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            # Reached on timeout and on a second Ctrl-C alike: nothing outlives the demo.
            for proc in self._procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Waits until `address` reports health SERVING; fails early if the process dies."""
    if (why := probe_serving(address, proc, timeout)) is not None:
        raise SystemExit(f"demo: {why}; see {log}")


@dataclass(slots=True)
class StreamView:
    """One adapter's completion as it arrives (mutated by its streaming thread)."""

    adapter: str
    text: str = ""
    tokens: int = 0
    started: float = 0.0
    first_token_s: float = 0.0
    elapsed_s: float = 0.0
    status: str = "waiting"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0


def stream(stub: generate_pb2_grpc.GeneratorStub, view: StreamView, max_new_tokens: int) -> None:
    """Streams one completion into `view`."""
    request = generate_pb2.GenerateRequest(
        adapter_id="" if view.adapter == BASE else view.adapter,
        prompt=PROMPT,
        stopping=generate_pb2.StoppingCriteria(max_new_tokens=max_new_tokens),
    )
    view.started = time.monotonic()
    view.status = "streaming"
    try:
        for message in stub.Generate(request, timeout=300):
            view.text += message.text
            view.tokens += len(message.token_ids)
            view.elapsed_s = time.monotonic() - view.started
            if message.token_ids and not view.first_token_s:
                view.first_token_s = view.elapsed_s
            if message.finish_reason:
                view.status = generate_pb2.FinishReason.Name(message.finish_reason)
                view.status = view.status.removeprefix("FINISH_REASON_").lower()
    except grpc.RpcError as err:
        view.status = f"{err.code().name}: {err.details()}"


def printable(text: str) -> str:
    """Text safe to draw: control characters (a random tiny model emits them) shown as dots."""
    return "".join(c if c.isprintable() or c == " " else "·" for c in text)


def render(views: Sequence[StreamView]) -> Table:
    """The side-by-side table: one row per adapter."""
    table = Table(title=f"lorafleet: {PROMPT!r}", expand=True)
    table.add_column("adapter", no_wrap=True)
    table.add_column("completion so far", ratio=1)
    table.add_column("tokens", justify="right")
    table.add_column("tok/s", justify="right")
    table.add_column("status", no_wrap=True)
    for v in views:
        table.add_row(
            v.adapter, printable(v.text), str(v.tokens), f"{v.tokens_per_s:.1f}", v.status
        )
    return table


def run_streams(router: str, adapters: Sequence[str], config: DemoConfig, console: Console) -> None:
    """Streams all adapters at once, live in a table on a terminal, as plain lines otherwise."""
    views = [StreamView(a) for a in adapters]
    with grpc.insecure_channel(router) as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        threads = [
            threading.Thread(target=stream, args=(stub, v, config.max_new_tokens), daemon=True)
            for v in views
        ]
        started = time.monotonic()
        for t in threads:
            t.start()
        if console.is_terminal:
            with Live(render(views), console=console, refresh_per_second=12) as live:
                while any(t.is_alive() for t in threads):
                    time.sleep(1 / 12)
                    live.update(render(views))
                live.update(render(views))
        else:
            for t, v in zip(threads, views, strict=True):
                t.join()
                console.print(f"[{v.adapter}] {printable(v.text)} ({v.status})", markup=False)
        wall = time.monotonic() - started
    total = sum(v.tokens for v in views)
    console.print(
        f"{len(views)} concurrent streams, {total} tokens in {wall:.2f} s "
        f"({total / wall:.1f} tok/s overall)",
        markup=False,
        soft_wrap=True,
    )
    for v in views:
        console.print(
            f"  {v.adapter:<24} {v.tokens:>4} tokens  first token {v.first_token_s * 1000:7.1f} ms"
            f"  {v.tokens_per_s:6.1f} tok/s  {v.status}",
            markup=False,
            soft_wrap=True,
        )
    if any(v.status not in ("length", "stop", "eos") for v in views):
        raise SystemExit("demo: some streams failed (see the status column)")


def demo(config: DemoConfig, console: Console) -> None:
    """Starts the processes, runs the streams, stops everything."""
    config.demo_dir.mkdir(parents=True, exist_ok=True)
    logs = config.demo_dir.resolve()
    with Children(logs) as children:
        model, adapters = config.model, config.adapters
        if model is None or adapters is None:
            console.print(f"writing the tiny model to {config.demo_dir} ...", markup=False)
            tiny = subprocess.run(
                [sys.executable, "-m", "shard.tiny", str(config.demo_dir)],
                capture_output=True,
                text=True,
                check=True,
            )
            model, adapters = (Path(line) for line in tiny.stdout.split())
        shard = f"127.0.0.1:{free_port()}"
        router = f"127.0.0.1:{free_port()}"
        console.print(f"starting a shard on {shard} and a router on {router} ...", markup=False)
        shard_proc = children.start(
            "shard",
            ["shard", "--model", str(model), "--adapters", str(adapters), "--host", "127.0.0.1",
             "--port", shard.rsplit(":", 1)[1], "--device", "auto"],
        )  # fmt: skip
        router_proc = children.start(
            "router",
            ["router", "--host", "127.0.0.1", "--port", router.rsplit(":", 1)[1],
             "--shard", shard, "--http-port=0"],
        )  # fmt: skip
        wait_serving(shard, shard_proc, logs / "shard.log", config.start_timeout_s)
        wait_serving(router, router_proc, logs / "router.log", 30)
        with grpc.insecure_channel(router) as channel:
            stub = generate_pb2_grpc.GeneratorStub(channel)
            reply = _wait_for_adapters(stub)
        ids = sorted({a.adapter_id for a in reply.adapters})
        console.print(f"adapters: {', '.join(ids)}", markup=False)
        run_streams(router, [BASE, *ids[: MAX_STREAMS - 1]], config, console)
        console.print(f"stopping (logs in {logs}) ...", markup=False)


def _wait_for_adapters(stub: generate_pb2_grpc.GeneratorStub) -> generate_pb2.ListAdaptersResponse:
    # The router lists a shard's adapters once its load stream is live (a moment after SERVING).
    deadline = time.monotonic() + 30
    while True:
        try:
            return stub.ListAdapters(generate_pb2.ListAdaptersRequest(), timeout=5)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def main() -> None:
    """`python -m router.demo` (what `make run` runs)."""
    console = Console()
    try:
        demo(DemoConfig.from_env(os.environ), console)
    except KeyboardInterrupt:
        console.print("interrupted; everything stopped", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
