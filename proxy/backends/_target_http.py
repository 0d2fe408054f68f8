"""What every HTTP target shares: its client, a health probe, and facts fetched once."""

from __future__ import annotations

import asyncio

from tightwad.backends._http import HttpClient
from tightwad.backends.base import TargetInfo


class HttpTarget:
    """A target server reached over HTTP; subclasses say how to read its facts."""

    health_path = "/health"

    def __init__(self, url: str, *, timeout_s: float = 120.0, api_key: str | None = None):
        self.http = HttpClient(url, timeout_s=timeout_s, api_key=api_key)
        self.url = self.http.url
        self._info: TargetInfo | None = None
        # Concurrent first requests share one fetch of the facts.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    async def health(self) -> bool:
        return await self.http.ok(self.health_path)

    async def info(self) -> TargetInfo:
        async with self._lock:
            if self._info is None:
                self._info = await self._fetch_info()
            return self._info

    async def _fetch_info(self) -> TargetInfo:
        raise NotImplementedError

    async def aclose(self) -> None:
        await self.http.aclose()
