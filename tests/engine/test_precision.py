"""`train.precision`: what `auto` means on a CPU (bf16 only with native bf16 and a measured
speed-up, never under DeepSpeed; engine/precision.py), and bf16 training that follows fp32's
loss curve on a short run. The first-batch kernel probe: test_bf16_check.py."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_LSOR, tiny_config

from hpcbrain.engine import precision
from hpcbrain.engine.backends import SingleEngine, build_optimizer
from hpcbrain.methods import build_method


def test_explicit_precisions_and_a_bad_name():
    cpu = torch.device("cpu")
    assert precision.use_bf16("bf16", cpu) and not precision.use_bf16("fp32", cpu)
    assert precision.use_bf16("bf16", cpu, autocast=False)
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        precision.use_bf16("fp16", cpu)


def test_the_cpu_rule_needs_native_bf16_and_a_speedup():
    zen4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 sha_ni\n"
    avx2 = "processor\t: 0\nflags\t\t: fpu sse avx2 sha_ni\n"
    assert precision.native_bf16_flags(zen4) == ["avx512_bf16"]
    assert precision.native_bf16_flags(avx2) == []
    assert precision.native_bf16_flags("flags : amx_bf16 avx512_bf16") == ["amx_bf16",
                                                                           "avx512_bf16"]
    assert precision.cpu_bf16_pays(["avx512_bf16"], 1.5)
    assert not precision.cpu_bf16_pays(["avx512_bf16"], 1.1)      # a wash: keep fp32
    assert not precision.cpu_bf16_pays([], 5.0)                     # not measured without flags
    assert not precision.cpu_bf16_pays(["amx_bf16"], None)


def test_the_per_host_measurements_leave_the_runs_random_stream_alone():
    """Both run inside a training run the first time a host is seen: a seeded run must not
    depend on whether the host's cache was already there."""
    from hpcbrain.engine.flops import measure_cpu_peak_tflops

    torch.manual_seed(0)
    before = torch.get_rng_state()
    precision.conv_block_speedup(repeats=1)
    measure_cpu_peak_tflops(False, size=64, repeats=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_auto_on_this_cpu_follows_the_rule_and_measures_once(monkeypatch):
    from hpcbrain.engine.host_cache import cache_path

    cpu = torch.device("cpu")
    assert not precision.use_bf16("auto", cpu, autocast=False)      # bf16 weights: never
    flags = precision.native_bf16_flags()
    chosen = precision.use_bf16("auto", cpu)
    if not flags:
        assert not chosen
        return
    import json

    measured = json.loads(cache_path("cpu_bf16.json").read_text())
    [speedup] = [v for k, v in measured.items() if k.endswith(f"| {torch.get_num_threads()} threads")]
    assert chosen == precision.cpu_bf16_pays(flags, speedup)
    monkeypatch.setattr(precision, "conv_block_speedup", lambda: pytest.fail("measured twice"))
    assert precision.use_bf16("auto", cpu) == chosen


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
    engine = SingleEngine(method, build_optimizer(cfg.train, method), torch.device("cpu"), bf16,
                          None, 1)
    return [float(engine.train_step(b, "test")["loss"]) for b in batches]


def test_bf16_follows_the_fp32_loss_curve():
    batches = smooth_pairs(12)
    fp32, bf16 = loss_curve(False, batches), loss_curve(True, batches)
    assert fp32[-1] < 0.7 * fp32[0], fp32                     # the run learns something
    relative = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(relative) < 0.05, (fp32, bf16)


def test_the_latent_and_the_layers_beside_it_stay_fp32_under_bf16_autocast():
    """bf16 spaces numbers near 12 (where LSOR's latents sit) 1/16 apart, so a latent moved by
    0.01 would decode to the very same volume; the encoder's last convolution and the decoder's
    first block run at full precision, the rest in bf16."""
    from hpcbrain.models.autoencoder import LSORDecoder, LSOREncoder

    torch.manual_seed(0)
    encoder, decoder = LSOREncoder((4, 8), 16), LSORDecoder((4, 8), 16).eval()
    seen = {}
    decoder.blocks[0][0].register_forward_hook(lambda m, i, o: seen.update(first=o.dtype))
    decoder.blocks[1][0].register_forward_hook(lambda m, i, o: seen.update(second=o.dtype))
    z = torch.full((1, decoder.latent_dim), 12.0)
    nudged = z.clone()
    nudged[0, 0] += 0.01
    assert torch.equal(z.bfloat16(), nudged.bfloat16())        # what bf16 alone would see
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latent = encoder(torch.randn(2, 1, 16, 16, 16))
        apart = (decoder(z) - decoder(nudged)).abs().max()
    assert latent.dtype == torch.float32
    assert seen == {"first": torch.float32, "second": torch.bfloat16}
    assert apart > 0


def test_the_vaes_heads_stay_fp32_under_bf16_autocast():
    """VAE computes μ and log σ² itself (not through LSOREncoder.forward): both heads must be
    on the full-precision side of the latent too (bf16 VAE smoke: 2 of 3 runs survived before,
    10 of 10 after; bench/README.md)."""
    from hpcbrain.methods import build_method

    torch.manual_seed(0)
    vae = build_method(tiny_config("vae.yaml", **TINY_LSOR)).train()
    seen = {}
    vae.net.encoder.head.register_forward_hook(lambda m, i, o: seen.update(mu=o.dtype))
    vae.logvar_head.register_forward_hook(lambda m, i, o: seen.update(logvar=o.dtype))
    vae.net.encoder.blocks[0][0].register_forward_hook(lambda m, i, o: seen.update(first=o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, _ = vae.latents(torch.rand(2, 1, 16, 16, 16))
    assert seen == {"first": torch.bfloat16, "mu": torch.float32, "logvar": torch.float32}
    assert mu.dtype == torch.float32
