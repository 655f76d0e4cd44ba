"""A continuous Redis writer through the mesh, for the demo, the tests and the benchmarks.

Every `SET <prefix><n> <n>` is either acknowledged (recorded with its monotonic time) or
counted as failed: redis-py's own retries (10 by default) are off, so no failure is hidden.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


@dataclass
class RedisWriter:
    port: int
    prefix: str = "w:"
    host: str = "127.0.0.1"
    timeout: float = 0.5
    acked: list[tuple[int, float]] = field(default_factory=list)
    failed: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        n = 0
        client: redis.Redis | None = None
        while not self.stop.is_set():
            n += 1
            try:
                if client is None:
                    client = redis.Redis(host=self.host, port=self.port, socket_timeout=self.timeout,
                                         socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0))
                client.set(f"{self.prefix}{n}", n)
                self.acked.append((n, time.monotonic()))
            except (redis.RedisError, OSError):
                self.failed += 1
                client = None
                time.sleep(0.002)  # do not spin against a refused port

    def start(self) -> RedisWriter:
        self.thread = threading.Thread(target=self.run, name="redis-writer", daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)

    def __enter__(self) -> RedisWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keys(self) -> list[str]:
        return [f"{self.prefix}{n}" for n, _ in self.acked]
