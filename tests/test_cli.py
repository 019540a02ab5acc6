"""The three command lines: defaults in --help, every flag explained, LORAFLEET_* variables
checked like flags (usage error, exit 2, no traceback), and `lorafleet generate -`."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from safetensors.torch import load_file, save_file

from protos import generate_pb2, generate_pb2_grpc
from router import client
from router import config as router_config
from router.local_process import free_port
from shard import config as shard_config
from shard.adapters.lora_ranks import MAX_RANK, RANK_CLASSES

ROOT = Path(__file__).resolve().parent.parent


def _parsers() -> list[argparse.ArgumentParser]:
    top = client.build_parser({})
    subcommands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return [
        shard_config.build_parser({}),
        router_config.build_parser({}),
        top,
        *subcommands.choices.values(),
    ]


@pytest.mark.parametrize("parser", _parsers(), ids=lambda p: p.prog)
def test_every_flag_has_help_that_shows_its_default(parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        assert action.help, f"{parser.prog} {action.option_strings or action.dest}: no help"
        if action.option_strings:
            shown = "default" in action.help or "required" in action.help
            assert shown, f"{parser.prog} {action.option_strings[0]}: default not shown"
    # Concrete defaults appear as values, not only as the word.
    expected = {
        "lorafleet-shard": ["default: 50061", "default: 1024", "default: 128", "default: 0.85"],
        "lorafleet-router": ["default: 50051", "default: consolidate", "default: 256"],
        "lorafleet generate": ["default: localhost:50051", "up to the model's context limit"],
    }.get(parser.prog, [])
    flat = " ".join(text.split())
    for needle in expected:
        assert needle in flat, f"{parser.prog} --help lacks {needle!r}"


def _model_argv(tiny) -> list[str]:
    return ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir)]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LORAFLEET_LOG_FORMAT", "jsn", "LORAFLEET_LOG_FORMAT='jsn': choose from auto, json"),
        ("LORAFLEET_PORT", "50o61", "LORAFLEET_PORT='50o61': expected an integer"),
        ("LORAFLEET_PORT", "70000", "LORAFLEET_PORT='70000': must be <= 65535"),
        ("LORAFLEET_MAX_LORA_RANK", "256", "LORAFLEET_MAX_LORA_RANK='256': must be <= 128"),
        ("LORAFLEET_KV_MEMORY_FRACTION", "1.5", "must be <= 1.0"),
        ("LORAFLEET_KV_MEMORY_MB", "0", "LORAFLEET_KV_MEMORY_MB='0': must be >= 1"),
        ("LORAFLEET_DEVICE", "tpu", "LORAFLEET_DEVICE='tpu': choose from cpu, cuda, auto"),
        ("LORAFLEET_GRAPH_WARMUP", "7", "LORAFLEET_GRAPH_WARMUP='7': --graph-warmup must be"),
        ("LORAFLEET_DRAIN_TIMEOUT_S", "soon", "expected a number"),
    ],
)
def test_shard_variables_are_checked_like_flags(
    tiny, capsys: pytest.CaptureFixture, variable: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        shard_config.parse_config(_model_argv(tiny), env={variable: value})
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_flag_wins_over_a_variable_and_an_empty_variable_is_unset(tiny) -> None:
    env = {"LORAFLEET_PORT": "50100", "LORAFLEET_MAX_BATCH_SIZE": "", "LORAFLEET_TP": " "}
    cfg = shard_config.parse_config(_model_argv(tiny), env=env)
    assert (cfg.port, cfg.max_batch_size, cfg.tp) == (50100, 32, 1)
    cfg = shard_config.parse_config([*_model_argv(tiny), "--port", "50200"], env=env)
    assert cfg.port == 50200


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LORAFLEET_RESIDENCY_FIRST", "maybe", "LORAFLEET_RESIDENCY_FIRST='maybe': expected one"),
        ("LORAFLEET_QUEUE_SIZE", "-1", "LORAFLEET_QUEUE_SIZE='-1': must be >= 0"),
        ("LORAFLEET_POLICY", "random", "LORAFLEET_POLICY='random': choose from consolidate"),
        ("LORAFLEET_SHUTDOWN_GRACE_S", "x", "LORAFLEET_SHUTDOWN_GRACE_S='x': expected a number"),
    ],
)
def test_router_variables_are_checked_like_flags(
    capsys: pytest.CaptureFixture, variable: str, value: str, message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        router_config.parse_config(["--shard", "a:1"], {variable: value})
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_client_target_variable_is_checked(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        client.build_parser({"LORAFLEET_TARGET": "nohost"}).parse_args(["info"])
    assert exit_.value.code == 2
    assert "LORAFLEET_TARGET='nohost': target: expected HOST:PORT" in capsys.readouterr().err
    args = client.build_parser({"LORAFLEET_TARGET": "h:1"}).parse_args(["info"])
    assert args.target == "h:1"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ((), "config.json not found"),
        (("config.json",), "tokenizer.json not found"),
        (("config.json", "tokenizer.json"), "no *.safetensors weights"),
    ],
)
def test_an_incomplete_model_folder_is_a_usage_error(
    tiny, tmp_path: Path, capsys: pytest.CaptureFixture, files: tuple[str, ...], message: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in files:
        (model / name).write_bytes((tiny.model_dir / name).read_bytes())
    argv = ["--model", str(model), "--adapters", str(tiny.adapters_dir)]
    with pytest.raises(SystemExit) as exit_:
        shard_config.parse_config(argv, env={})
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_max_lora_rank_is_bounded_by_the_kernels(tiny, capsys: pytest.CaptureFixture) -> None:
    # csrc/ops.cpp dispatches ranks to one kernel per class and refuses what is above the last.
    ops = (ROOT / "csrc" / "ops.cpp").read_text()
    assert f"rank <= {MAX_RANK})" in ops
    for rank in RANK_CLASSES[:-1]:
        assert f"if (r_max <= {rank}) return Launch<T, {rank}>::run" in ops
    assert shard_config.parse_config(_model_argv(tiny), env={}).max_lora_rank == MAX_RANK
    with pytest.raises(SystemExit):
        shard_config.parse_config([*_model_argv(tiny), "--max-lora-rank", "256"], env={})
    assert "argument --max-lora-rank: must be <= 128, got 256" in capsys.readouterr().err


def _run(
    module: str, *args: str, env: dict[str, str], stdin: str = ""
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=120,
    )


@pytest.mark.parametrize(
    ("module", "args", "env", "message"),
    [
        ("shard", ("--model", "/", "--adapters", "/"), {"LORAFLEET_LOG_FORMAT": "jsn"},
         "LORAFLEET_LOG_FORMAT='jsn'"),
        ("router", ("--shard", "a:1"), {"LORAFLEET_QUEUE_TIMEOUT_S": "-2"}, "must be > 0.0"),
        ("router", (), {}, "give either --shard"),
        ("router.client", ("info",), {"LORAFLEET_TARGET": "x"}, "expected HOST:PORT"),
    ],
)  # fmt: skip
def test_entry_points_end_bad_configuration_in_a_usage_error(
    module: str, args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    done = _run(module, *args, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "usage:" in done.stderr and message in done.stderr


def test_weights_that_do_not_fit_their_config_end_the_shard_without_a_traceback(
    tiny, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny.model_dir, model)
    weights = load_file(model / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if "layers.1." not in k}, model / "model.safetensors"
    )
    argv = ["--model", str(model), "--adapters", str(tiny.adapters_dir), "--device", "cpu"]
    done = _run("shard", *argv, "--host", "127.0.0.1", "--port", str(free_port()), env={})
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "lacks" in done.stderr and "layers.1." in done.stderr


class _Recorder(generate_pb2_grpc.GeneratorServicer):
    def __init__(self) -> None:
        self.requests: list[generate_pb2.GenerateRequest] = []

    def Generate(self, request, context):
        self.requests.append(request)
        yield generate_pb2.GenerateResponse(
            token_ids=[1], text=" ok", finish_reason=generate_pb2.FINISH_REASON_LENGTH
        )


def test_generate_dash_reads_the_prompt_from_stdin() -> None:
    recorder = _Recorder()
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    generate_pb2_grpc.add_GeneratorServicer_to_server(recorder, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    try:
        prompt = "a prompt\nover two lines, with a - in it\n"
        env = {"LORAFLEET_TARGET": f"127.0.0.1:{port}"}
        done = _run("router.client", "generate", "--adapter", "a1", "-", env=env, stdin=prompt)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"
        literal = _run("router.client", "generate", "--", "-x-", env=env, stdin="ignored")
        assert literal.returncode == 0, literal.stderr
    finally:
        server.stop(None)
    assert [(r.prompt, r.adapter_id) for r in recorder.requests] == [(prompt, "a1"), ("-x-", "")]
    # The CLI leaves max_new_tokens at 0: the server's default, up to the context limit.
    assert recorder.requests[0].stopping.max_new_tokens == 0


def test_shard_help_and_usage_errors_answer_before_torch_loads() -> None:
    """`lorafleet-shard --help` and a bad flag answer without importing torch (seconds saved on
    every mistyped command line)."""
    probe = (
        "import sys\nfrom shard.__main__ import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    print(e.code, 'torch' in sys.modules)\n"
    )
    for argv, code in ((["--help"], "0"), (["--max-batch-size", "zero"], "2")):
        run = subprocess.run(
            [sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True
        )
        assert run.stdout.split()[-2:] == [code, "False"], run.stdout + run.stderr
