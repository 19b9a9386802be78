"""`hpcbrain convert` on Slurm: one array task per block of shards, then one assembling step
(``python launch/submit.py --convert SRC OUT.zarr --shape S [--tasks N] [--wait]``).

The submitting process plans the conversion (`convert_blocks.plan_conversion`: discovery, the
staging folder ``OUT.partial``, the blocks), submits one array task per *unfinished* block
(`ConvertBlockTask`) and then either waits for them and assembles the store itself (``--wait``)
or submits the assembling step as a job that runs after the array, whatever its outcome
(``afterany``; `FinishConversionTask`: with a block missing it fails naming the unfinished
blocks). Rerunning the same command after any failure submits only what is unfinished. The
Slurm resources come from the config's ``slurm`` section and the flags (--partition, --time, …),
one node and one task per element, ``slurm.array_parallelism`` of them at once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from omegaconf import DictConfig

from hpcbrain.data.convert_blocks import (
    BlockPlan,
    convert_block,
    finish_conversion,
    plan_conversion,
    unfinished_blocks,
    unfinished_shards,
)

__all__ = ["ConvertBlockTask", "FinishConversionTask", "submit_conversion"]


@dataclass
class ConvertBlockTask:
    """What one array element runs (pickled by submitit)."""

    plan: dict
    block: int

    def __call__(self) -> dict[str, Any]:
        """Converts the block; what it did: shards and scans written, seconds, the task's peak
        resident memory (MB) — what `bench/convert_scale.py` tables."""
        import resource
        import time

        plan = BlockPlan(**self.plan)
        started = time.perf_counter()
        todo = unfinished_shards(plan, self.block)
        shards = convert_block(plan, self.block)
        return {"block": self.block, "shards": shards,
                "scans": sum(len(plan.shard_rows(s)) for s in todo),
                "seconds": round(time.perf_counter() - started, 3),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


@dataclass
class FinishConversionTask:
    """The assembling step, as a job of its own."""

    plan: dict

    def __call__(self) -> dict[str, Any]:
        report = finish_conversion(BlockPlan(**self.plan))
        return {"converted": report.n_converted, "left_out": len(report.skipped),
                "qc": str(report.qc_folder)}


@dataclass
class SubmittedConversion:
    plan: BlockPlan
    blocks: list[int]                 # the blocks submitted (the unfinished ones)
    jobs: list                        # one submitit job per submitted block
    finish_job: Any = None            # the assembling job (without --wait)


def submit_conversion(cfg: DictConfig, source, out, shape, *, tasks: int, wait: bool,
                      **options) -> SubmittedConversion:
    """Plan, then submit the unfinished blocks (and, unless `wait`, the assembling job).
    `options`: convert's (skip_bad, register, bids_filter, scans_per_shard, dtype, codec …)."""
    from hpcbrain.launcher import require_slurm, single_task_executor

    require_slurm()                   # before planning: no staging folder without a cluster
    plan = plan_conversion(source, out, shape, tasks=tasks, **options)
    todo = unfinished_blocks(plan)
    executor, params = single_task_executor(cfg, "hpcbrain-convert")
    jobs = []
    if todo:
        with executor.batch():
            for block in todo:
                jobs.append(executor.submit(ConvertBlockTask(asdict(plan), block)))
    result = SubmittedConversion(plan, todo, jobs)
    if not wait:
        finisher, _ = single_task_executor(cfg, "hpcbrain-convert-finish")
        if jobs:
            finisher.update_parameters(
                dependency=f"afterany:{jobs[0].job_id.split('_')[0]}")
        result.finish_job = finisher.submit(FinishConversionTask(asdict(plan)))
    return result
