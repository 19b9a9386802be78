"""How long hpcbrain takes to notice each fault and to get going again, with default settings.

    .venv/bin/python -m bench.fault_times --out runs/bench/faults

On a small synthetic cohort (made once under OUT), each case runs the real commands a user
runs (`hpcbrain train`, `torchrun`) and prints one table row:

* hung rank: two DDP ranks under torchrun; rank 1 is SIGSTOPped mid-training; the time until the
  job exits non-zero (engine.step_timeout_minutes = 2 by default; the issue asks ≤ 180 s);
* no tracking server: tracking.uri points at a port where nothing listens; time to the error;
* same run folder twice: a second `hpcbrain train` on a folder a first one is training in;
* truncated checkpoint: the newest checkpoint cut to 100 bytes; the rerun names it, resumes
  from the one before it and finishes;
* preemption: SIGTERM to a local run mid-epoch; the time to stop (checkpoint of that step
  written) and the rerun's time to resume.
* SIGKILL: a local run killed mid-epoch (checkpoints every 2 steps); the rerun's time to resume
  and how many steps it trains again;
* full disk: the run folder on a 16 MB tmpfs that a ballast file fills mid-run (root only); the
  time to the one-line error, then to resume once the ballast is gone;
* tracking gone at the end: a real `mlflow server` killed mid-run and not back; the time the
  finishing phase waits (tracking.outage_wait_s, 60 s by default) before exit 75, and the
  rerun's time (server back) to register the encoder.

Tests assert the behaviour (tests/engine/test_preemption.py, test_hung_rank.py, test_run_lock.py,
test_checkpoint.py, test_tracking_outage.py); this prints the times for docs/fault-tolerance.md.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, VENV, make_cohort

COMMON = ["--cfg", "lsor.yaml", "--cfg", "smoke.yaml", "tracking.enabled=false",
          "train.max_steps_per_epoch=null", "train.log_every_steps=1"]


def train_cmd(store: Path, root: Path, name: str, *extra: str) -> list[str]:
    return [str(VENV / "hpcbrain"), "train", *COMMON, f"data.store={store}",
            f"run.root={root}", f"run.name={name}", *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_text(log: Path, pattern: str, proc: subprocess.Popen, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while not re.search(pattern, log.read_text() if log.exists() else ""):
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before /{pattern}/:\n"
                               f"{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"/{pattern}/ not seen in {timeout_s} s")
        time.sleep(0.1)


def rank_pid(parent: int, rank: int) -> int:
    """The torchrun worker with RANK=rank among the descendants of `parent`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and int(stat[1]) != 1 and \
                b"TORCHELASTIC_RUN_ID" in b"\0".join(environ) and int(entry) != parent:
            return int(entry)
    raise RuntimeError(f"no process with RANK={rank} under {parent}")


def hung_rank(store: Path, out: Path) -> tuple[str, str]:
    log = out / "hung.log"
    cmd = [VENV / "torchrun", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "hpcbrain.cli", "train", *COMMON, f"data.store={store}", f"run.root={out}",
           "run.name=hung", "engine.name=ddp", "train.epochs=200", "train.num_threads=1"]
    proc = start(cmd, log)
    wait_for_text(log, r"epoch 2/200", proc)
    victim = rank_pid(proc.pid, 1)
    os.kill(victim, signal.SIGSTOP)
    stopped = time.monotonic()
    code = proc.wait(900)
    seconds = time.monotonic() - stopped
    try:
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        pass
    named = re.search(r"CollectiveFailed: ([^\n]{0,160})", log.read_text())
    return (f"{seconds:.0f} s to exit {code}",
            named.group(1) if named else "(no CollectiveFailed in the log)")


def no_tracking_server(store: Path, out: Path) -> tuple[str, str]:
    from hpcbrain.process_group import free_port

    log = out / "tracking.log"
    started = time.monotonic()
    proc = start(train_cmd(store, out, "tracking", "tracking.enabled=true",
                           f"tracking.uri=http://127.0.0.1:{free_port()}"), log)
    code = proc.wait(900)
    line = next((x for x in log.read_text().splitlines() if "does not answer" in x), "")
    return f"{time.monotonic() - started:.1f} s to exit {code}", line[-160:]


def same_folder_twice(store: Path, out: Path) -> tuple[str, str]:
    first = start(train_cmd(store, out, "shared", "train.epochs=40"), out / "first.log")
    wait_for_text(out / "first.log", r"steps per epoch", first)
    started = time.monotonic()
    second = start(train_cmd(store, out, "shared", "train.epochs=40"), out / "second.log")
    code = second.wait(300)
    seconds = time.monotonic() - started
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    line = next((x for x in (out / "second.log").read_text().splitlines() if "in use by" in x), "")
    return f"{seconds:.1f} s to exit {code} (process start included)", line[-160:]


