"""OpenAI error objects, and the HTTP status of every way a request can fail."""

from __future__ import annotations

from typing import Any

import grpc

# gRPC status of a failed Generate -> HTTP status of the OpenAI-style answer.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """Ends an HTTP request with an OpenAI error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The error object, as OpenAI writes it."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Retry-After on answers a client should retry."""
        return {"Retry-After": "1"} if self.status in (429, 503) else {}


def bad_request(message: str, param: str | None = None) -> ApiError:
    """A 400 naming the offending parameter."""
    return ApiError(400, message, param=param)


def from_status(code: grpc.StatusCode, details: str, model: str) -> ApiError:
    """The HTTP answer to a Generate call that ended with `code`."""
    status = _HTTP_STATUS.get(code, 500)
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(
            404,
            f"the model {model!r} does not exist: it is neither the base model nor an adapter "
            f"(GET /v1/models lists them); {details}",
            param="model",
            code="model_not_found",
        )
    return ApiError(status, details, code=code.name.lower())
