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
