"""Shard flags that choose a backend: --blas."""

from __future__ import annotations

import pytest

from shard.config import parse_config


def _argv(tiny, *extra: str) -> list[str]:
    return ["--model", str(tiny.model_dir), "--adapters", str(tiny.adapters_dir), *extra]


def test_blas_defaults_to_cublaslt_and_takes_the_flag_or_env(tiny) -> None:
    argv = _argv(tiny)
    assert parse_config(argv, env={}).blas == "cublaslt"
    assert parse_config([*argv, "--blas", "cublas"], env={}).blas == "cublas"
    assert parse_config(argv, env={"LORAFLEET_BLAS": "cublas"}).blas == "cublas"


def test_blas_refuses_an_unknown_library(tiny, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config([*_argv(tiny), "--blas", "rocblas"], env={})
    assert "--blas" in capsys.readouterr().err
