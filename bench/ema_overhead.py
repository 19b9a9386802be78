"""Per-step cost of LSOR's all-reduced EMA of the reference trajectories, under DDP.

    python -m bench.ema_overhead                                  # 64³, paper model, 2 ranks
    python -m bench.ema_overhead --size 32 --steps 20 --out bench/results/ema_overhead_32.json

Two gloo processes (1 thread each) train LSOR in its SOM phase (all four losses, EMA on) with
the DDP engine on synthetic pair batches. Every step starts after a barrier (not timed), so the
numbers are per step and skew does not pile up. Measured, as medians over the timed steps:

- step_s: one engine.train_step (forward, EMA update, backward with DDP's gradient all-reduce,
  Adam step);
- ema_update_s: the time inside `ema_update` during those steps — per-node sums and counts,
  ONE all_reduce of the [K, D+1] float64 tensor, the EMA — including any wait for the other
  rank to arrive there; ema_share = ema_update_s / step_s;
- allreduce_alone_s: the same all_reduce in isolation (after a barrier, repeated): the pure
  communication cost; allreduce_share = allreduce_alone_s / step_s;
- A/B: step_s with the all-reduce vs with the EMA kept local (no collective), alternating step
  by step; ab_share = (with − without) / with. Noisy on a shared machine: read it next to the
  direct measures.

Prints a table and saves JSON (default bench/results/ema_overhead.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(args):
    from hpcbrain.config import load_config
    from hpcbrain.methods.lsor import LSOR

    cfg = load_config(["lsor.yaml"], [
        f"data.input_size={args.size}", f"model.widths=[{','.join(map(str, args.widths))}]",
        f"lsor.grid_rows={args.grid[0]}", f"lsor.grid_cols={args.grid[1]}",
        "train.epochs=2", "lsor.warmup_epochs=1", "train.precision=fp32",
        f"train.batch_size={args.pairs_per_rank * WORLD}", "engine.name=ddp"])
    torch.manual_seed(0)
    method = LSOR.from_config(cfg)
    g = torch.Generator().manual_seed(1)
    nodes = args.grid[0] * args.grid[1]
    method._assign_som(torch.randn(nodes, method.latent_dim, generator=g),
                       torch.randn(nodes, method.latent_dim, generator=g))
    method.set_progress(1, 0, 100)
    return cfg, method


def batches(args, rank: int, count: int):
    g = torch.Generator().manual_seed(100 + rank)
    n, s = args.pairs_per_rank, args.size
    for _ in range(count):
        x_u = torch.randn(n, 1, s, s, s, generator=g)
        yield {"x_u": x_u, "x_v": x_u + 0.3 * torch.randn(n, 1, s, s, s, generator=g),
               "dt": 0.5 + 2 * torch.rand(n, generator=g)}


def worker(rank: int, port: int, args, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(args.threads)
    from hpcbrain import process_group
    from hpcbrain.engine.backends import build_engine
    from hpcbrain.methods import lsor

    process_group.setup_distributed(require_group=True)
    try:
        cfg, method = build(args)
        engine = build_engine(cfg.engine, cfg.train, method, torch.device("cpu"))
        in_ema: list[float] = []
        real_ema = lsor.ema_update

        def timed_ema(*a, **k):
            start = time.perf_counter()
            result = real_ema(*a, **k)
            in_ema.append(time.perf_counter() - start)
            return result

        lsor.ema_update = timed_ema
        real_ready = lsor._dist_ready
        # The two variants alternate step by step, so a machine whose load drifts (shared
        # cores) slows both alike.
        results = {label: {"step_s": [], "ema_update_s": []}
                   for label in ("with_allreduce", "local_ema")}
        total = 2 * (args.warmup_steps + args.steps)
        for i, batch in enumerate(batches(args, rank, total)):
            label = "with_allreduce" if i % 2 == 0 else "local_ema"
            lsor._dist_ready = real_ready if label == "with_allreduce" else (lambda: False)
            in_ema.clear()
            torch_dist.barrier()
            start = time.perf_counter()
            engine.train_step(batch, f"{label} step {i}")
            elapsed = time.perf_counter() - start
            if i >= 2 * args.warmup_steps:
                results[label]["step_s"].append(elapsed)
                results[label]["ema_update_s"].append(sum(in_ema))
        lsor._dist_ready = real_ready
        # the EMA's all_reduce alone: a [K, D+1] float64 tensor
        stats = torch.zeros(args.grid[0] * args.grid[1], method.latent_dim + 1,
                            dtype=torch.float64)
        alone = []
        for _ in range(args.allreduce_reps):
            torch_dist.barrier()
            start = time.perf_counter()
            torch_dist.all_reduce(stats)
            alone.append(time.perf_counter() - start)
        results["allreduce_alone_s"] = alone
        results["stats_bytes"] = stats.numel() * stats.element_size()
        results["params"] = sum(p.numel() for p in method.parameters())
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        process_group.teardown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="S of the S³ volumes")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 16])
    parser.add_argument("--grid", type=int, nargs=2, default=[4, 8])
    parser.add_argument("--pairs-per-rank", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--allreduce-reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "ema_overhead.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(free_port(), args, tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]

    med = statistics.median
    per_rank = []
    for r, res in enumerate(ranks):
        step = med(res["with_allreduce"]["step_s"])
        ema = med(res["with_allreduce"]["ema_update_s"])
        local_step = med(res["local_ema"]["step_s"])
        local_ema = med(res["local_ema"]["ema_update_s"])
        alone = med(res["allreduce_alone_s"])
        per_rank.append({
            "rank": r, "step_s": step, "ema_update_s": ema, "ema_share": ema / step,
            "ema_update_local_s": local_ema, "allreduce_alone_s": alone,
            "allreduce_share": alone / step, "step_local_ema_s": local_step,
            "ab_share": (step - local_step) / step})
    summary = {
        "setup": {"size": args.size, "widths": args.widths, "grid": args.grid,
                  "latent_dim": args.widths[-1] * (args.size // 2 ** len(args.widths)) ** 3,
                  "pairs_per_rank": args.pairs_per_rank, "world": WORLD, "backend": "gloo",
                  "engine": "ddp", "threads_per_rank": args.threads,
                  "timed_steps_per_variant": args.steps, "stats_bytes": ranks[0]["stats_bytes"],
                  "params": ranks[0]["params"], "torch": torch.__version__,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                  "command": "python -m bench.ema_overhead " + " ".join(argv or sys.argv[1:])},
        "per_rank": per_rank,
        "ema_share_max": max(p["ema_share"] for p in per_rank),
        "allreduce_share_max": max(p["allreduce_share"] for p in per_rank),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")

    s = summary["setup"]
    print(f"LSOR SOM phase, DDP, {WORLD} gloo ranks × {args.threads} thread, {args.size}³, "
          f"widths {args.widths}, grid {args.grid[0]}×{args.grid[1]}, D={s['latent_dim']}, "
          f"{args.pairs_per_rank} pairs/rank, EMA all-reduce of {s['stats_bytes'] / 1024:.0f} KiB")
    print("| rank | step | ema_update (in step) | share | all_reduce alone | share | "
          "step, EMA local | A/B share |")
    print("|---|---|---|---|---|---|---|---|")
    for p in per_rank:
        print(f"| {p['rank']} | {p['step_s'] * 1e3:.1f} ms | {p['ema_update_s'] * 1e3:.2f} ms | "
              f"{p['ema_share']:.2%} | {p['allreduce_alone_s'] * 1e3:.3f} ms | "
              f"{p['allreduce_share']:.3%} | {p['step_local_ema_s'] * 1e3:.1f} ms | "
              f"{p['ab_share']:+.2%} |")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
