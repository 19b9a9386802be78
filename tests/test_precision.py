"""`train.precision=auto`: which CPUs get bf16 (a measured, cached rule), and bf16 training
that follows fp32's loss curve."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LSOR, tiny_config

from hpcbrain.engine import precision
from hpcbrain.engine.backends import SingleEngine, build_optimizer
from hpcbrain.methods import build_method

ZEN4 = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
SKYLAKE = "model name\t: Intel Xeon Gold 6148\nflags\t\t: fpu avx2 avx512f avx512bw\n"
SAPPHIRE = "model name\t: Intel Xeon Platinum 8480+\nflags\t\t: avx512_bf16 amx_bf16 amx_tile\n"


def test_native_bf16_flags_are_read_from_cpuinfo():
    assert precision.cpu_bf16_flags(ZEN4) == ["avx512_bf16"]
    assert precision.cpu_bf16_flags(SKYLAKE) == []
    assert precision.cpu_bf16_flags(SAPPHIRE) == ["amx_bf16", "avx512_bf16"]


def test_the_verdict_is_measured_once_per_cpu_and_kept(tmp_path):
    cache = tmp_path / "precision.json"
    calls = []

    def measure(speedup):
        def run():
            calls.append(speedup)
            return speedup
        return run

    def never():
        raise AssertionError("a CPU without native bf16 must not be measured")

    assert precision.cpu_bf16_pays(never, SKYLAKE, cache) is False     # emulated bf16: no
    assert precision.cpu_bf16_pays(measure(1.37), ZEN4, cache) is True
    assert precision.cpu_bf16_pays(measure(0.5), ZEN4, cache) is True  # kept, not re-measured
    assert calls == [1.37]
    # another model, faster but not by MIN_GAIN: fp32
    assert precision.cpu_bf16_pays(measure(1.05), SAPPHIRE, cache) is False
    kept = json.loads(cache.read_text())
    assert [k.split(" | ")[0] for k in kept] == ["AMD EPYC 9R14", "Intel Xeon Platinum 8480+"]
    assert [v["bf16_speedup"] for v in kept.values()] == [1.37, 1.05]


def test_explicit_precisions_and_a_bad_name():
    cpu = torch.device("cpu")
    assert precision.use_bf16("bf16", cpu) and not precision.use_bf16("fp32", cpu)
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        precision.use_bf16("fp16", cpu)


def smooth_pairs(steps: int, batch: int = 4, size: int = 16):
    """Blobs whose radius grows from u to v: something an autoencoder can learn in a few steps."""
    g = torch.Generator().manual_seed(0)
    axis = torch.linspace(-1, 1, size)
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    out = []
    for _ in range(steps):
        radius = 0.3 + 0.4 * torch.rand(batch, generator=g)
        blob = lambda r: torch.exp(-r2 / r.view(-1, 1, 1, 1) ** 2).unsqueeze(1)  # noqa: E731
        out.append({"x_u": blob(radius), "x_v": blob(radius + 0.1),
                    "dt": torch.ones(batch), "index_u": torch.arange(batch),
                    "index_v": torch.arange(batch) + batch})
    return out


def loss_curve(bf16: bool, batches) -> list[float]:
    torch.manual_seed(0)
    cfg = tiny_config("lsor.yaml", **TINY_LSOR, **{"train.lr": 1e-3})
    method = build_method(cfg)
    engine = SingleEngine(method, build_optimizer(cfg, method), torch.device("cpu"), bf16,
                          None, 1)
    return [float(engine.train_step(b, "test")["loss"]) for b in batches]


def test_bf16_follows_the_fp32_loss_curve():
    batches = smooth_pairs(12)
    fp32, bf16 = loss_curve(False, batches), loss_curve(True, batches)
    assert fp32[-1] < 0.7 * fp32[0], fp32                     # the run learns something
    relative = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(relative) < 0.05, (fp32, bf16)
