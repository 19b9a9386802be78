"""The BIDS-App's participant level on Slurm: one participant per array task
(``python launch/submit.py --bids-app BIDS_DIR OUTPUT_DIR --model URI``).

Every task runs `bids_app.run_participant` for its participant into the shared OUTPUT_DIR (files
are written atomically; dataset_description.json is the same for every task). The Slurm
resources come from the config's ``slurm`` section and the flags (--partition, --time, ...), one
node and one task per array element; ``slurm.array_parallelism`` caps how many run at once. The
model is read from ``tracking.uri`` (or the jobs' MLFLOW_TRACKING_URI). The group level is cheap:
run ``hpcbrain bids-app BIDS_DIR OUTPUT_DIR group`` once the array has finished (with --wait,
submit.py runs it itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig


@dataclass
class ParticipantTask:
    """What one array element runs (pickled by submitit)."""

    bids_dir: str
    output_dir: str
    model_uri: str
    participant: str
    sessions: list[str] | None
    bids_filter: str | None
    tracking_uri: str | None

    def __call__(self) -> list[str]:
        if self.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(self.tracking_uri)
        from hpcbrain.bids_app import run_participant

        written = run_participant(self.bids_dir, self.output_dir, self.model_uri,
                                  [self.participant], self.sessions, self.bids_filter)
        return [str(p) for p in written]


def participants_of(bids_dir: Path, labels: Sequence[str] | None,
                    bids_filter: str | None) -> list[str]:
    """The participants to process: `labels`, or every participant with a T1w image."""
    from hpcbrain.bids_app import select_scans

    scans = select_scans(bids_dir, labels, None, bids_filter)
    return sorted({s.subject for s in scans})


def submit_participants(cfg: DictConfig, bids_dir: Path, output_dir: Path, model_uri: str,
                        labels: Sequence[str] | None, sessions: Sequence[str] | None,
                        bids_filter: str | None) -> list:
    """One Slurm job array, one element per participant; returns the submitit jobs."""
    from hpcbrain.launcher import single_task_executor
    from hpcbrain.tracking import tracking_uri

    bids_dir, output_dir = bids_dir.resolve(), output_dir.resolve()
    participants = participants_of(bids_dir, labels, bids_filter)
    executor, _ = single_task_executor(cfg, "hpcbrain-bids-app")
    uri = tracking_uri(cfg.tracking)
    jobs = []
    with executor.batch():
        for participant in participants:
            jobs.append(executor.submit(ParticipantTask(
                str(bids_dir), str(output_dir), model_uri, participant,
                list(sessions) if sessions else None, bids_filter, uri)))
    return jobs
