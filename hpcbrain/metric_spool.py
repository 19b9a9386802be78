"""Metric values on their way to the tracking server, kept in the run folder until they arrive.

Every value is appended here before it is sent (write-ahead), and the count of lines the server
has accepted is recorded after each accepted batch, so a server that goes away, a full queue or
a job that ends while the server is down loses nothing: the next attempt — later in the run, or
the next run of the same command — sends exactly the lines not yet accepted. (A crash between
the server accepting a batch and the count being written resends that one batch: the window is
one batch, not the outage.)

`logged_steps()` is the newest step of every key ever handed to the spool in this run folder —
the spool's lines, and a small file of marks written before a fully sent spool is removed — so a
run resumed after a kill knows which of the steps it retrains were logged already.

    spool = MetricSpool(run_dir)
    spool.append([MetricRecord("train/loss", 0.3, 1733212800000, 5)])
    records, lines = spool.pending()     # oldest first
    spool.mark_sent(lines)               # after the server took them
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import NamedTuple

from hpcbrain.atomic import write_text_atomic
from hpcbrain.disk_space import OutOfSpace, no_space_error

__all__ = ["MetricRecord", "MetricSpool", "SPOOL_FILE", "SENT_FILE", "LOGGED_STEPS_FILE"]

SPOOL_FILE = "tracking-spool.jsonl"
SENT_FILE = "tracking-spool.sent"
LOGGED_STEPS_FILE = "tracking-logged-steps.json"


class MetricRecord(NamedTuple):
    key: str
    value: float
    timestamp_ms: int
    step: int


class MetricSpool:
    """An append-only JSON-lines file of `MetricRecord`s and the number already sent.
    Thread-safe: the training thread and the sender thread may both append."""

    def __init__(self, run_dir: str | Path):
        folder = Path(run_dir)
        self.path = folder / SPOOL_FILE
        self.sent_path = folder / SENT_FILE
        self.logged_path = folder / LOGGED_STEPS_FILE
        self._lock = threading.Lock()

    def append(self, records: list[MetricRecord]) -> None:
        if not records:
            return
        text = "".join(json.dumps(list(r)) + "\n" for r in records)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.path, "a+", encoding="utf-8") as handle:
                    handle.seek(0, os.SEEK_END)
                    if handle.tell() > 0:
                        handle.seek(handle.tell() - 1)
                        if handle.read(1) != "\n":    # a line torn by a crash: end it first
                            text = "\n" + text
                    handle.write(text)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                if no_space_error(exc) is None:
                    raise
                # a torn last line is skipped by `pending` and ended by the next append
                raise OutOfSpace(self.path, "the metric spool", len(text.encode())) from exc

    def _sent(self) -> int:
        try:
            return int(self.sent_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self, limit: int | None = None) -> tuple[list[MetricRecord], int]:
        """The records not yet sent, oldest first (at most `limit`), and how many lines they
        span (pass that to `mark_sent`). A line torn by a crash is skipped."""
        with self._lock:
            lines = self._lines()
            sent = self._sent()
        out, consumed = [], 0
        for line in lines[sent:]:
            if limit is not None and len(out) >= limit:
                break
            consumed += 1
            record = _parse(line)
            if record is not None:
                out.append(record)
        return out, consumed

    def mark_sent(self, count: int) -> None:
        """`count` more of the oldest pending lines reached the server. When none is left the
        spool files are removed."""
        with self._lock:
            lines = self._lines()
            total = len(lines)
            if total == 0:
                return
            sent = min(self._sent() + int(count), total)
            if sent >= total:
                # the marks first: a kill between the two leaves both saying the same
                write_text_atomic(self.logged_path, json.dumps(self._logged_steps(lines)))
                self.path.unlink(missing_ok=True)
                self.sent_path.unlink(missing_ok=True)
            else:
                write_text_atomic(self.sent_path, f"{sent}\n")

    def logged_steps(self) -> dict[str, int]:
        """{key: the newest step ever handed to this spool} (see the module doc)."""
        with self._lock:
            return self._logged_steps(self._lines())

    def _logged_steps(self, lines: list[str]) -> dict[str, int]:
        """The marks file's steps, raised by those of the spool's `lines`."""
        try:
            marks = {str(k): int(v) for k, v in json.loads(self.logged_path.read_text()).items()}
        except (FileNotFoundError, ValueError, AttributeError):
            marks = {}
        for record in filter(None, map(_parse, lines)):
            marks[record.key] = max(marks.get(record.key, record.step), record.step)
        return marks

    def __len__(self) -> int:
        with self._lock:
            return max(len(self._lines()) - self._sent(), 0)

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:        # nothing spooled, or all sent and removed
            return []


def _parse(line: str) -> MetricRecord | None:
    """A spool line as a record; None for a line torn by a crash."""
    try:
        key, value, timestamp, step = json.loads(line)
        return MetricRecord(str(key), float(value), int(timestamp), int(step))
    except (ValueError, TypeError):
        return None
