"""OpenAI's error body, and the HTTP status each failure of a request maps to."""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse

from actors.request import SamplingParamsError
from actors.slo.admission import AdmissionRejected
from cluster.engine_client import NoCapacityError

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
                500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error answered in OpenAI's body shape with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param)

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was ready."""


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def engine_error(e: BaseException) -> APIError:
    """The HTTP error for an exception raised while dispatching or running a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, AdmissionRejected):
        return APIError(429, f"the server is overloaded, retry later: {e}", retry_after=1)
    if isinstance(e, NoCapacityError):
        return APIError(503, f"no engine can take the request now: {e}", retry_after=1)
    if isinstance(e, SamplingParamsError):
        return APIError(400, str(e), param=str(e).split(" ", 1)[0])
    if isinstance(e, ValueError):  # PromptTooLongError, bad token ids, duplicate request id
        return APIError(400, str(e))
    log.exception("request failed", exc_info=e)
    return APIError(500, f"internal error: {type(e).__name__}: {e}")
