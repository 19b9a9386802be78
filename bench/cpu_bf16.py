"""Does bf16 pay on this CPU, and does LSOR survive it? What `train.precision=auto` was decided on.

    .venv/bin/python bench/cpu_bf16.py [--store STORE] [--trials 3] [--epochs 8] [--threads 2]

1. The CPU's native bf16 instruction sets (/proc/cpuinfo: amx_bf16, avx512_bf16).
2. Speed: a 3D conv block of the LSOR encoder's shape (Conv 16→32, BN, LeakyReLU, Conv 32→16 at
   24³, batch 4), forward and backward, fp32 and bf16 autocast interleaved, median ratio.
3. Stability: LSOR with configs/smoke.yaml in bf16 for `--epochs` epochs on a store of random
   volumes (built here unless --store), `--trials` seeds; how many end without a non-finite loss,
   and for each that does not, the first module whose output was not finite.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def native_bf16_flags() -> list[str]:
    from hpcbrain.engine.host_cache import cpuinfo

    flags: set[str] = set()
    for line in cpuinfo().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def conv_block_speedup(repeats: int = 7) -> float:
    """fp32 time / bf16-autocast time of one conv block's forward and backward."""
    generator = torch.Generator().manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv3d(16, 32, 3, padding=1), torch.nn.BatchNorm3d(32),
                                torch.nn.LeakyReLU(0.2), torch.nn.Conv3d(32, 16, 3, padding=1))
    x = torch.randn(4, 16, 24, 24, 24, generator=generator)

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = block(x)
        out.float().square().mean().backward()
        return time.perf_counter() - started

    for _ in range(2):                                # first calls pick and pack kernels
        step(False), step(True)
    fp32, bf16 = [], []
    for _ in range(repeats):                          # interleaved: load changes hit both
        fp32.append(step(False))
        bf16.append(step(True))
    return statistics.median(fp32) / statistics.median(bf16)


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


def surviving_runs(store: Path, root: Path, trials: int, epochs: int) -> int:
    from hpcbrain.config import load_config
    from hpcbrain.engine.backends import NonFiniteLossError
    from hpcbrain.job import run_training

    ok = 0
    for seed in range(trials):
        cfg = load_config(["lsor.yaml", "smoke.yaml"], [
            f"data.store={store}", f"run.root={root / str(seed)}",
            "run.name=bf16", "tracking.enabled=false", "train.precision=bf16",
            f"train.epochs={epochs}", "train.max_steps_per_epoch=null", f"train.seed={seed}"])
        notes, handle = first_non_finite_output()
        try:
            run_training(cfg)
            ok += 1
        except NonFiniteLossError as exc:
            print(f"  seed {seed}: {str(exc).split(';')[0]}; first non-finite: "
                  f"{notes[0] if notes else '?'}", file=sys.stderr)
        finally:
            handle.remove()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"native bf16: {native_bf16_flags() or 'none'}")
    print(f"conv block bf16 speedup: {[round(conv_block_speedup(), 2) for _ in range(3)]}")
    with tempfile.TemporaryDirectory(prefix="cpu_bf16_") as tmp:
        store = args.store
        if store is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import build_cohort_store

            store = build_cohort_store(tmp, subjects=16, visits=3, size=32, scans_per_shard=8)
        ok = surviving_runs(Path(store), Path(tmp) / "runs", args.trials, args.epochs)
        print(f"LSOR smoke in bf16: {ok} of {args.trials} runs of {args.epochs} epochs without "
              f"a non-finite loss")
    return 0


if __name__ == "__main__":
    sys.exit(main())
