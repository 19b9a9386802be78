"""One owner per run folder (`hpcbrain.run_lock`), and run.name kept inside run.root."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hpcbrain.config import ConfigError, load_config
from hpcbrain.run_lock import LOCK_FILE, RunFolderLocked, run_folder_lock

HOLD = """
import sys, time
from hpcbrain.run_lock import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_owner_is_refused_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(RunFolderLocked, match=rf"in use by .* pid {holder.pid} .*another "
                                                   rf"run.name"):
            with run_folder_lock(tmp_path):
                pass
        assert time.perf_counter() - started < 2
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the folder is free, its record taken over
    with run_folder_lock(tmp_path):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""          # released cleanly: no record


def test_a_stale_record_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gone", "pid": 999999}))
    with caplog.at_level("WARNING", logger="hpcbrain.run_lock"):
        with run_folder_lock(tmp_path):
            pass
    assert "taking over the lock record of gone pid 999999" in caplog.text


@pytest.mark.parametrize("name", ["../x", "a/../../b", "/etc", "${oc.env:HOME}", "..", "."])
def test_run_name_stays_inside_run_root(name, tmp_path):
    with pytest.raises(ConfigError, match="bad value for 'run.name'"):
        load_config(["lsor.yaml"], [f"run.name={name}", f"run.root={tmp_path}"])
    assert list(tmp_path.iterdir()) == []                   # nothing written anywhere
    assert load_config(["lsor.yaml"], ["run.name=demo/lsor"]).run.name == "demo/lsor"


# ---------------------------------------------------------------------------------------------
# across hosts: a shared file system whose flock is per host (Lustre `localflock`, NFS without
# its lock manager) lets every host take the flock; the holder's heartbeat decides instead.
# "Another host" is a record naming another host name, its beat written by a thread here.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def quick_beats(monkeypatch):
    from hpcbrain import run_lock

    monkeypatch.setattr(run_lock, "BEAT_S", 0.2)
    monkeypatch.setattr(run_lock, "STALE_S", 1.0)


def write_record(folder, host="node-b", pid=4242, beat=None):
    (folder / LOCK_FILE).write_text(json.dumps(
        {"host": host, "pid": pid, "since": "2026-12-05T10:00:00+0000",
         "beat": time.time() if beat is None else beat}))


def test_a_live_holder_on_another_host_is_refused_by_its_heartbeat(tmp_path, quick_beats):
    import threading

    write_record(tmp_path)
    stop = threading.Event()

    def other_host_beats():
        while not stop.wait(0.2):
            write_record(tmp_path)

    beating = threading.Thread(target=other_host_beats, daemon=True)
    beating.start()
    try:
        started = time.perf_counter()
        with pytest.raises(RunFolderLocked, match=r"in use by node-b pid 4242"):
            with run_folder_lock(tmp_path):
                pass
        assert time.perf_counter() - started < 1.0      # one beat seen, not the stale time
    finally:
        stop.set()
        beating.join()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-b"   # left alone


def test_a_dead_holder_on_another_host_is_taken_over_once_its_beat_is_stale(tmp_path,
                                                                             quick_beats, caplog):
    write_record(tmp_path, beat=time.time())           # fresh, but nobody beats it again
    started = time.perf_counter()
    with caplog.at_level("WARNING", logger="hpcbrain.run_lock"):
        with run_folder_lock(tmp_path):
            waited = time.perf_counter() - started
            record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert 0.8 <= waited < 3.0                           # watched until the 1 s stale time
    assert record["host"] != "node-b" and record["pid"] == os.getpid()
    assert "taking over the lock record of node-b pid 4242" in caplog.text
    write_record(tmp_path, beat=time.time() - 30)      # long stale: taken over at once
    started = time.perf_counter()
    with run_folder_lock(tmp_path):
        assert time.perf_counter() - started < 0.5


def test_the_holder_beats_while_it_holds_and_clears_its_record_on_release(tmp_path,
                                                                          quick_beats):
    with run_folder_lock(tmp_path):
        first = json.loads((tmp_path / LOCK_FILE).read_text())["beat"]
        time.sleep(0.7)
        later = json.loads((tmp_path / LOCK_FILE).read_text())
    assert later["beat"] > first and later["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""
