"""The finishing phase's uploads (figures, tables, models, registrations), each sent once over
every run of one run folder, and never lost to a tracking server that stops answering.

    ledger = PublishLedger(run_dir, step, patience_s=60, retry_s=5, server_down=...)
    uri = ledger.send("model encoder → hpcbrain-lsor-encoder", upload)

`send` returns what an earlier run of this folder recorded for the same item at the same step
(nothing is sent twice), else calls `upload`. When `upload` fails and `server_down()` says the
server does not answer, it retries every `retry_s` until `patience_s` has passed since the first
failure of this finishing phase (one budget for the whole phase, not per item); after that the
item and every later one are *deferred*: recorded as such and skipped. A failure while the
server answers is a real error and propagates. The ledger (`published.json` in the run folder) is
rewritten atomically after every item, so a kill at any point loses at most the item in flight,
which the next run sends again.

Items are keyed by the training step they finish: a run folder trained further later finishes
(and registers) again.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from hpcbrain.atomic import write_text_atomic

log = logging.getLogger(__name__)

LEDGER_FILE = "published.json"


class PublishLedger:
    def __init__(self, run_dir: Path, step: int, *, patience_s: float, retry_s: float,
                 server_down: Callable[[], bool], where: str = "the tracking server",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.path = Path(run_dir) / LEDGER_FILE
        self.step = int(step)
        self.patience_s, self.retry_s = float(patience_s), float(retry_s)
        self.server_down, self.where = server_down, where
        self._clock, self._sleep = clock, sleep
        self._first_failure: float | None = None
        self.gave_up = False
        saved = self._read()
        self.sent: dict[str, Any] = saved.get("sent", {})
        # deferred items of an earlier run are tried again now; this run's are collected anew
        self.deferred: list[str] = []

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            log.warning("%s is unreadable: the finishing phase's uploads are sent again",
                        self.path)
            return {}
        return saved if saved.get("step") == self.step else {}

    def _write(self) -> None:
        write_text_atomic(self.path, json.dumps(
            {"step": self.step, "sent": self.sent, "deferred": self.deferred}, indent=1))

    def defer(self, item: str) -> None:
        """`item` is not sent now (the tracker is offline): the next run sends it."""
        self.deferred.append(item)
        self._write()

    def send(self, item: str, upload: Callable[[], Any]) -> Any:
        """`upload()`'s value, or the value recorded when an earlier run sent `item`; None when
        the item is deferred to the next run."""
        if item in self.sent:
            log.info("already sent by an earlier run: %s", item)
            return self.sent[item]
        while not self.gave_up:
            try:
                value = upload()
            except Exception as exc:
                if not self.server_down():
                    raise                # the server answers: a real error, not an outage
                self._wait_or_give_up(item, exc)
                continue
            self.sent[item] = value
            self._write()
            return value
        self.deferred.append(item)
        self._write()
        return None

    def _wait_or_give_up(self, item: str, exc: Exception) -> None:
        now = self._clock()
        if self._first_failure is None:
            self._first_failure = now
            log.warning("%s stopped answering while sending %s (%s); retrying every %g s for "
                        "at most %g s", self.where, item, type(exc).__name__, self.retry_s,
                        self.patience_s)
        if now - self._first_failure >= self.patience_s:
            self.gave_up = True
            log.warning("%s did not come back within %g s: %s and what follows are deferred to "
                        "the next run of the same command", self.where, self.patience_s, item)
            return
        self._sleep(self.retry_s)
