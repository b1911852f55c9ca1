"""The state every engine replica on Ray Serve shares, held by one named Ray actor.

Every replica serves the HTTP app itself (:mod:`~lora_kit.server.ray_app`), so what one process
keeps in memory must be one state for the cluster. Serve has no broadcast to replicas; the
:class:`AdapterDirectory` actor is its stand-in, polled by every replica every ``POLL_S``:

- **a log of runtime changes, each with an epoch**: slot drops (free this adapter's slots) and
  the names unloaded at runtime (``/v1/unload_lora_adapter``: 3037/404 on every replica). A
  writer waits until every live replica reports the new epoch (:func:`wait_for_epoch`, at most
  10 s, then logged), so when an unload answers 200 no answering replica serves the name;
- **each replica's report**: its applied epoch, engine stats, Ray node and request metrics,
  which ``/healthz`` and ``/metrics`` on any replica sum (:func:`sum_stats`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, MutableSet
from typing import Any

logger = logging.getLogger("lora_kit.server")

DIRECTORY = "lora-kit-adapter-directory"
NAMESPACE = "lora-kit"
POLL_S = 0.5  # how often a replica reads the directory and reports to it
STALE_S = 5.0  # a replica silent this long is presumed gone (a writer does not wait for it)


class AdapterDirectory:
    """The change log (drops and unloaded names, each with an epoch) and each replica's last report.

    Run as a named Ray actor (:func:`directory_actor`); replicas poll it and write to it.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.drops: list[tuple[int, str]] = []
        self.unloaded: set[str] = set()
        self.reports: dict[str, dict[str, Any]] = {}

    def drop(self, key: str) -> int:
        """Ask every replica to free ``key``'s slot; the epoch to wait for."""
        self.epoch += 1
        self.drops.append((self.epoch, key))
        return self.epoch

    def unload(self, name: str) -> int:
        """Stop serving adapter ``name`` everywhere; the epoch to wait for."""
        self.unloaded.add(name)
        self.epoch += 1
        return self.epoch

    def serve(self, name: str) -> int:
        """Serve adapter ``name`` again everywhere; the epoch to wait for."""
        self.unloaded.discard(name)
        self.epoch += 1
        return self.epoch

    def since(self, epoch: int) -> tuple[int, list[str], list[str]]:
        """The current epoch, the keys dropped after ``epoch``, and every unloaded name."""
        return self.epoch, [key for e, key in self.drops if e > epoch], sorted(self.unloaded)

    def report(
        self, replica: str, epoch: int, stats: dict[str, Any], node: str | None = None, metrics: Any = None
    ) -> None:
        """A replica's state: the epoch it applied, its engine's stats, its Ray node, its metrics."""
        self.reports[replica] = {"epoch": epoch, "stats": stats, "node": node, "metrics": metrics, "at": time.time()}

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Replicas heard from in the last ``STALE_S`` seconds, with their last reports."""
        now = time.time()
        return {r: rep for r, rep in self.reports.items() if now - rep["at"] < STALE_S}


def directory_actor(create: bool = False) -> Any:
    """The named directory actor (created by the launcher, found by the replicas)."""
    import ray

    if create:
        remote = ray.remote(num_cpus=0)(AdapterDirectory)
        return remote.options(name=DIRECTORY, namespace=NAMESPACE, get_if_exists=True).remote()
    return ray.get_actor(DIRECTORY, namespace=NAMESPACE)


def wait_for_epoch(directory: Any, epoch: int, what: str, timeout: float = 10.0) -> bool:
    """Block until every live replica has applied ``epoch``; False (logged) after ``timeout``."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = ray.get(directory.replicas.remote())
        if all(rep["epoch"] >= epoch for rep in live.values()):
            return True
        time.sleep(POLL_S / 5)
    logger.warning("%s: not every replica confirmed within %.0fs", what, timeout)
    return False


class ClusterNames(MutableSet[str]):
    """The names unloaded at runtime, one set for every replica (a :class:`RuntimeAdapters`' set).

    Reads are local (a mirror the replica's poller refreshes, see :meth:`refresh`); ``add`` and
    ``discard`` write to the directory and block until every live replica has applied them.
    """

    def __init__(self, directory: Any) -> None:
        self._directory = directory
        self._names: set[str] = set()
        self._epoch = 0  # the newest epoch the mirror reflects: an older snapshot never overwrites it
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(set(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def add(self, name: str) -> None:
        self._write(name, unload=True)

    def discard(self, name: str) -> None:
        self._write(name, unload=False)

    def _write(self, name: str, unload: bool) -> None:
        import ray

        write = self._directory.unload if unload else self._directory.serve
        epoch = ray.get(write.remote(name))
        with self._lock:
            if epoch >= self._epoch:
                (self._names.add if unload else self._names.discard)(name)
                self._epoch = epoch
        wait_for_epoch(self._directory, epoch, f"{'unload' if unload else 'load'} of {name}")

    def refresh(self, epoch: int, names: Iterable[str]) -> None:
        """The directory's unloaded names as of ``epoch`` (ignored when the mirror is newer)."""
        with self._lock:
            if epoch >= self._epoch:
                self._names, self._epoch = set(names), epoch


def sum_stats(own: dict[str, Any], others: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Engine stats of several replicas as one: counts summed, resident adapters their union
    (each replica has its own prefix cache: its counters are summed too)."""
    reports = [own, *others]
    finished: dict[str, int] = {}
    prefix: dict[str, int] = {}
    for stats in reports:
        for reason, n in stats.get("finished", {}).items():
            finished[reason] = finished.get(reason, 0) + n
        for key, n in (stats.get("prefix_cache") or {}).items():
            prefix[key] = prefix.get(key, 0) + n
    return {
        "queue_depth": sum(s.get("queue_depth", 0) for s in reports),
        "running": sum(s.get("running", 0) for s in reports),
        "finished": finished,
        "resident_adapters": sorted({a for s in reports for a in s.get("resident_adapters", [])}),
        "slots": sum(s.get("slots", 0) for s in reports),
        "prefix_cache": prefix,
    }
