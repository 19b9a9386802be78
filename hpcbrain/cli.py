"""The `hpcbrain` command: synth, convert, train, embed, predict-age, config.

Heavy imports (torch, zarr, mlflow) happen inside each sub-command so `hpcbrain --help` is fast.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcbrain.gpus import GPUS
from hpcbrain.volume_grid import MNI_BOXES, grid_for


def _cmd_synth(args: argparse.Namespace) -> int:
    from hpcbrain.data.synth import synthesize_cohort

    try:
        summary = synthesize_cohort(
            args.out, args.subjects, seed=args.seed, voxel_size_mm=args.voxel_size,
            progress=not args.quiet, preset=args.preset, age_distribution=args.age_distribution,
            age_range=args.age_range, brain_age_gap_sd=args.brain_age_gap_sd,
            rescans=args.rescans)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary.n_scans} scans of {summary.n_subjects} subjects ({summary.preset}) "
          f"to {summary.out_dir}")
    report = summary.learnability
    if report:
        print(f"learnability at {report['input_size']}³ (5 subject-grouped folds): age MAE "
              f"constant {report['constant_age']['mae']:.2f}, ridge on voxels "
              f"{report['ridge_age']['mae']:.2f} (R² {report['ridge_age']['r2']:.2f}), oracle "
              f"{report['oracle_age']['mae']:.2f}; brain-age ridge R² "
              f"{report['ridge_brain_age']['r2']:.2f}")
    return 0


def _codec_arguments(parser) -> None:
    from hpcbrain.data.store import DEFAULT_CODEC, DEFAULT_LEVELS, IMAGE_CODECS

    parser.add_argument("--codec", default=DEFAULT_CODEC, choices=list(IMAGE_CODECS),
                        help="images compressor (default %(default)s: fastest to read; zstd: "
                             "smallest)")
    parser.add_argument("--codec-level", type=int, default=None,
                        help="compression level (default " +
                             ", ".join(f"{k} {v}" for k, v in DEFAULT_LEVELS.items()) + ")")


def _repair(store: Path) -> int:
    from hpcbrain.data.repair import repair_store

    report = repair_store(store)         # RepairError (a StoreError): main reports it, exit 2
    if not report.corrupt:
        print(f"{report.store}: every scan reads intact; nothing to repair "
              f"({report.seconds:.1f} s)")
        return 0
    print(f"repaired {len(report.repaired)} corrupt scan(s) of {report.store} from their "
          f"sources in {report.seconds:.1f} s; shard files replaced:")
    for shard in report.shards:
        print(f"  {shard}")
    return 0


def _cmd_recompress(args) -> int:
    from hpcbrain.data.recompress import recompress_store
    from hpcbrain.data.store import StoreError

    try:
        report = recompress_store(args.store, args.codec, args.codec_level)
    except (StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"recompressed {report.n_scans} scans of {report.store} with {report.codec['name']} "
          f"level {report.codec['level']}: images {report.bytes_before / 1e6:.1f} MB → "
          f"{report.bytes_after / 1e6:.1f} MB in {report.seconds:.1f} s")
    return 0


def _cmd_evaluate(args) -> int:
    import json

    import mlflow

    from hpcbrain.atomic import write_text_atomic
    from hpcbrain.evaluate.downstream import evaluate_model
    from hpcbrain.tracking import experiment_id

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    result = evaluate_model(args.model, str(args.store), args.task, folds=args.folds,
                            seed=args.seed, epochs=args.epochs)
    scores = {f"{args.task}/{predictor}/{metric}": values
              for predictor in ("mlp", "linear") for metric, values in result[predictor].items()}
    # through a client, not mlflow's module-level active experiment and run: nothing global
    # changes for whatever runs next in this process
    client = mlflow.MlflowClient()
    run = client.create_run(experiment_id("hpcbrain-evaluate", mlflow.get_tracking_uri()),
                            run_name=f"{args.task} {args.model}")
    for key, value in {"model": args.model, "store": str(args.store), "task": args.task,
                       "folds": args.folds, "epochs": args.epochs, "seed": args.seed}.items():
        client.log_param(run.info.run_id, key, value)
    for key, values in scores.items():
        if values["mean"] == values["mean"]:                      # NaN is not a metric
            client.log_metric(run.info.run_id, key.replace("-", "_"), values["mean"])
    client.log_dict(run.info.run_id, result, "evaluation.json")
    client.set_terminated(run.info.run_id)
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    for key, values in scores.items():
        print(f"{key:<28} {values['mean']:.3f} ± {values['std']:.3f}")
    return 0


def _cmd_bids_app(args) -> int:
    from hpcbrain import bids_app

    if args.analysis_level == "group":
        written = bids_app.run_group(args.output_dir)
    else:
        if not args.model:
            print("error: the participant level needs --model MODEL_URI", file=sys.stderr)
            return 2
        if args.tracking_uri:
            import mlflow

            mlflow.set_tracking_uri(args.tracking_uri)
        written = bids_app.run_participant(args.bids_dir, args.output_dir, args.model,
                                           args.participant_label, args.session_label,
                                           args.bids_filter, args.batch_size)
    print(f"bids-app {args.analysis_level}: wrote {len(written)} files under {args.output_dir}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from hpcbrain.data.convert import ConversionError, convert_cohort

    if args.repair is not None:
        if args.source is not None or args.out is not None or args.shape is not None \
                or args.grid is not None:
            raise ConversionError("convert --repair STORE takes no SOURCE, --out, --shape or "
                                  "--grid: "
                                  "the store records where its scans came from and how")
        return _repair(args.repair)
    if args.source is None or args.out is None or (args.shape is None and args.grid is None):
        raise ConversionError("convert needs SOURCE, --out STORE and --shape S (or --shape D H "
                              "W, or --grid mni2mm) (or --repair STORE)")
    try:
        grid = grid_for(args.shape, args.grid)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    # a ConversionError (nothing written) is a user error: main reports it, exit 2
    report = convert_cohort(args.source, args.out, grid, workers=args.workers,
                            skip_bad=args.skip_bad, dtype=args.dtype,
                            scans_per_shard=args.scans_per_shard, codec=args.codec,
                            codec_level=args.codec_level, register=args.register,
                            bids_filter=args.bids_filter,
                            progress=not args.quiet, qc_report=not args.no_qc_report,
                            append=args.append)
    print(f"converted {report.n_converted} scans into {report.out} in {report.seconds:.1f} s"
          + (f"; skipped {len(report.skipped)}" if report.skipped else ""))
    if report.qc_folder is not None:
        print(f"QC: {report.qc_folder / 'index.html'} (ledger: "
              f"{report.qc_folder / 'conversion.tsv'}); {report.flagged} scans flagged")
    # documented exit codes: 0 every scan converted, 3 converted with scans left out
    # (--skip-bad; the ledger names them), 2 nothing written (an error)
    return 3 if report.skipped else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from hpcbrain.data.verify import verify_store

    report = verify_store(args.store)
    rate = report.bytes_read / 2**20 / max(report.seconds, 1e-9)
    print(f"verified {report.scans} scans of {report.store} in {report.seconds:.1f} s "
          f"({rate:.0f} MB/s of volumes)")
    if not report.checksummed:
        print("note: this store's chunks carry no checksums (made before December 2026): a "
              "flipped byte that still decodes goes unseen; `hpcbrain recompress STORE` adds them")
    for line in report.problems + report.corrupt:
        print(f"BAD: {line}")
    if report.ok:
        print("all good")
        return 0
    print(f"{len(report.corrupt)} corrupt scan(s), {len(report.problems)} other problem(s)")
    return 1


def _cmd_embed(args: argparse.Namespace) -> int:
    import mlflow

    from hpcbrain.config import load_config
    from hpcbrain.evaluate.embed import embed_scans, write_latents
    from hpcbrain.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(load_config().tracking))  # $MLFLOW_TRACKING_URI or the project db
    embedding = embed_scans(args.model, args.scans, batch_size=args.batch_size)
    try:
        write_latents(args.out, args.scans, embedding, similarity=args.similarity)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n, dim = embedding.latents.shape
    som = (f" with their best-matching node on the {embedding.grid[0]}×{embedding.grid[1]} SOM "
           f"grid" if embedding.grid else "")
    print(f"wrote {n} latents of dimension {dim}{som} to {args.out}")
    return 0


def _cmd_predict_age(args: argparse.Namespace) -> int:
    import math

    import mlflow
    import numpy as np

    from hpcbrain.config import load_config
    from hpcbrain.evaluate.age_predictor import calibrated, predict_ages, write_ages
    from hpcbrain.evaluate.scan_ages import chronological_ages
    from hpcbrain.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(load_config().tracking))  # $MLFLOW_TRACKING_URI or the project db
    try:
        ages = chronological_ages(args.scans, args.ages)   # before the slow part: fail early
        predicted, calibration = predict_ages(args.model, args.scans, batch_size=args.batch_size)
        result = calibrated(predicted, calibration, ages, args.level, args.correction)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_ages(args.out, args.scans, result)
    print(f"wrote {len(predicted)} predicted ages (mean {float(predicted.mean()):.1f} years) to "
          f"{args.out}")
    if calibration is None:
        print("warning: this model carries no calibration (registered by an older hpcbrain): "
              "no intervals, extrapolation flags or corrected gaps; retrain to get them",
              file=sys.stderr)
    else:
        radius = calibration.radius(result.level)
        print(f"{100 * result.level:.0f} % intervals ± {radius:.2f} years; age-bias correction "
              f"{args.correction or calibration.correction}")
        if not np.isfinite(radius):
            print(f"warning: the model was calibrated on {calibration.calibration_scans} scans, "
                  f"too few for a {100 * result.level:g} % interval (it needs at least "
                  f"{math.ceil(round(result.level / (1 - result.level), 9))}): the intervals are "
                  f"unbounded; ask for a lower --level", file=sys.stderr)
        flagged = [str(s) for s, x in zip(args.scans, result.extrapolated) if x]
        if flagged:
            print(f"warning: {len(flagged)} scans predicted outside the training ages "
                  f"{calibration.training_age_min:.1f}–{calibration.training_age_max:.1f} "
                  f"(column extrapolated), e.g. {flagged[0]}", file=sys.stderr)
    if ages is None:
        print("chronological ages unknown (no --ages, scans not in a BIDS dataset with ages): "
              "no gap columns")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from hpcbrain.config import load_config
    from hpcbrain.redact import redact_text

    print(redact_text(OmegaConf.to_yaml(load_config(args.cfg, args.overrides))), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from hpcbrain import entry
    from hpcbrain.config import load_config

    return entry.train_here([load_config(args.cfg, args.overrides)])


def _cmd_plan(args: argparse.Namespace) -> int:
    from hpcbrain.config import load_config
    from hpcbrain.plan import DEFAULT_MFU, describe, plan_from_args

    cfg = load_config(args.cfg, args.overrides)
    nodes = args.nodes if args.nodes is not None else int(cfg.slurm.nodes)
    gpus = args.gpus_per_node if args.gpus_per_node is not None else \
        max(1, int(cfg.slurm.gpus_per_node))
    gpu = args.gpu or (None if args.memory_gib else cfg.slurm.gpu)
    plan = plan_from_args(cfg, nodes, gpus, gpu, args.memory_gib,
                          args.mfu if args.mfu is not None else DEFAULT_MFU)
    print(describe(plan))
    return 0 if plan.fits() is not False else 1


def build_parser() -> argparse.ArgumentParser:
    from hpcbrain.data.synth_subjects import AGE_DISTRIBUTIONS, PRESETS  # numpy only: fast --help

    parser = argparse.ArgumentParser(prog="hpcbrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic longitudinal BIDS cohort")
    synth.add_argument("--out", required=True, type=Path, help="BIDS folder to create")
    synth.add_argument("--subjects", type=int, default=20)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--voxel-size", type=float, default=2.0, help="mm (2 = MNI152 2 mm)")
    synth.add_argument("--preset", choices=PRESETS, default="registered",
                       help="registered: as after affine registration to MNI (default); raw: "
                            "unregistered head size and pose")
    synth.add_argument("--age-distribution", choices=AGE_DISTRIBUTIONS,
                       default="normal", help="baseline ages (bimodal: dense young and old "
                                              "modes, sparse middle)")
    synth.add_argument("--age-range", nargs=2, type=float, metavar=("LO", "HI"), default=None,
                       help="baseline ages lie in [LO, HI] (default 60 90)")
    synth.add_argument("--brain-age-gap-sd", type=float, default=None,
                       help="between-subject sd of brain age − age at baseline, years "
                            "(default 3)")
    synth.add_argument("--rescans", type=int, default=0, metavar="K",
                       help="K repeat scans of every visit as BIDS run-2, run-3, … (same "
                            "anatomy; own noise, bias field and residual pose): test–retest "
                            "data. Conversion uses run-1 unless --bids-filter picks another")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=_cmd_synth)

    convert = sub.add_parser("convert", help="convert a BIDS folder or CSV manifest into a "
                                             "cohort store")
    convert.add_argument("source", type=Path, nargs="?",
                         help="BIDS folder or CSV manifest (path, subject, session, age, ...)")
    convert.add_argument("--out", type=Path, help="the store, e.g. cohort.zarr (required)")
    convert.add_argument("--shape", type=int, nargs="+", metavar="S",
                         help="S: volumes become S³ cubes of each scan's field of view; D H W: "
                              "boxes of that aspect (this or --grid is required)")
    convert.add_argument("--grid", choices=sorted(MNI_BOXES),
                         help="sample every scan on the MNI152 brain box (mni2mm: 80 × 96 × 80 "
                              "at 2 mm, mni1mm: 160 × 192 × 160 at 1 mm); the scans must be in "
                              "MNI152 space (--register, or registered inputs)")
    convert.add_argument("--repair", type=Path, metavar="STORE",
                         help="instead: re-convert the corrupt scans of STORE (those `hpcbrain "
                              "verify` finds) from their sources, each shard replaced whole; "
                              "no SOURCE, --out or --shape")
    convert.add_argument("--workers", type=int, default=1, help="reader processes")
    convert.add_argument("--skip-bad", action="store_true",
                         help="convert the good scans, record the bad ones in the store's "
                              "ledger (exit status 3 when any were left out)")
    convert.add_argument("--append", action="store_true",
                         help="add the sessions of SOURCE that the existing --out store lacks, "
                              "leaving its shard files as they are (same settings required)")
    convert.add_argument("--no-qc-report", action="store_true",
                         help="do not write the QC pages (OUT_qc/ beside OUT.zarr)")
    convert.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    convert.add_argument("--scans-per-shard", type=int, default=16)
    convert.add_argument("--bids-filter", default=None, metavar="JSON|FILE",
                         help="which T1w images of a session to use, e.g. "
                              "'{\"t1w\": {\"acquisition\": \"mprage\", \"run\": 1}}'")
    convert.add_argument("--register", action="store_true",
                         help="N4 bias correction and affine registration to MNI152 (ANTsPy) "
                              "before resampling; failed registrations are bad scans")
    _codec_arguments(convert)
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_cmd_convert)

    verify = sub.add_parser("verify", help="scrub a cohort store: every chunk's checksum, every "
                                           "column's length and kind (exit 1 if anything is bad)")
    verify.add_argument("store", type=Path, help="an existing cohort store")
    verify.set_defaults(func=_cmd_verify)

    recompress = sub.add_parser("recompress", help="rewrite a cohort store's images with "
                                                   "another codec, in place")
    recompress.add_argument("store", type=Path, help="an existing cohort store")
    _codec_arguments(recompress)
    recompress.set_defaults(func=_cmd_recompress)

    evaluate = sub.add_parser("evaluate", help="a frozen registered encoder on a downstream "
                                               "task, 5-fold subject cross-validation")
    evaluate.add_argument("model", help="e.g. models:/hpcbrain-lsor-encoder@current")
    evaluate.add_argument("--store", required=True, type=Path, help="the cohort store")
    evaluate.add_argument("--task", required=True, choices=["smci-pmci", "adas-cog", "age"])
    evaluate.add_argument("--folds", type=int, default=5)
    evaluate.add_argument("--epochs", type=int, default=80, help="MLP epochs (best on validation)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", type=Path, default=None, help="result JSON (default: print)")
    evaluate.add_argument("--tracking-uri", default=None,
                          help="where the model is, and where the result is logged")
    evaluate.set_defaults(func=_cmd_evaluate)

    app = sub.add_parser("bids-app", help="BIDS-App: a registered model's outputs as BIDS "
                                          "derivatives (participant), gathered (group)")
    app.add_argument("bids_dir", type=Path, help="the BIDS dataset")
    app.add_argument("output_dir", type=Path, help="the derivative dataset to write")
    app.add_argument("analysis_level", choices=["participant", "group"])
    app.add_argument("--model", help="e.g. models:/hpcbrain-lsor-encoder@current (participant "
                                     "level; MLFLOW_TRACKING_URI or --tracking-uri says where)")
    app.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the model")
    app.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL",
                     help="only these participants (with or without sub-)")
    app.add_argument("--session-label", nargs="+", default=None, metavar="LABEL",
                     help="only these sessions (with or without ses-)")
    app.add_argument("--bids-filter", default=None, metavar="JSON|FILE",
                     help="which T1w images of a session to use (see hpcbrain convert)")
    app.add_argument("--batch-size", type=int, default=8)
    app.set_defaults(func=_cmd_bids_app)

    embed = sub.add_parser("embed", help="embed NIfTI scans with a registered encoder")
    embed.add_argument("model", help="e.g. models:/hpcbrain-lsor-encoder@current (set "
                                     "MLFLOW_TRACKING_URI for a non-default store)")
    embed.add_argument("scans", nargs="+", type=Path, help=".nii or .nii.gz files")
    embed.add_argument("--out", required=True, type=Path, help="latents.csv or latents.npy")
    embed.add_argument("--batch-size", type=int, default=8)
    embed.add_argument("--similarity", action="store_true",
                       help="LSOR models: add the similarity grid ρ (columns rho_ROW_COL)")
    embed.set_defaults(func=_cmd_embed)

    predict = sub.add_parser("predict-age", help="predict each scan's age with a registered "
                                                 "age model (a contrastive run's encoder + ridge)")
    predict.add_argument("model", help="e.g. models:/hpcbrain-adapn-age@current (set "
                                       "MLFLOW_TRACKING_URI for a non-default store)")
    predict.add_argument("scans", nargs="+", type=Path, help=".nii or .nii.gz files")
    predict.add_argument("--out", required=True, type=Path,
                         help="ages.csv: path, predicted_age, interval_low, interval_high, "
                              "extrapolated (+ age, brain_age_gap, brain_age_gap_corrected when "
                              "ages are known)")
    predict.add_argument("--ages", type=Path, default=None, metavar="TABLE",
                         help="chronological ages: a TSV (or .csv) with 'age' and 'path' or "
                              "'participant_id' + 'session_id' (default: a BIDS dataset's "
                              "sessions.tsv / participants.tsv)")
    predict.add_argument("--level", type=float, default=None,
                         help="prediction interval level in (0, 1) (default: the model's, 0.90)")
    predict.add_argument("--correction", choices=["beheshti", "delange"], default=None,
                         help="age-bias correction of the gap (default: the model's, beheshti)")
    predict.add_argument("--batch-size", type=int, default=8)
    predict.set_defaults(func=_cmd_predict_age)

    plan = sub.add_parser("plan", help="per-GPU memory, the largest batch that fits and the "
                                       "step time of a config, before submitting it")
    plan.add_argument("--cfg", action="append", default=[],
                      help="config file (repeatable, merged in order; bare names resolve under "
                           "configs/)")
    plan.add_argument("overrides", nargs="*", help="key=value overrides")
    where = plan.add_mutually_exclusive_group()
    where.add_argument("--gpu", choices=list(GPUS), help="the GPU (default: slurm.gpu)")
    where.add_argument("--memory-gib", type=float, help="or: the memory of one GPU, GiB")
    plan.add_argument("--nodes", type=int, default=None, help="default: slurm.nodes")
    plan.add_argument("--gpus-per-node", type=int, default=None,
                      help="default: slurm.gpus_per_node (at least 1)")
    plan.add_argument("--mfu", type=float, default=None,
                      help="the share of the GPU's peak FLOP/s a step reaches (default 0.25; "
                           "a run logs its own as throughput/mfu)")
    plan.set_defaults(func=_cmd_plan)

    for name, func, text in (("train", _cmd_train, "train in this process (local debug mode)"),
                             ("config", _cmd_config, "print the resolved config")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--cfg", action="append", default=[],
                         help="config file (repeatable, merged in order; bare names resolve "
                              "under configs/)")
        cmd.add_argument("overrides", nargs="*", help="key=value overrides")
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hpcbrain import entry

    # Errors about the user's input (or a full disk) get one clear line; anything else is a
    # bug: traceback.
    try:
        with entry.full_disk_said():
            return args.func(args)
    except entry.user_errors() as exc:
        return entry.report(exc)


if __name__ == "__main__":
    sys.exit(main())
