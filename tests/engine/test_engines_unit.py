"""Engine pieces that need no process group: the engine factory's names, the DeepSpeed config
filled from ours, gradient accumulation, the NaN stop and parameter writes (fast)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from torch import nn

from hpcbrain.engine.backends import NonFiniteLossError, SingleEngine, check_finite, resolve_engine_name
from hpcbrain.engine.deepspeed import deepspeed_config
from hpcbrain.methods.base import Method


def test_engine_names():
    assert resolve_engine_name("auto", 1) == "single"
    assert resolve_engine_name("auto", 4) == "ddp"
    assert resolve_engine_name("deepspeed", 1) == "deepspeed"
    with pytest.raises(ValueError, match="started 2 processes"):
        resolve_engine_name("single", 2)
    with pytest.raises(ValueError, match="engine.name must be auto or one of ddp, deepspeed, "
                                         "single"):
        resolve_engine_name("fsdp", 2)


def test_the_registry_is_the_list_of_engines_and_says_what_differs(tmp_path):
    """Config checks take the names from the registry; a new engine registers once and is
    accepted everywhere; what differs is asked of the class."""
    from hpcbrain.config import ConfigError
    from hpcbrain.engine import registry
    from hpcbrain.engine.single import SingleEngine

    assert registry.engine_names() == ("ddp", "deepspeed", "single")
    single, ddp, deepspeed = (registry.get_engine_class(n) for n in ("single", "ddp",
                                                                      "deepspeed"))
    assert [c.needs_process_group for c in (single, ddp, deepspeed)] == [False, True, True]
    assert [c.channels_last for c in (single, ddp, deepspeed)] == [True, True, False]
    assert [c.bf16_is_autocast for c in (single, ddp, deepspeed)] == [True, True, False]
    assert single.checkpoint_kind == ddp.checkpoint_kind != deepspeed.checkpoint_kind
    assert deepspeed.process_group_initializer() is not None
    with pytest.raises(ConfigError, match="'engine.name'"):
        tiny_config(**{"engine.name": "fsdp2"})

    @registry.register_engine("fsdp2")
    class FSDP2Engine(SingleEngine):         # what a newcomer's module would hold
        needs_process_group = True
        multi_process = True

    try:
        assert "fsdp2" in registry.engine_names() and FSDP2Engine.name == "fsdp2"
        assert tiny_config(**{"engine.name": "fsdp2"}).engine.name == "fsdp2"
        assert registry.resolve_engine_name("fsdp2", 4) == "fsdp2"
        with pytest.raises(ValueError, match="already registered"):
            registry.register_engine("fsdp2")(type("Other", (SingleEngine,), {}))
    finally:
        registry._REGISTRY.pop("fsdp2")


def test_shipped_deepspeed_jsons_are_filled_from_the_hpcbrain_config():
    cfg = tiny_config(**{"train.batch_size": 64, "engine.grad_accum_steps": 2,
                         "engine.grad_clip": 1.5})
    for name, stage in (("deepspeed_zero2.json", 2), ("deepspeed_zero3.json", 3)):
        cfg.engine.deepspeed_config = name
        ds = deepspeed_config(cfg.engine, cfg.train, world_size=4, bf16=True, fp32_buffers=("dG",))
        assert ds["train_batch_size"] == 64
        assert ds["train_micro_batch_size_per_gpu"] == 8          # 64 / (4 ranks × 2)
        assert ds["gradient_accumulation_steps"] == 2
        assert ds["gradient_clipping"] == 1.5
        assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["data_types"]["buffer_dtype"] == "bf16"
        assert ds["data_types"]["keep_in_fp32_modules"] == ["^dG$"]
        assert "optimizer" not in ds
    cfg.engine.zero_stage = 1
    ds = deepspeed_config(cfg.engine, cfg.train, world_size=1, bf16=False)
    assert ds["zero_optimization"]["stage"] == 1 and not ds["bf16"]["enabled"]
    assert "data_types" not in ds or "buffer_dtype" not in ds["data_types"]


def test_deepspeed_json_sections_we_own_are_replaced(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 3, "fp16": {"enabled": True},
                                "optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"},
                                "zero_optimization": {"stage": 3, "overlap_comm": True}}))
    cfg = tiny_config(**{"train.batch_size": 8, "engine.deepspeed_config": path})
    ds = deepspeed_config(cfg.engine, cfg.train, world_size=2, bf16=False)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 4
    assert not ds["fp16"]["enabled"] and "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    with pytest.raises(ValueError, match="divisible by the 3 ranks"):
        deepspeed_config(cfg.engine, cfg.train, world_size=3, bf16=False)


class Linear(Method):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)

    def forward(self, batch):
        loss = ((self.lin(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()
        return {"loss": loss}

    def validation_step(self, batch):
        return self.forward(batch)


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(8, 3, generator=g), "y": torch.randn(8, generator=g)}
    whole, accumulated = Linear(), Linear()
    one = SingleEngine(whole, torch.optim.SGD(whole.parameters(), lr=0.1),
                       torch.device("cpu"), bf16=False, grad_clip=0.5)
    two = SingleEngine(accumulated, torch.optim.SGD(accumulated.parameters(), lr=0.1),
                       torch.device("cpu"), bf16=False, grad_clip=0.5, grad_accum_steps=2)
    one.train_step(batch, "whole")
    before = accumulated.lin.weight.detach().clone()
    two.train_step({k: v[:4] for k, v in batch.items()}, "micro 0")
    assert torch.equal(accumulated.lin.weight, before)            # no step mid-accumulation
    two.train_step({k: v[4:] for k, v in batch.items()}, "micro 1")
    for a, b in zip(accumulated.parameters(), whole.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_non_finite_loss_names_where_and_the_losses():
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 3 \(loss=nan, "
                                                 r"recon=1\)"):
        check_finite({"loss": torch.tensor(float("nan")), "recon": torch.tensor(1.0)}, "epoch 3")
    check_finite({"loss": torch.tensor(2.0)}, "fine")


def test_write_parameter_restarts_the_optimizer_state_of_that_parameter():
    model = Linear()
    engine = SingleEngine(model, torch.optim.Adam(model.parameters(), lr=0.1),
                          torch.device("cpu"), bf16=False)
    engine.train_step({"x": torch.ones(2, 3), "y": torch.zeros(2)}, "step")
    assert model.lin.weight in engine.optimizer.state
    model.write_parameter(model.lin.weight, torch.full((1, 3), 7.0))
    assert torch.equal(model.lin.weight.detach(), torch.full((1, 3), 7.0))
    assert model.lin.weight not in engine.optimizer.state      # fresh Adam moments
    assert model.lin.bias in engine.optimizer.state
    # a copy of the method does not drag the engine along
    import copy
    import pickle

    assert copy.deepcopy(model)._parameter_writer is None
    assert pickle.loads(pickle.dumps(model))._parameter_writer is None


def test_single_engine_meets_the_engine_contract_and_sets_scaled_lrs():
    from hpcbrain.engine.base import Engine

    model = Linear()
    groups = [{"params": [model.lin.weight], "lr_scale": 1.0},
              {"params": [model.lin.bias], "lr_scale": 10.0}]
    engine = SingleEngine(model, torch.optim.Adam(groups, lr=0.1), torch.device("cpu"),
                          bf16=False)
    assert isinstance(engine, Engine)
    engine.set_lr(0.002)
    assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([0.002, 0.02])
    assert engine.lr == pytest.approx(0.002)
