"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a 4xx or 5xx status.

Clients (the `openai` package among them) read `error.message` and map the status to an
exception type, so every refusal the server makes goes through `APIError`.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request refused or failed; `headers` such as `Retry-After` go with the response."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
