"""The finishing phase's ledger on its own: each item sent once over the runs of a folder, one
bounded wait for a server that stopped answering, then everything deferred; real errors are not
mistaken for an outage."""
from __future__ import annotations

import json

import pytest

from hpcbrain.publish_ledger import LEDGER_FILE, PublishLedger


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def ledger(tmp_path, clock, *, down=lambda: True, step=16, patience_s=10.0):
    return PublishLedger(tmp_path, step, patience_s=patience_s, retry_s=2.0, server_down=down,
                         clock=clock, sleep=clock.sleep)


def test_an_item_sent_by_an_earlier_run_is_not_sent_again(tmp_path):
    clock = FakeClock()
    calls = []
    first = ledger(tmp_path, clock)
    assert first.send("model encoder", lambda: calls.append(1) or "models:/m-1") == "models:/m-1"
    again = ledger(tmp_path, clock)
    assert again.send("model encoder", lambda: calls.append(2) or "models:/m-2") == "models:/m-1"
    assert calls == [1]
    # a folder trained further finishes a later step: that is a new finishing phase
    later = ledger(tmp_path, clock, step=32)
    assert later.send("model encoder", lambda: calls.append(3) or "models:/m-3") == "models:/m-3"
    assert calls == [1, 3]


def test_an_outage_is_retried_for_the_patience_then_this_and_every_later_item_is_deferred(
        tmp_path):
    clock = FakeClock()
    attempts = []

    def refused():
        attempts.append(clock.now)
        raise ConnectionError("refused")

    publish = ledger(tmp_path, clock)
    assert publish.send("artifact figures/a.png", refused) is None
    # tries at 0, 2, 4, 6, 8, 10 s: the sixth failure finds the 10 s spent
    assert attempts == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert publish.send("model encoder", lambda: pytest.fail("not tried after giving up")) is None
    assert publish.deferred == ["artifact figures/a.png", "model encoder"]
    saved = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert saved["deferred"] == publish.deferred and saved["sent"] == {}
    # the next run tries the deferred items again
    rerun = ledger(tmp_path, clock)
    assert rerun.send("model encoder", lambda: "models:/m-1") == "models:/m-1"
    assert rerun.deferred == []


def test_a_server_back_within_the_patience_gets_the_item(tmp_path):
    clock = FakeClock()
    answers = iter([ConnectionError("refused"), ConnectionError("refused"), "v1"])

    def upload():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    publish = ledger(tmp_path, clock)
    assert publish.send("registration", upload) == "v1"
    assert clock.now == 4.0 and publish.deferred == []


def test_a_failure_while_the_server_answers_is_a_real_error(tmp_path):
    clock = FakeClock()
    publish = ledger(tmp_path, clock, down=lambda: False)
    with pytest.raises(ValueError, match="bad signature"):
        publish.send("model encoder", lambda: (_ for _ in ()).throw(ValueError("bad signature")))
    assert clock.now == 0.0


def test_an_unreadable_ledger_sends_again_with_a_warning(tmp_path, caplog):
    (tmp_path / LEDGER_FILE).write_text("{torn")
    publish = ledger(tmp_path, FakeClock())
    assert publish.send("model encoder", lambda: "models:/m-1") == "models:/m-1"
    assert "unreadable" in caplog.text
