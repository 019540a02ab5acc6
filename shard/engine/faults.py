"""Which engine faults belong to one request, and which poison the whole process.

A fault of one request fails that request (INVALID_ARGUMENT when its input was at fault, INTERNAL
otherwise) and the step loop goes on for the others. Only faults that leave the process unable to
serve anyone end the shard: CUDA errors (the context is unusable after one), a lost
tensor-parallel rank, the host out of memory, or an interpreter shutdown.
"""

from __future__ import annotations

import torch

from shard.parallel.group import GroupLost

# Text of CUDA/NCCL failures that torch raises as plain RuntimeError.
_DEVICE_FAULT_MARKS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "NCCL", "device-side assert")
# How much of a user's input or an exception's text an error message may quote.
QUOTE_CHARS = 80


class RequestFault(Exception):
    """One request failed inside the engine; `invalid`: its input was at fault."""

    def __init__(self, message: str, invalid: bool = False) -> None:
        super().__init__(message)
        self.invalid = invalid


def quote(text: object, limit: int = QUOTE_CHARS) -> str:
    """`text` as repr, cut to `limit` characters, so an error message stays small."""
    shown = repr(text) if isinstance(text, str) else str(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown)} chars)"


def is_process_fault(exc: BaseException) -> bool:
    """True when the fault leaves the whole process unable to serve (the shard must end)."""
    if not isinstance(exc, Exception) or isinstance(exc, (MemoryError, GroupLost)):
        return True
    if isinstance(exc, torch.OutOfMemoryError):
        return False  # device memory ran short for this batch; the next one may fit
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if isinstance(exc, torch.distributed.DistBackendError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _DEVICE_FAULT_MARKS)


def request_fault(exc: Exception, request_label: str) -> RequestFault:
    """The error a request gets for a fault of its own (a RequestFault passes through)."""
    if isinstance(exc, RequestFault):
        return exc
    return RequestFault(
        f"the shard failed on this request ({quote(request_label)}): "
        f"{type(exc).__name__}: {quote(str(exc), 200)}; other requests were not affected"
    )
