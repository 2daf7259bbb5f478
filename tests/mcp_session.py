"""The MCP SDK's own Client, held open by one task of a background event loop so that
synchronous tests (and module-scoped fixtures) can share one session:

    session = McpSession(Client(StdioServerParameters(command=..., args=[...], env=...)))
    session.call_tool("locate", {"description": "red cube"})   # CallToolResult
    session.read_json("refvlm://status")                         # the resource as JSON
    session.close()

The client is entered and left in that one task (its anyio scopes require it); each call
runs as a task beside it, so calls from several threads overlap like an agent's.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import Any, Callable


class McpSession:
    def __init__(self, client: Any, timeout_s: float = 120.0) -> None:
        self.client, self.timeout_s = client, timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._holder = asyncio.run_coroutine_threadsafe(self._hold(), self._loop)
        self._ready.result(timeout_s)  # raises what entering the client raised

    async def _hold(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with self.client:
                self._ready.set_result(True)
                await self._stop.wait()
        except BaseException as error:  # noqa: BLE001 (handed to the waiting test)
            if not self._ready.done():
                self._ready.set_exception(error)
            else:
                raise

    def run(self, make: Callable[[Any], Any], timeout_s: float | None = None) -> Any:
        """``make(client)``'s coroutine, run on the session's loop; its result."""
        future = asyncio.run_coroutine_threadsafe(make(self.client), self._loop)
        return future.result(timeout_s or self.timeout_s)

    def list_tools(self) -> dict[str, Any]:
        return {tool.name: tool for tool in self.run(lambda c: c.list_tools()).tools}

    def call_tool(self, name: str, arguments: dict[str, Any], timeout_s: float | None = None) -> Any:
        return self.run(lambda c: c.call_tool(name, arguments), timeout_s)

    def read_json(self, uri: str) -> Any:
        return json.loads(self.run(lambda c: c.read_resource(uri)).contents[0].text)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        try:
            self._holder.result(60.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
