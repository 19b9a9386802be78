"""Does bf16 pay on this CPU, is it right, and do the methods survive it? What
`train.precision=auto` rests on.

    .venv/bin/python -m bench.cpu_bf16 [--methods lsor|all|NAME...] [--precision auto|bf16]
                                       [--trials 3] [--epochs 8] [--threads 2] [--store STORE]

1. The CPU's native bf16 instruction sets (/proc/cpuinfo: amx_bf16, avx512_bf16).
2. Speed: `precision.conv_block_speedup` (a 3D conv block of the LSOR encoder's shape, forward
   and backward, fp32 and bf16 autocast interleaved, median ratio), three times; and what
   `train.precision=auto` picks here before the first batch (engine/precision.py: native bf16
   and ≥ MIN_CPU_SPEEDUP).
3. Right: `bf16_check.probe_layer` on a 3x3x3 Conv3d across channels and input widths — the
   relative error of bf16 against fp32 (output, input and weight gradients); ≥ 0.05 is wrong.
4. Stability: each method's config with configs/smoke.yaml in `--precision` (auto: what a user
   gets, the kernel probe of the first batch included; bf16: forced) for `--epochs` epochs on a
   store of random volumes (built here unless --store), `--trials` seeds; how many end without a
   non-finite loss and in which precision they trained, and for each that does not, the first
   module whose output was not finite. `all` is every config under configs/ that names a method.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT


def first_non_finite_output():
    """A global forward hook noting the first module whose output is not finite (with its input's
    dtype): where a bf16 run goes wrong. Returns (notes, handle)."""
    notes: list[str] = []

    def hook(module, inputs, output):
        if notes or not isinstance(output, torch.Tensor) or torch.isfinite(output).all():
            return
        source = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        bad_params = [p for p in module.parameters(recurse=False) if not torch.isfinite(p).all()]
        notes.append(f"{type(module).__name__} output {tuple(output.shape)} from a "
                     f"{'finite' if source is None or torch.isfinite(source).all() else 'non-finite'} "
                     f"{getattr(source, 'dtype', '?')} input"
                     f"{'; its weights already non-finite' if bad_params else ''}")

    return notes, torch.nn.modules.module.register_module_forward_hook(hook)


def method_configs() -> list[str]:
    """Every configs/*.yaml that names a method (one per method: the variants merge into these)."""
    return sorted(path.stem for path in (ROOT / "configs").glob("*.yaml")
                  if any(line.startswith("method:") for line in path.read_text().splitlines()))


class PrecisionChosen(logging.Handler):
    """Notes the trainer's `train.precision=auto: ...` verdicts."""

    def __init__(self):
        super().__init__()
        self.verdicts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("train.precision=auto:"):
            self.verdicts.append(message.split(":", 1)[1].split()[0].strip(","))


def conv3d_probe_table(channels=(8, 16, 64, 256), widths=(1, 2, 3, 4)) -> list[str]:
    from hpcbrain.engine.bf16_check import probe_layer

    rows = ["channels | " + " | ".join(f"width {w}" for w in widths)]
    for c in channels:
        conv = torch.nn.Conv3d(c, c, 3, padding=1)
        rows.append(f"{c:8d} | " + " | ".join(f"{probe_layer(conv, (8, c, w, w, w)):.3g}"
                                              for w in widths))
    return rows


def surviving_runs(method: str, store: Path, root: Path, trials: int, epochs: int,
                   precision: str = "bf16") -> tuple[int, list[str]]:
    from hpcbrain.config import load_config
    from hpcbrain.engine.backends import NonFiniteLossError
    from hpcbrain.job import run_training

    ok, trained_in = 0, []
    for seed in range(trials):
        cfg = load_config([f"{method}.yaml", "smoke.yaml"], [
            f"data.store={store}", f"run.root={root / method / str(seed)}",
            f"run.name={precision}", "tracking.enabled=false", f"train.precision={precision}",
            f"train.epochs={epochs}", "train.max_steps_per_epoch=null", f"train.seed={seed}"])
        notes, handle = first_non_finite_output()
        chosen = PrecisionChosen()
        logging.getLogger("hpcbrain.engine.trainer").addHandler(chosen)
        try:
            run_training(cfg)
            ok += 1
        except NonFiniteLossError as exc:
            print(f"  {method} seed {seed}: {str(exc).split(';')[0]}; first non-finite: "
                  f"{notes[0] if notes else '?'}", file=sys.stderr)
        finally:
            handle.remove()
            logging.getLogger("hpcbrain.engine.trainer").removeHandler(chosen)
        # no verdict: bf16 forced, or `auto` chose fp32 before the first batch
        trained_in.append(chosen.verdicts[0] if chosen.verdicts else
                          "bf16" if precision == "bf16" else "fp32")
    return ok, trained_in


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lsor"],
                        help="method configs to train in bf16, or 'all'")
    parser.add_argument("--precision", choices=("auto", "bf16"), default="auto")
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from hpcbrain.engine import precision

    torch.set_num_threads(args.threads)
    methods = method_configs() if args.methods == ["all"] else args.methods
    flags = precision.native_bf16_flags()
    print(f"native bf16: {flags or 'none'}")
    speedups = [round(precision.conv_block_speedup(), 2) for _ in range(3)] if flags else []
    print(f"conv block bf16 speedup at {args.threads} threads: {speedups or 'not measured'}")
    print(f"train.precision=auto here: "
          f"{'bf16' if precision.cpu_bf16_pays(flags, min(speedups, default=None)) else 'fp32'} "
          f"(native bf16 and a speedup of at least {precision.MIN_CPU_SPEEDUP}); then the "
          f"kernel probe of each method's first batch")
    print("bf16 Conv3d 3x3x3 against fp32, worst relative error (output, input and weight "
          "gradients; batch 4):")
    for row in conv3d_probe_table():
        print("  " + row)
    with tempfile.TemporaryDirectory(prefix="cpu_bf16_") as tmp:
        store = args.store
        if store is None:
            # a synthetic cohort at 32³ (until December 2026 a store of random volumes from
            # the tests' fixtures: benchmarks do not import tests/)
            from bench.common import make_cohort

            store = make_cohort(Path(tmp), 7, 16, [])
        for method in methods:
            started = time.perf_counter()
            ok, trained_in = surviving_runs(method, Path(store), Path(tmp) / "runs", args.trials,
                                            args.epochs, args.precision)
            print(f"{method} smoke, precision={args.precision} (trained in "
                  f"{', '.join(sorted(set(trained_in)))}): {ok} of {args.trials} runs of "
                  f"{args.epochs} epochs without a non-finite loss "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
