#!/usr/bin/env python
"""Launch training on Slurm (submitit), or here with --local.

    python launch/submit.py --cfg lsor.yaml --nodes 2 --gpus-per-node 4 --partition gpu
    python launch/submit.py --cfg lsor.yaml --cfg smoke.yaml --nodes 2 --wait data.store=...
    python launch/submit.py --cfg lsor.yaml --cfg slurm/profiles/gpu-cluster.yaml --dry-run
    python launch/submit.py --cfg lsor.yaml --folds 5 --sweep train.lr=1e-3,5e-4   # one job array
    python launch/submit.py --cfg lsor.yaml --local                                  # no Slurm
    python launch/submit.py --bids-app BIDS_DIR OUT_DIR --model URI [--participant-label L ..]
                                           # the BIDS-App, one participant per array task
    python launch/submit.py --convert BIDS_DIR OUT.zarr --shape 64 --tasks 16 [--register] [--wait] [--append]
                                           # conversion: an array of blocks, then assembling

Configs merge in order (bare names resolve under configs/), then key=value overrides, then the
flags (--nodes, --gpus-per-node, --partition, --time, --account, --engine), which set the
`slurm` (and `engine`) sections. One task per GPU; on CPU-only partitions (gpus_per_node 0)
slurm.tasks_per_node tasks per node. Jobs requeue themselves on preemption and at the time
limit and resume from the run folder's latest checkpoint, in the same MLflow run.
Exit status: 0 ok, 1 a job failed (--wait), 2 a bad request (config, cluster, flags).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from hpcbrain.redact import redact_text  # noqa: E402  (stdlib only: --help stays fast)
from hpcbrain.volume_grid import MNI_BOXES  # noqa: E402  (numpy only)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--cfg", action="append", default=[], metavar="FILE",
                        help="config file, repeatable, merged in order (bare names resolve "
                             "under configs/; cluster profiles are in slurm/profiles/)")
    parser.add_argument("--nodes", type=int, help="nodes per job (slurm.nodes)")
    parser.add_argument("--gpus-per-node", type=int, metavar="G",
                        help="GPUs per node = tasks per node (slurm.gpus_per_node); 0 for a "
                             "CPU-only partition, where slurm.tasks_per_node applies")
    parser.add_argument("--partition", help="Slurm partition (slurm.partition), checked with sinfo")
    parser.add_argument("--time", metavar="T",
                        help="time limit per (re)queued job: minutes, H:MM:SS or D-HH:MM:SS "
                             "(slurm.time_min)")
    parser.add_argument("--account", help="Slurm account to charge (slurm.account)")
    parser.add_argument("--engine", choices=["ddp", "deepspeed"], help="engine.name")
    parser.add_argument("--folds", type=int, metavar="K",
                        help="cross-validation: K jobs (data.fold=0..K-1) as one job array")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one job per value, repeatable (product); one job array")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true",
                      help="train in this process without Slurm (debug mode)")
    mode.add_argument("--dry-run", action="store_true",
                      help="print the sbatch script and the resolved config; submit nothing")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job(s); exit 1 if one failed")
    app = parser.add_argument_group("BIDS-App on Slurm (hpcbrain/bids_app_launch.py)")
    app.add_argument("--bids-app", nargs=2, metavar=("BIDS_DIR", "OUTPUT_DIR"),
                     help="run `hpcbrain bids-app BIDS_DIR OUTPUT_DIR participant` as a job "
                          "array, one participant per task (--wait: then the group level)")
    app.add_argument("--model", help="the registered model for --bids-app")
    app.add_argument("--participant-label", nargs="+", metavar="LABEL")
    app.add_argument("--session-label", nargs="+", metavar="LABEL")
    app.add_argument("--bids-filter", metavar="JSON|FILE")
    conv = parser.add_argument_group("conversion on Slurm (hpcbrain/convert_launch.py)")
    conv.add_argument("--convert", nargs=2, metavar=("SOURCE", "OUT.zarr"),
                      help="`hpcbrain convert SOURCE --out OUT.zarr` as a job array of "
                           "blocks, then one assembling step (--wait: here, after the array; "
                           "else a job after it); rerun the same command after any failure")
    conv.add_argument("--shape", type=int, nargs="+", metavar="S",
                      help="S of the S³ volumes, or D H W (--convert)")
    conv.add_argument("--grid", choices=sorted(MNI_BOXES),
                      help="the MNI152 brain box instead of --shape (registered scans)")
    conv.add_argument("--tasks", type=int, default=8, help="array tasks (default 8)")
    conv.add_argument("--register", action="store_true")
    conv.add_argument("--skip-bad", action="store_true")
    conv.add_argument("--append", action="store_true",
                      help="add the sessions SOURCE has and OUT.zarr lacks, leaving its shard "
                           "files as they are (hpcbrain/data/append.py)")
    conv.add_argument("--scans-per-shard", type=int, default=16)
    conv.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    conv.add_argument("--codec", default="blosc-lz4", choices=["blosc-lz4", "zstd"])
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    from hpcbrain.launcher import parse_time_min

    flags = {"slurm.nodes": args.nodes, "slurm.gpus_per_node": args.gpus_per_node,
             "slurm.partition": args.partition, "slurm.account": args.account,
             "slurm.time_min": parse_time_min(args.time) if args.time is not None else None,
             "engine.name": args.engine}
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hpcbrain import entry

    try:
        overrides = [*args.overrides, *flag_overrides(args)]
        with entry.full_disk_said():
            if args.bids_app:
                return submit_bids_app(args, overrides)
            if args.convert:
                return submit_convert(args, overrides)
            if args.local:
                return run_local(args, overrides)
            return submit(args, overrides)
    except entry.user_errors() as exc:
        return entry.report(exc)


def run_local(args: argparse.Namespace, overrides: list[str]) -> int:
    """--local: the configs the launch would submit (folds, sweeps), trained here one by one
    through the same function as `hpcbrain train`."""
    from hpcbrain import entry
    from hpcbrain.launcher import expand_jobs, parse_sweeps

    configs, _, _ = expand_jobs(args.cfg, overrides, folds=args.folds,
                                sweeps=parse_sweeps(args.sweep))
    return entry.train_here(configs)


def submit(args: argparse.Namespace, overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    from hpcbrain import entry, launcher

    plan = launcher.plan_launch(args.cfg, overrides, folds=args.folds, sweeps=args.sweep)
    if args.dry_run:
        print_dry_run(plan, OmegaConf)
        return 0
    for cfg in plan.configs[:1]:
        if not Path(cfg.data.store).exists():
            print(f"warning: data.store {cfg.data.store} does not exist on this machine; the job "
                  f"fails unless the nodes see it", file=sys.stderr)
        from hpcbrain.plan import submit_check

        checked = submit_check(cfg, plan.world_size)     # slurm.gpu set: will it fit?
        if checked is not None:
            print(checked[0], file=sys.stdout if checked[1] else sys.stderr)
    jobs = launcher.launch(plan)
    print_submitted(plan, jobs)
    if not args.wait:
        return 0
    failed = deferred = 0
    for job, result, error in launcher.wait(jobs):
        out, err = launcher.task_log_paths(job)
        if error is None:
            print(f"job {job.job_id} finished: {result.global_step} steps, {result.epochs} epochs, "
                  f"run folder {result.run_dir}")
            print(f"  MLflow run:        {result.run_id} ({redact_text(result.tracking_uri)})")
            if result.model_uri:
                print(f"  registered model:  {result.model_uri}")
            if result.age_model_uri:
                print(f"  age predictor:     {result.age_model_uri}")
            if result.deferred:
                print(entry.deferred_line(result), file=sys.stderr)
                deferred += 1
        else:
            failed += 1
            print(f"job {job.job_id} FAILED: {headline(error)}\n  logs: {out}\n        {err}\n"
                  f"{str(error).strip()}", file=sys.stderr)
    return 1 if failed else entry.EXIT_DEFERRED if deferred else 0


def submit_bids_app(args: argparse.Namespace, overrides: list[str]) -> int:
    from hpcbrain import launcher
    from hpcbrain.bids_app import BidsAppError, run_group
    from hpcbrain.bids_app_launch import submit_participants
    from hpcbrain.config import load_config

    if not args.model:
        print("error: --bids-app needs --model MODEL_URI", file=sys.stderr)
        return 2
    cfg = load_config(launcher.resolve_config_files(args.cfg), overrides)
    bids_dir, output_dir = (Path(p) for p in args.bids_app)
    try:
        jobs = submit_participants(cfg, bids_dir, output_dir, args.model, args.participant_label,
                                   args.session_label, args.bids_filter)
    except BidsAppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = jobs[0].job_id.split("_")[0]
    print(f"submitted job array {first} ({len(jobs)} participants) -> {output_dir}")
    print(f"then: hpcbrain bids-app {bids_dir} {output_dir} group")
    if not args.wait:
        return 0
    if report_failed(jobs):
        return 1
    written = run_group(output_dir)
    print(f"group level: {len(written)} files under {output_dir / 'group'}")
    return 0


def submit_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    """--convert: exit 0 when every scan converted, 3 when the store was written with scans
    left out (--skip-bad), 1 when a task or the assembling step failed, 2 for a bad request."""
    from hpcbrain import launcher
    from hpcbrain.config import load_config
    from hpcbrain.convert_launch import submit_conversion
    from hpcbrain.data.append import NothingToAppend
    from hpcbrain.data.convert import ConversionError
    from hpcbrain.data.convert_blocks import finish_conversion
    from hpcbrain.volume_grid import grid_for

    try:
        grid = grid_for(args.shape, args.grid)
    except ValueError as exc:
        print(f"error: --convert: {exc}", file=sys.stderr)
        return 2
    cfg = load_config(launcher.resolve_config_files(args.cfg), overrides)
    source, out = (Path(p) for p in args.convert)
    try:
        submitted = submit_conversion(
            cfg, source, out, grid, tasks=args.tasks, wait=args.wait,
            skip_bad=args.skip_bad, register=args.register, bids_filter=args.bids_filter,
            scans_per_shard=args.scans_per_shard, dtype=args.dtype, codec=args.codec,
            append=args.append)
    except NothingToAppend as exc:
        print(exc)
        return 0
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = submitted.plan
    if submitted.jobs:
        first = submitted.jobs[0].job_id.split("_")[0]
        print(f"submitted job array {first} ({len(submitted.blocks)} of {len(plan.blocks)} "
              f"blocks unfinished, {plan.n_candidates} scans) -> {plan.partial}")
    else:
        print(f"all {len(plan.blocks)} blocks of {plan.partial} are finished")
    if not args.wait:
        print(f"assembling job {submitted.finish_job.job_id} runs after the array; then "
              f"{out} and its QC pages")
        return 0
    failed = report_failed(submitted.jobs)
    if failed:
        print(f"rerun the same command to convert the {failed} unfinished block(s)",
              file=sys.stderr)
        return 1
    try:
        report = finish_conversion(plan)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"converted {report.n_converted} scans into {report.out}"
          + (f"; left out {len(report.skipped)} (see the ledger)" if report.skipped else ""))
    if report.qc_folder is not None:
        print(f"QC: {report.qc_folder / 'index.html'}; {report.flagged} scans flagged")
    return 3 if report.skipped else 0


def report_failed(jobs: list) -> int:
    """Wait for the array's `jobs`; print each failed one with its error and log; how many."""
    from hpcbrain import launcher

    failed = [(job, error) for job, _, error in launcher.wait(jobs) if error is not None]
    for job, error in failed:
        print(f"job {job.job_id} FAILED: {headline(error)}\n  logs: "
              f"{launcher.task_log_paths(job)[1]}", file=sys.stderr)
    return len(failed)


