"""Rolling a new champion out to a running Serve app.

The replicas follow their registry alias (:mod:`medgpt.serving.deployment`): each re-reads it
every ``follow_poll_s`` seconds, and at once when told (``POST /admin/refresh``, what
``medgpt promote`` and ``medgpt rollback`` send with ``--serve-url``). The replica a refresh
reaches passes it on to the app's other replicas through :class:`RolloutCoordinator`, a small
Ray actor they all wait on, which is also the lock that lets one replica at a time swap
versions when two do not fit in its memory.

This module imports neither torch nor Ray at import time: the CLI uses :func:`notify_serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import requests

__all__ = ["RolloutCoordinator", "coordinator", "notify_serve", "serving_version"]


def serving_version(url: str, timeout: float = 5.0) -> str | None:
    """The registry version ``GET /v1/models`` names first, or None."""
    r = requests.get(f"{url.rstrip('/')}/v1/models", timeout=timeout)
    r.raise_for_status()
    cards = r.json().get("data") or []
    return str(cards[0].get("registry_version")) if cards else None


def notify_serve(url: str, version: str, wait_s: float) -> tuple[bool, float, str]:
    """Tell the Serve app at ``url`` to re-read its alias now, then wait up to ``wait_s`` for
    it to serve ``version``. Returns (served, seconds, what happened)."""
    t0 = time.perf_counter()
    base = url.rstrip("/")
    try:
        r = requests.post(f"{base}/admin/refresh", timeout=30)
    except requests.RequestException as e:
        return False, 0.0, f"could not reach {base}/admin/refresh ({type(e).__name__}: {e})"
    if r.status_code >= 400:
        # The app answered but will not refresh (it serves a fixed checkpoint, say): its own
        # reason is what the user needs, not "could not reach".
        return False, 0.0, f"{base}/admin/refresh answered {r.status_code}: {_reason(r)}"
    deadline = t0 + wait_s
    last: str | None = None
    while time.perf_counter() < deadline:
        try:
            last = serving_version(base)
        except requests.RequestException:
            last = None
        if last == version:
            return True, time.perf_counter() - t0, f"{base} serves version {version}"
        time.sleep(0.2)
    return (
        False,
        time.perf_counter() - t0,
        f"{base} still serves version {last} after {wait_s:g} s (see its /healthz rollout)",
    )


def _reason(r: requests.Response) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text.strip()[:200] or r.reason


class RolloutCoordinator:
    """One per Serve app, named after it: a counter of refresh requests the replicas wait on
    (:meth:`wait`), and the lock that lets one replica at a time drain and swap (:meth:`acquire`,
    :meth:`release`; a holder that died is noticed by its lease running out)."""

    def __init__(self) -> None:
        self.generation = 0
        self.changed = asyncio.Condition()
        self.holder: str | None = None
        self.lease_until = 0.0

    async def bump(self) -> int:
        async with self.changed:
            self.generation += 1
            self.changed.notify_all()
        return self.generation

    async def wait(self, seen: int, timeout: float) -> int:
        """The generation once it is past ``seen``, or after ``timeout`` seconds."""
        async with self.changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.generation > seen), timeout
                )
            return self.generation

    async def acquire(self, who: str, lease_s: float) -> bool:
        now = time.monotonic()
        if self.holder in (None, who) or now > self.lease_until:
            self.holder, self.lease_until = who, now + lease_s
            return True
        return False

    async def release(self, who: str) -> None:
        if self.holder == who:
            self.holder = None


def coordinator(app: str) -> Any:
    """The app's coordinator actor (created by the first replica that asks). Not detached: it
    lives as long as the replica that made it; the next one to ask makes another."""
    import ray

    actor = ray.remote(num_cpus=0, max_concurrency=1000)(RolloutCoordinator)
    return actor.options(
        name=f"medgpt-rollout:{app}", namespace="medgpt", get_if_exists=True
    ).remote()
