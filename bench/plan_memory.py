"""Is `hpcbrain plan` right? Its predicted peak of a training step against the peak measured on
this CPU (torch's own accounting), for LSOR and AdapN at three input shapes, with and without
activation checkpointing (issue 27: within 15 %).

For each case: the plan probes the method at micro-batches of 1 and 2 items (`hpcbrain.plan`)
and predicts the peak at `--batch` items (fp32, one process: what this CPU runs); then a real
step at that batch is measured the same way — model states held before the step (parameters,
buffers, Adam's moments: their tensors' bytes) plus the most torch allocated during it (the
profiler's allocator events: batch, gradients, activations, transients).

    .venv/bin/python -m bench.plan_memory [--shapes 32 64 80x96x80] [--batch 4]

Prints a markdown table (and writes bench/results/plan_memory.json); each LSOR row at
80 × 96 × 80 takes about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import ROOT, host, markdown_table

TARGET = 0.15
#: the shipped configs the rows build, with the models' own widths
METHODS = ("lsor", "adapn")


def parse_shape(text: str) -> list[int]:
    sides = [int(s) for s in text.lower().split("x")]
    return sides * 3 if len(sides) == 1 else sides


def case(method: str, shape: list[int], checkpointing: bool, batch: int) -> dict:
    from hpcbrain.config import load_config
    from hpcbrain.plan import (
        build_for_probe,
        make_plan,
        measure_step_peak,
        model_state_bytes,
        probe_step,
        synthetic_batch,
        tensor_bytes,
    )

    cfg = load_config([f"{method}.yaml"], [
        f"data.input_size=[{','.join(map(str, shape))}]", "engine.name=single",
        "train.precision=fp32", f"train.batch_size={batch}", "train.channels_last=false",
        f"train.activation_checkpointing={str(checkpointing).lower()}"])
    started = time.perf_counter()
    probe = probe_step(cfg)
    plan = make_plan(cfg, world=1, bf16=False, probe=probe)
    probe_s = time.perf_counter() - started

    method_obj, optimizer, sides = build_for_probe(cfg)
    measure_step_peak(method_obj, optimizer, lambda: synthetic_batch(method_obj, 1, sides, 1))
    static = model_state_bytes(method_obj, optimizer)
    dynamic = measure_step_peak(method_obj, optimizer,
                                lambda: synthetic_batch(method_obj, batch, sides, 9))
    measured = static + dynamic
    predicted = plan.peak + tensor_bytes(method_obj.buffers())
    return {"method": method, "shape": "×".join(map(str, shape)),
            "checkpointing": "on" if checkpointing else "off", "batch": batch,
            "predicted_mib": int(round(predicted / 2 ** 20)),
            "measured_mib": int(round(measured / 2 ** 20)),
            "error_pct": f"{100 * (predicted - measured) / measured:+.1f}",
            "probe_s": round(probe_s, 1)}


def gpu_case(method: str, shape: list[int], checkpointing: bool, batch: int) -> dict:
    """On a CUDA device: the plan (probed on this machine's CPU, bf16 as the GPU trains) against
    torch.cuda.max_memory_allocated over one training step of the single engine in bf16."""
    import torch

    from hpcbrain.config import load_config
    from hpcbrain.engine.backends import build_engine
    from hpcbrain.engine.single import to_device
    from hpcbrain.methods import build_method
    from hpcbrain.models.checkpointing import set_activation_checkpointing
    from hpcbrain.plan import make_plan, probe_step, synthetic_batch

    overrides = [f"data.input_size=[{','.join(map(str, shape))}]", "engine.name=single",
                 "train.precision=bf16", f"train.batch_size={batch}",
                 f"train.activation_checkpointing={str(checkpointing).lower()}",
                 "lsor.grid_rows=4", "lsor.grid_cols=8", "lsor.kmeans_n_init=1"]
    cfg = load_config([f"{method}.yaml"], overrides)
    plan = make_plan(cfg, world=1, bf16=True, probe=probe_step(cfg))
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_method(cfg).to(device).to(memory_format=torch.channels_last_3d)
    if checkpointing:
        set_activation_checkpointing(model)
    engine = build_engine(cfg.engine, cfg.train, model, device)
    data = to_device(synthetic_batch(model, batch, tuple(shape)), device)
    if method == "lsor":
        extra = [to_device(synthetic_batch(model, 32, tuple(shape), seed=1), device)]
        model.on_epoch_start(int(cfg.train.epochs) - 1, lambda: iter(extra))
    model.set_progress(int(cfg.train.epochs) - 1, 0, 100)
    engine.train_step(data, "warm-up")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    engine.train_step(data, "measured")
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    return {"method": method, "shape": "×".join(map(str, shape)),
            "checkpointing": "on" if checkpointing else "off", "batch": batch,
            "predicted_mib": round(plan.peak / 2 ** 20, 1),
            "measured_mib": int(round(measured / 2 ** 20)),
            "error_pct": f"{100 * (plan.peak - measured) / measured:+.1f}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["32", "64", "80x96x80"])
    parser.add_argument("--batch", type=int, default=4, help="items (pairs / scans) per step")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the bf16 plan against the GPU's measured peak (gpu_check.sh)")
    args = parser.parse_args()
    rows = []
    measure = gpu_case if args.device == "cuda" else case
    for method in args.methods:
        for shape in args.shapes:
            for checkpointing in (False, True):
                rows.append(measure(method, parse_shape(shape), checkpointing, args.batch))
                print(rows[-1], flush=True)
    worst = max(abs(float(r["error_pct"])) for r in rows)
    table = markdown_table(rows)
    print(f"\n{host()}\n\n{table}\n\nworst |error| {worst:.1f} % (target ≤ {100 * TARGET:g} %): "
          f"{'met' if worst <= 100 * TARGET else 'NOT met'}")
    out = ROOT / "bench" / "results" / f"plan_memory_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": host(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
