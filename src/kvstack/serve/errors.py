"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.

Every error the server answers goes through :func:`error_response`, so clients written for the OpenAI API (the
official ``openai`` package included) read them as they read OpenAI's: a malformed body or a bad parameter is
400, a wrong or missing API key 401, an unknown model or route 404, a full queue 429, a failed request 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "AUTHENTICATION_ERROR",
    "INVALID_REQUEST_ERROR",
    "NOT_FOUND_ERROR",
    "RATE_LIMIT_ERROR",
    "SERVER_ERROR",
    "OpenAIError",
    "error_body",
    "error_response",
    "install_error_handlers",
]

logger = logging.getLogger(__name__)

INVALID_REQUEST_ERROR = "invalid_request_error"
AUTHENTICATION_ERROR = "authentication_error"
NOT_FOUND_ERROR = "not_found_error"
RATE_LIMIT_ERROR = "rate_limit_error"
SERVER_ERROR = "server_error"

# The error type a status gets when nothing more precise is known (routing errors, HTTPException).
_TYPE_OF_STATUS = {400: INVALID_REQUEST_ERROR, 401: AUTHENTICATION_ERROR, 404: NOT_FOUND_ERROR,
                   429: RATE_LIMIT_ERROR}


class OpenAIError(Exception):
    """An error the server answers in OpenAI's format.

    Parameters
    ----------
    status_code : int
        The HTTP status.
    message : str
        One line saying what is wrong and, where it helps, what to do instead.
    error_type : str, optional
        OpenAI's error ``type`` (``invalid_request_error``, ``authentication_error``, ``not_found_error``,
        ``rate_limit_error``, ``server_error``); derived from the status when omitted.
    param : str or None, optional
        The request field at fault.
    code : str or None, optional
        A machine-readable code (``model_not_found``, ``invalid_api_key``, ``context_length_exceeded``, ...).
    headers : mapping, optional
        Extra response headers (``WWW-Authenticate``, ``Retry-After``).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        fallback = SERVER_ERROR if status_code >= 500 else INVALID_REQUEST_ERROR
        self.error_type = error_type or _TYPE_OF_STATUS.get(status_code, fallback)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        """The error as a response."""
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(status_code: int, message: str, **fields: Any) -> JSONResponse:
    """A response holding an :class:`OpenAIError` built from the same arguments."""
    return OpenAIError(status_code, message, **fields).response()


def _validation_message(error: Mapping[str, Any]) -> tuple[str, str | None]:
    """One validation error as ``(message, param)``; the ``body`` prefix of its location is dropped."""
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {error.get('msg', 'JSON decode error')}", None
    param = ".".join(location) or None
    message = str(error.get("msg", "invalid value"))
    return (f"{param}: {message}" if param else message), param


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a bad body, answered as OpenAI does: 400 ``invalid_request_error``."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    messages = [_validation_message(error) for error in errors] or [("invalid request body", None)]
    message = "; ".join(text for text, _ in messages)
    return error_response(400, message, error_type=INVALID_REQUEST_ERROR, param=messages[0][1])


async def _on_openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return exc.response()


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (404 unknown path, 405 wrong method) and any HTTPException, in OpenAI's format."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is a bug: 500 ``server_error``; the traceback goes to the log, not to the client."""
    logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal server error ({type(exc).__name__})", error_type=SERVER_ERROR)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's format."""
    app.add_exception_handler(OpenAIError, _on_openai_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected_error)