def headline(error: BaseException) -> str:
    """The exception line of a job's traceback (submitit puts the whole trace in the message)."""
    lines = [line.strip() for line in str(error).split("You can check full logs")[0].splitlines()]
    lines = [line for line in lines if line and not set(line) <= {"-"}]
    return lines[-1] if lines else type(error).__name__


def print_dry_run(plan, OmegaConf) -> None:
    from hpcbrain.launcher import sbatch_script

    p = plan.parameters
    print(f"# --dry-run: nothing submitted. {len(plan.configs)} job(s), {p['nodes']} node(s) x "
          f"{p['ntasks_per_node']} task(s) = world size {plan.world_size}; requeues after a "
          f"time limit: up to {plan.max_requeues} (slurm.max_requeues); logs in {plan.log_dir}")
    print("# ---- sbatch script (submitit writes it as <log dir>/<job id>_submission.sh) ----")
    print(redact_text(sbatch_script(plan)))
    if plan.is_array:
        print(f"# ---- job array: {len(plan.names)} elements ----")
        for index, name in enumerate(plan.names):
            print(f"#   [{index}] {name}")
    print(f"# ---- resolved config ({plan.names[0]}) ----")
    print(redact_text(OmegaConf.to_yaml(plan.configs[0], resolve=True)), end="")


def print_submitted(plan, jobs) -> None:
    from hpcbrain.launcher import task_log_paths, tracking_summary

    p = plan.parameters
    where = p.get("partition") or "the default partition"
    first = jobs[0].job_id.split("_")[0]
    kind = f"job array {first} ({len(jobs)} elements)" if plan.is_array else f"job {first}"
    print(f"submitted {kind}: {p['nodes']} node(s) x {p['ntasks_per_node']} task(s) on {where}")
    for job, cfg in zip(jobs, plan.configs):
        out, err = task_log_paths(job)
        uri, run_id = tracking_summary(cfg)
        print(f"job {job.job_id}  run {cfg.run.name}")
        print(f"  run folder:  {Path(cfg.run.root) / cfg.run.name}")
        print(f"  logs:        {out}\n               {err}   (other ranks: _<rank>_ in the name)")
        print(f"  MLflow:      {redact_text(uri)}, experiment {cfg.tracking.experiment}, "
              + (f"continuing run {run_id}" if run_id else
                 "run id written to <run folder>/mlflow_run_id when the job starts"))
    print(f"follow: squeue -j {first}; sacct -j {first}; tail -f {task_log_paths(jobs[0])[1]}")


if __name__ == "__main__":
    sys.exit(main())
