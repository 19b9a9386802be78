"""Metrics leave the training loop through a queue; a background thread sends them.

The training thread only enqueues (`submit` never blocks: a full queue spools to disk instead),
so a slow or vanished tracking server costs the GPUs nothing. The sender writes each batch to
the run folder's `MetricSpool` first and then sends whatever the spool holds, oldest first; a
failed send leaves it there, marks the sender offline (a warning once, and `status()` for the
progress line) and is retried every `retry_s` seconds and on the next batch. `close` sends what
it can within its deadline; the rest stays in the spool for the next run of the same command.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from hpcbrain.metric_spool import MetricRecord, MetricSpool

__all__ = ["MetricSender", "MAX_BATCH"]

log = logging.getLogger(__name__)

#: MLflow's log_batch takes at most 1,000 metrics per call.
MAX_BATCH = 1000
_CLOSE = object()


class MetricSender:
    def __init__(self, send: Callable[[list[MetricRecord]], None], spool: MetricSpool,
                 queue_size: int = 1000, retry_s: float = 5.0, where: str = "the tracking server"):
        self._send = send
        self.spool = spool
        self.retry_s = float(retry_s)
        self.where = where
        self._queue: queue.Queue = queue.Queue(maxsize=int(queue_size))
        self._offline_since: float | None = None
        self._last_error = ""
        # set when `close` gave up on a send that hangs: whatever that send does later, this
        # sender touches the spool no more (the next run sends what is left)
        self._abandoned = False
        # a failure of the sender thread's own writes (the spool's file system full): raised
        # in the training thread by the next `submit`, so the run stops instead of logging on
        # into nothing
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hpcbrain-metrics", daemon=True)
        self._thread.start()

    # --- the training thread's side ---------------------------------------------------------
    def submit(self, records: list[MetricRecord]) -> None:
        """Queue `records` for sending; never blocks (a full queue writes them to the spool).
        Raises the sender thread's failure, if it had one."""
        if self.failure is not None:
            raise self.failure
        if not records:
            return
        try:
            self._queue.put_nowait(records)
        except queue.Full:
            self.spool.append(records)

    def status(self) -> str | None:
        """None while the server takes every batch; otherwise a short note for the progress
        line: how long it has been unreachable and how many values wait in the spool."""
        since = self._offline_since
        if since is None:
            return None
        return f"offline {time.monotonic() - since:.0f}s, {len(self.spool)} spooled"

    @property
    def offline(self) -> bool:
        return self._offline_since is not None

    def close(self, timeout_s: float) -> bool:
        """Send what is queued and spooled, waiting at most `timeout_s`; True when nothing is
        left over. Whatever is left stays in the spool (and so reaches the server on the next
        run of the same command)."""
        deadline = time.monotonic() + float(timeout_s)
        try:
            self._queue.put(_CLOSE, timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Full:
            pass
        self._thread.join(max(deadline - time.monotonic(), 0.0))
        if self.failure is not None:       # nothing more can be kept: what was, stays
            return False
        if self._thread.is_alive():
            self._abandoned = True
            # the sender is stuck in a send: what is still queued goes to the spool
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not _CLOSE:
                    self.spool.append(item)
        left = len(self.spool)
        if left:
            log.warning("%d metric value(s) could not reach %s before the run ended; they are "
                        "kept in %s and sent by the next run of the same command", left,
                        self.where, self.spool.path)
        return left == 0

    # --- the sender thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve()
        except OSError as exc:     # the spool cannot be written: the training thread is told
            self.failure = exc

    def _serve(self) -> None:
        self._flush()            # what an earlier run of this folder left in the spool
        closing = False
        while True:
            try:
                item = self._queue.get(timeout=self.retry_s if self.offline else None)
            except queue.Empty:
                item = None                       # time to retry the spool
            if self._abandoned:
                return
            if item is _CLOSE:
                closing = True
            elif item is not None:
                self.spool.append(item)
            # drain what else is queued into the spool before sending (fewer, larger batches)
            while not closing:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _CLOSE:
                    closing = True
                else:
                    self.spool.append(more)
            self._flush()
            if closing:
                return

    def _flush(self) -> None:
        while not self._abandoned:
            records, lines = self.spool.pending(limit=MAX_BATCH)
            if not lines:
                self._online()
                return
            try:
                if records:
                    self._send(records)
            except Exception as exc:      # any transport or server error: keep, retry later
                self._offline(exc)
                return
            if self._abandoned:           # too late: the lines stay for the next run
                return
            self.spool.mark_sent(lines)

    def _offline(self, exc: Exception) -> None:
        self._last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if self._offline_since is None:
            self._offline_since = time.monotonic()
            log.warning("cannot reach %s (%s); training goes on, metrics are kept in %s and "
                        "sent when it is back (retrying every %.0f s)", self.where,
                        self._last_error, self.spool.path, self.retry_s)

    def _online(self) -> None:
        if self._offline_since is not None:
            log.warning("%s is reachable again after %.0f s; spooled metrics sent", self.where,
                        time.monotonic() - self._offline_since)
            self._offline_since = None
