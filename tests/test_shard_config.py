"""Shard flags that choose a backend: --blas."""

from __future__ import annotations

from pathlib import Path

import pytest

from shard.config import parse_config


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "model").mkdir()
    (tmp_path / "adapters").mkdir()
    return ["--model", str(tmp_path / "model"), "--adapters", str(tmp_path / "adapters"), *extra]


def test_blas_defaults_to_cublaslt_and_takes_the_flag_or_env(tmp_path: Path) -> None:
    argv = _argv(tmp_path)
    assert parse_config(argv, env={}).blas == "cublaslt"
    assert parse_config([*argv, "--blas", "cublas"], env={}).blas == "cublas"
    assert parse_config(argv, env={"LORAFLEET_BLAS": "cublas"}).blas == "cublas"


def test_blas_refuses_an_unknown_library(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_config([*_argv(tmp_path), "--blas", "rocblas"], env={})
    assert "--blas" in capsys.readouterr().err
