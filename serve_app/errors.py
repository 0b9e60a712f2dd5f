"""OpenAI-shaped errors: every failure the API answers is `{"error": {"message", "type", "param", "code"}}`.

`ApiError` is raised by route code; `install_error_handlers(app)` maps it, pydantic validation errors (400, the
field named), malformed JSON (400), unknown routes/methods, and anything unexpected (500, logged, no internals
leaked) to that shape.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
RETRY_AFTER_S = "1"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def error_response(err: ApiError) -> JSONResponse:
    headers = dict(err.headers or {})
    if err.status == 429:  # overloaded (engine queue full): tell clients when to retry (OpenAI SDKs honour it)
        headers.setdefault("Retry-After", RETRY_AFTER_S)
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status, headers=headers)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        return "the request body must be a JSON object (Content-Type: application/json)", None
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return JSONResponse(error_body(400, message, param, "invalid_value" if param else "invalid_json"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "request failed"
        if err.status_code == 400 and message == "There was an error parsing the body":
            message = "the request body is not valid UTF-8 JSON"
        return JSONResponse(
            error_body(err.status_code, message), err.status_code, headers=getattr(err, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "internal error; see the server log"), 500)