def truncated_checkpoint(store: Path, out: Path) -> tuple[str, str]:
    proc = start(train_cmd(store, out, "trunc", "train.epochs=3"), out / "trunc1.log")
    assert proc.wait(900) == 0
    newest = sorted((out / "trunc" / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    (out / "trunc" / "result.json").unlink()
    started = time.monotonic()
    proc = start(train_cmd(store, out, "trunc", "train.epochs=4"), out / "trunc2.log")
    code = proc.wait(900)
    text = (out / "trunc2.log").read_text()
    resumed = re.search(r"resumed from (\S+)", text)
    return (f"{time.monotonic() - started:.1f} s to finish, exit {code}",
            f"named: {newest.name in text}; resumed from "
            f"{Path(resumed.group(1)).name if resumed else '?'}")


def preemption(store: Path, out: Path) -> tuple[str, str]:
    log = out / "preempt1.log"
    proc = start(train_cmd(store, out, "preempt", "train.epochs=6"), log)
    wait_for_text(log, r"epoch 3/6:.*\d+/\d+", proc)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(300)
    to_stop = time.monotonic() - signalled
    stopped = re.search(r"after global step (\d+)", log.read_text())
    started = time.monotonic()
    again = start(train_cmd(store, out, "preempt", "train.epochs=6"), out / "preempt2.log")
    wait_for_text(out / "preempt2.log", r"resumed from", again)
    to_resume = time.monotonic() - started
    assert again.wait(900) == 0
    return (f"{to_stop:.1f} s to stop (exit {code}), {to_resume:.1f} s to resume",
            f"stopped after global step {stopped.group(1) if stopped else '?'}")


def sigkill(store: Path, out: Path) -> tuple[str, str]:
    log = out / "kill1.log"
    proc = start(train_cmd(store, out, "kill", "train.epochs=6",
                           "train.checkpoint_every_steps=2"), log)
    wait_for_text(log, r"epoch 3/6:.*\d+/\d+", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(60)
    started = time.monotonic()
    again = start(train_cmd(store, out, "kill", "train.epochs=6",
                            "train.checkpoint_every_steps=2"), out / "kill2.log")
    wait_for_text(out / "kill2.log", r"resumed from", again)
    to_resume = time.monotonic() - started
    assert again.wait(900) == 0
    resumed = re.search(r"resumed from \S+step-0*(\d+)\.pt", (out / "kill2.log").read_text())
    return (f"{to_resume:.1f} s from the rerun's start to resuming (process start included)",
            f"resumed at step {resumed.group(1) if resumed else '?'} (checkpoints every 2 steps)")


def full_disk(store: Path, out: Path) -> tuple[str, str]:
    import shutil
    import uuid

    mount = Path(f"/tmp/hpcbrain-bench-full-{uuid.uuid4().hex[:8]}")
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)]).returncode:
        mount.rmdir()
        return "not measured (mounting a tmpfs needs root)", ""
    try:
        log = mount / "disk1.log"
        cmd = train_cmd(store, mount, "disk", "train.epochs=8", "train.checkpoint_every_steps=2")
        proc = start(cmd, out / "disk1.log")
        wait_for_text(out / "disk1.log", r"epoch 3/8:.*\d+/\d+", proc)
        ballast = mount / "ballast"
        with open(ballast, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * (1 << 20))
            except OSError:
                pass
        filled = time.monotonic()
        code = proc.wait(300)
        to_stop = time.monotonic() - filled
        line = next((x[x.index("error:"):] for x in (out / "disk1.log").read_text().splitlines()
                     if "error: out of disk space" in x), "")
        ballast.unlink()
        started = time.monotonic()
        again = start(cmd, out / "disk2.log")
        wait_for_text(out / "disk2.log", r"resumed from", again)
        to_resume = time.monotonic() - started
        assert again.wait(900) == 0
        del log
        return (f"{to_stop:.1f} s from the disk filling to exit {code}; {to_resume:.1f} s to "
                f"resume once freed", line[:200])
    finally:
        subprocess.run(["umount", "-l", str(mount)])
        shutil.rmtree(mount, ignore_errors=True)


def tracking_gone_at_the_end(store: Path, out: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from mlflow_server import MlflowServer, free_port

    folder = out / "server"
    folder.mkdir(exist_ok=True)
    server = MlflowServer(folder, free_port())
    server.start()
    cmd = train_cmd(store, out, "gone", "train.epochs=8", "tracking.enabled=true",
                    f"tracking.uri={server.uri}", "tracking.registered_model=gone-encoder")
    try:
        proc = start(cmd, out / "gone1.log")
        wait_for_text(out / "gone1.log", r"epoch 3/8:.*\d+/\d+", proc)
        server.stop()
        code = proc.wait(900)
        text = (out / "gone1.log").read_text()
        waited = re.search(r"retrying every .* for at most (\S+) s", text)
        line = next((x for x in text.splitlines() if x.startswith("deferred:")), "")
        server.start()
        started = time.monotonic()
        again = start(cmd, out / "gone2.log")
        code2 = again.wait(900)
        registered = "registered model:  models:/gone-encoder@current" in \
            (out / "gone2.log").read_text()
        return (f"exit {code} after waiting {waited.group(1) if waited else '?'} s; the rerun "
                f"(server back) {time.monotonic() - started:.1f} s to exit {code2}, registered: "
                f"{registered}", line[:200])
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "faults")
    parser.add_argument("--cases", nargs="+", default=["tracking", "folder", "truncated",
                                                        "preemption", "hung", "sigkill", "disk",
                                                        "gone"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = make_cohort(args.out, seed=11, subjects=12, synth_args=[])
    cases = {"tracking": ("no tracking server at start", no_tracking_server),
             "folder": ("same run folder twice", same_folder_twice),
             "truncated": ("newest checkpoint truncated", truncated_checkpoint),
             "preemption": ("SIGTERM mid-epoch (local run)", preemption),
             "hung": ("one of two DDP ranks SIGSTOPped", hung_rank),
             "sigkill": ("SIGKILL mid-epoch (local run)", sigkill),
             "disk": ("run folder's file system full mid-run", full_disk),
             "gone": ("tracking server gone before the end, not back", tracking_gone_at_the_end)}
    print("| fault | time | what was said |\n|---|---|---|", flush=True)
    for key in args.cases:
        title, run = cases[key]
        timing, said = run(store, args.out)
        print(f"| {title} | {timing} | {said} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
