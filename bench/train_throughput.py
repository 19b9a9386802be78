"""Training-step throughput of a method: samples/s, counted FLOPs, achieved TFLOP/s and MFU.

    .venv/bin/python -m bench.train_throughput --method lsor --size 64 --batch 8 [--steps 10]
        [--precision fp32|bf16|auto] [--device cpu|cuda] [--threads 2] [--json OUT.json]
        [--official CHECKOUT]     # time the official LSOR step beside ours, alternating

The method is built from its config (configs/METHOD.yaml) at SIZE³ and trained through the same
engine a run uses (`hpcbrain.engine.backends.build_engine`, one process) on random volumes
already on the device, so the figure is the step alone: no loader, no logging. LSOR is timed in
its SOM phase (nodes from a k-means of the batch's latents), its costliest step: encoder, two
decoder passes, SOM losses and the EMA. AdapN (and every contrastive loss) is timed with its
two augmented views. FLOPs are counted once with torch.utils.flop_counter (what MFU in a run
uses) and compared with the device's peak (`hpcbrain.engine.flops.device_peak_tflops`: the GPU
table, or this CPU's matmul peak measured once). Samples are pairs for LSOR, scans for the
contrastive methods (each scan gives two views).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def random_batch(model, batch: int, size: int, device: torch.device, seed: int = 0) -> dict:
    """`hpcbrain.plan.synthetic_batch` (the method's kind of batch) of size³ volumes on `device`."""
    from hpcbrain.engine.single import to_device
    from hpcbrain.plan import synthetic_batch

    return to_device(synthetic_batch(model, batch, (size,) * 3, seed), device)


def build(method: str, size: int, batch: int, precision: str, device: torch.device,
          extra: tuple[str, ...] = ()):
    from hpcbrain.config import load_config
    from hpcbrain.engine.backends import build_engine
    from hpcbrain.methods import build_method

    overrides = [f"data.input_size={size}", f"train.batch_size={batch}",
                 f"train.precision={precision}", "engine.name=single"]
    if method == "lsor":   # the paper's grid (lsor.yaml's auto needs a training set)
        overrides += ["lsor.kmeans_n_init=1", "lsor.grid_rows=4", "lsor.grid_cols=8"]
    cfg = load_config([f"{method}.yaml"], overrides + list(extra))
    model = build_method(cfg).to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    from hpcbrain.job import choose_conv_weight_grad  # as a training job chooses it

    choose_conv_weight_grad(str(cfg.train.conv_weight_grad), model, device)
    return cfg, model, build_engine(cfg.engine, cfg.train, model, device)


def prepare(args):
    """(one training step of ours, its description without timings)."""
    from hpcbrain.engine.flops import count_flops, device_peak_tflops

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, engine = build(args.method, args.size, args.batch, args.precision, device,
                               tuple(args.overrides))
    batch = random_batch(model, args.batch, args.size, device)
    if args.method == "lsor":
        # time the SOM phase's step: nodes from a k-means of enough random pairs' latents
        nodes = cfg.lsor.grid_rows * cfg.lsor.grid_cols
        extra = [random_batch(model, args.batch, args.size, device, seed)
                 for seed in range(1, 1 + -(-nodes // (2 * args.batch)))]
        for k, more in enumerate(extra, start=1):      # distinct scan indices for the dedup
            more["index_u"] = more["index_u"] + 1000 * k
            more["index_v"] = more["index_v"] + 1000 * k
        model.initialise_som(lambda: iter(extra))
        model.set_progress(cfg.lsor.warmup_epochs, 0, 100)
    else:
        model.set_progress(0, 0, 100)
    if args.precision == "auto":
        # as the trainer does on its first batch: fp32 where a layer's bf16 is wrong here
        from hpcbrain.engine.bf16_check import keep_bf16_only_if_right

        settled = keep_bf16_only_if_right(engine, batch)
        if settled and not engine.bf16:
            probe = settled[0]
            print(f"auto: fp32 ({probe.worst_layer} at {list(probe.worst_shape)}: bf16 "
                  f"{probe.worst_relative_error:.3g} off)", file=sys.stderr)

    def step():
        engine.train_step(batch, "benchmark")
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    _, flops = count_flops(step)                      # also the first (warm-up) step
    info = {"method": args.method, "size": args.size, "batch": args.batch,
            "precision": "bf16" if engine.bf16 else "fp32", "device": str(device),
            "threads": torch.get_num_threads(), "gflop_per_step": flops / 1e9,
            "peak_tflops": device_peak_tflops(device, engine.bf16)}
    return step, info


def timed_steps(steps: dict[str, callable], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each function, timed in turn (A B A B ...) so that a change
    of load or clock during the run hits every contender alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def with_timing(info: dict, seconds: float) -> dict:
    tflops = info["gflop_per_step"] * 1e9 / seconds / 1e12
    peak = info["peak_tflops"]
    return {**info, "step_s": seconds, "samples_per_s": info["batch"] / seconds,
            "tflops": tflops, "mfu": tflops / peak if peak else None}


def measure(args) -> dict:
    step, info = prepare(args)
    steps = {"hpcbrain": step}
    if args.official:
        from bench.official_lsor import official_step

        if args.method != "lsor":
            raise SystemExit("--official compares the LSOR step: use --method lsor")
        device = torch.device(args.device)
        steps["official"] = official_step(args.official, args.batch, args.size, device)
        if not args.no_snapshot_variant:
            steps["official, no snapshots"] = official_step(args.official, args.batch,
                                                            args.size, device, snapshots=False)
    seconds = timed_steps(steps, args.warmup, args.steps)
    result = with_timing(info, seconds["hpcbrain"])
    if args.official:
        result["official"] = {name: {"step_s": sec, "samples_per_s": args.batch / sec,
                                     "ours_vs_it": sec / seconds["hpcbrain"]}
                              for name, sec in seconds.items() if name != "hpcbrain"}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lsor",
                        choices=["lsor", "adapn", "exponential", "simclr", "rnc", "supervised"])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--official", type=Path, default=None,
                        help="a checkout of the official LSOR code: time its step beside ours, "
                             "alternating (bench/official_lsor.py)")
    parser.add_argument("--no-snapshot-variant", action="store_true",
                        help="with --official, time only its step as main_pair.py runs it")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides, e.g. train.conv_weight_grad=standard")
    args = parser.parse_args()
    result = measure(args)
    mfu = f"{100 * result['mfu']:.1f} %" if result["mfu"] is not None else "n/a"
    print(f"| {result['method']} | {result['size']}³ | {result['batch']} | {result['precision']} "
          f"| {result['device']} ({result['threads']} threads) | {result['samples_per_s']:.2f} "
          f"| {result['gflop_per_step']:.1f} | {1000 * result['tflops']:.1f} | {mfu} |")
    for name, other in result.get("official", {}).items():
        print(f"| {name} LSOR | {result['size']}³ | {result['batch']} | fp32 | "
              f"{result['device']} ({result['threads']} threads) | {other['samples_per_s']:.2f} "
              f"| hpcbrain / it: **{other['ours_vs_it']:.2f}×** | | |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
