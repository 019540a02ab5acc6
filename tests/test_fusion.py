"""The compile switch never touches the CPU path, and a compiler failure falls back to eager."""

from __future__ import annotations

import torch

from shard.model import fusion


def test_cpu_tensors_never_compile(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch, "compile", lambda *a, **k: calls.append(a) or (lambda *x: None))
    double = fusion.elementwise(lambda x, k: x * k)
    fusion.set_enabled(True)
    try:
        assert double(torch.ones(3), 2).tolist() == [2.0, 2.0, 2.0]
    finally:
        fusion.set_enabled(False)
    assert calls == []


def test_compiler_failure_runs_eagerly(monkeypatch) -> None:
    def broken(*_args: object) -> object:
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(torch, "compile", lambda fn, **_: broken)

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self) -> bool:  # the compiled path is taken for CUDA tensors only
            return True

    double = fusion.elementwise(lambda x, k: x * k)
    fusion.set_enabled(True)
    try:
        x = torch.ones(2).as_subclass(FakeCuda)
        assert double(x, 3).tolist() == [3.0, 3.0]
        assert double(x, 4).tolist() == [4.0, 4.0]  # stays eager after the failure
    finally:
        fusion.set_enabled(False)
