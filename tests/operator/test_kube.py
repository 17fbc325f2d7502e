"""kube.py's client behaviour without a cluster: 429/Retry-After, the rate limit, the User-Agent."""

from __future__ import annotations

import asyncio
import json
import time

from autoglm_operator import kube as k


class _Resp:
    def __init__(self, status: int, body: dict, headers: dict | None = None) -> None:
        self.status = status
        self.reason = {200: "OK", 429: "Too Many Requests"}.get(status, "Error")
        self._data = json.dumps(body).encode()
        self.headers = headers or {}

    def read(self) -> bytes:
        return self._data


class _ApiClient:
    """Answers the queued responses in order and records the requests."""

    def __init__(self, responses: list[_Resp]) -> None:
        self.responses = responses
        self.calls: list[tuple[str, str, float]] = []

    def param_serialize(self, method, resource_path, query_params, header_params, body, auth_settings):
        return method, resource_path, header_params, body, None

    def call_api(self, method, url, header_params, body, _request_timeout):
        self.calls.append((method, url, time.monotonic()))
        return self.responses.pop(0)

    def close(self) -> None:
        pass


async def test_429_is_retried_after_the_delay_the_server_asked() -> None:
    api = _ApiClient([_Resp(429, {"message": "slow down"}, {"Retry-After": "1"}),
                      _Resp(200, {"metadata": {"name": "chat"}})])
    kube = k.Kube(api, threads=1)
    try:
        obj = await kube.get("Service", "demo", "chat")
    finally:
        kube.close()
    assert obj == {"metadata": {"name": "chat"}}
    assert len(api.calls) == 2 and kube.throttled == 1
    assert api.calls[1][2] - api.calls[0][2] >= 0.95


async def test_429_retries_are_bounded() -> None:
    api = _ApiClient([_Resp(429, {}, {"Retry-After": "0"}) for _ in range(k.MAX_RETRIES_AFTER + 1)])
    kube = k.Kube(api, threads=1)
    try:
        await kube.get("Service", "demo", "chat")
    except k.ApiError as exc:
        assert exc.status == 429
    else:
        raise AssertionError("a 429 that never ends must surface")
    finally:
        kube.close()
    assert len(api.calls) == k.MAX_RETRIES_AFTER + 1


async def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = k.TokenBucket(qps=20, burst=5)
    t0 = time.monotonic()
    await asyncio.gather(*(bucket.acquire() for _ in range(5)))
    assert time.monotonic() - t0 < 0.05  # the burst
    await asyncio.gather(*(bucket.acquire() for _ in range(4)))
    assert time.monotonic() - t0 >= 4 / 20 * 0.9  # then 20/s


def test_user_agent_names_the_operator() -> None:
    assert k.USER_AGENT.startswith("autoglm-operator/")
