"""A small Python client of the adaptation service (httpx)::

    from caloforge.adapt.service.client import AdaptationClient
    client = AdaptationClient("http://127.0.0.1:8080", token)
    job = client.submit({"base": "caloforge-base@champion", "detector": {"name": "lar-pb"},
                         "data": "/data/lar-pb-shards"}, idempotency_key="lar-pb-1")
    job = client.wait(job["id"])

Every API error raises :class:`ServiceError` (``status``, ``code``, ``message``, ``field``); an unreachable
server raises ``ServiceError`` with status 0 and code ``unreachable``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

__all__ = ["AdaptationClient", "ServiceError", "default_server", "default_token"]

TOKEN_FILE = Path("~/.config/caloforge/token")
DEFAULT_SERVER = "http://127.0.0.1:8080"
TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceError(Exception):
    """An error answer of the service (or none: ``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        where = f" (field {field})" if field else ""
        super().__init__(f"{status} {code}: {message}{where}" if status else f"{code}: {message}")


def default_token() -> str | None:
    """``$CALOFORGE_TOKEN``, else the first line of ``~/.config/caloforge/token``, else None."""
    token = os.environ.get("CALOFORGE_TOKEN")
    if token:
        return token.strip()
    path = TOKEN_FILE.expanduser()
    if path.is_file():
        return path.read_text().strip().splitlines()[0].strip() if path.read_text().strip() else None
    return None


def default_server() -> str:
    return os.environ.get("CALOFORGE_SERVER", DEFAULT_SERVER)


class AdaptationClient:
    """The ``/v1/adaptations`` API (see docs/service.md)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.url = (url or default_server()).rstrip("/")
        token = token if token is not None else default_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdaptationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise _error_of(response)
        return response

    def submit(self, request: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit an adaptation; the job (status ``queued``)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/adaptations", json=request, headers=headers).json()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/adaptations/{job_id}").json()

    def list(
        self,
        *,
        status: str | None = None,
        detector: str | None = None,
        creator: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of jobs (newest first) and the next page's cursor (None on the last)."""
        params = {
            "status": status,
            "detector": detector,
            "creator": creator,
            "limit": limit,
            "cursor": cursor,
        }
        body = self._request(
            "GET", "/v1/adaptations", params={k: v for k, v in params.items() if v is not None}
        ).json()
        return body["data"], body["next_cursor"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/adaptations/{job_id}/cancel").json()

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return self._request("GET", f"/v1/adaptations/{job_id}/events", params={"after": after}).json()[
            "data"
        ]

    def stream(self, job_id: str, after: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """Server-sent events as (event, data) until the job has finished (``end``)."""
        try:
            with self._http.stream(
                "GET", f"/v1/adaptations/{job_id}/events/stream", params={"after": after}, timeout=None
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error_of(response)
                name, data = "message", ""
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        yield name, json.loads(data)
                        if name == "end":
                            return
                        name, data = "message", ""
        except httpx.TransportError as exc:
            raise ServiceError(0, "unreachable", f"cannot reach {self.url}: {exc}") from None

    def logs(self, job_id: str) -> str:
        return self._request("GET", f"/v1/adaptations/{job_id}/logs").text

    def report(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/adaptations/{job_id}/report").json()

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the job has finished; the job. ``timeout`` (s): ``TimeoutError`` naming its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout} s")
            time.sleep(poll)


def _error_of(response: httpx.Response) -> ServiceError:
    try:
        error = response.json()["error"]
        return ServiceError(response.status_code, error["code"], error["message"], error.get("field"))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:500] or response.reason_phrase
        return ServiceError(response.status_code, "http_error", text)
