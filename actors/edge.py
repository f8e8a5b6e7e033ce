"""The ingress's FastAPI app and the answers it gives before (or instead of) the ingress's own code.

Owns the app object and its exception handlers, so that every answer is an OpenAI error object:
unknown routes (404) and wrong methods (405) as Starlette raises them, `APIError`s with the
headers their status needs (`Retry-After` on 429 and 503), and anything unexpected as a 500
that carries a request id, logged here with its traceback. Crossing it: exceptions in, JSON
responses out.
"""
from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from rayinfer.openai.errors import APIError

log = logging.getLogger("rayinfer.ingress")  # reaches the replica's log file through stderr
RETRY_AFTER_S = {429: "1", 503: "5"}  # a full queue drains in about a second; a gang restarts in several

app = FastAPI(title="rayinfer", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(e: APIError) -> JSONResponse:
    retry = RETRY_AFTER_S.get(e.status)
    return JSONResponse(e.to_dict(), status_code=e.status, headers={"Retry-After": retry} if retry else None)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    if exc.status_code == 404:
        msg = f"Unknown route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        msg = f"Method {request.method} is not allowed on {request.url.path}; use {exc.headers.get('Allow', '?')}"
    else:
        msg = str(exc.detail)
    err = APIError(exc.status_code, msg, type="not_found_error" if exc.status_code == 404 else None)
    return JSONResponse(err.to_dict(), status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = "err-" + uuid.uuid4().hex[:16]
    log.error("rayinfer: unexpected error %s on %s %s", rid, request.method, request.url.path, exc_info=exc)
    return JSONResponse(APIError(500, f"Internal server error (request id {rid}); the server logged the cause").to_dict(),
                        status_code=500)
