"""hpcbrain.dist: launch environments, rank-aware logging, and all_gather_with_grad.

The gather is checked the way lightly-ai/lightly#1528 says it must be: different data AND a
different loss on each rank, against autograd on the concatenation in one process. A GatherLayer
whose backward returns only this rank's slice of its own gradient (no all_reduce) fails the
same comparison, which shows the test can tell them apart.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as torch_dist
from conftest import run_on_ranks

from hpcbrain import dist, process_group
from hpcbrain.process_group import DistributedSetupError, detect_launch_env

WORLD = 2


# ---------------------------------------------------------------------------------------------
# launch environments (no process group needed)
# ---------------------------------------------------------------------------------------------
def test_no_launcher_means_one_process():
    env = detect_launch_env({"PATH": "/usr/bin", "MASTER_ADDR": "somewhere"})
    assert (env.source, env.rank, env.world_size) == ("none", 0, 1)


def test_torchrun_environment():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                             "MASTER_ADDR": "node7", "MASTER_PORT": "29500"})
    assert env == process_group.LaunchEnv("torchrun", 3, 4, 1, "node7", 29500)


def test_half_set_torchrun_environment_names_what_is_missing():
    with pytest.raises(DistributedSetupError) as err:
        detect_launch_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"})
    message = str(err.value)
    assert "LOCAL_RANK" in message and "MASTER_PORT" in message
    assert "RANK, WORLD_SIZE, MASTER_ADDR set" in message


def test_slurm_environment_derives_master_from_nodelist_and_port_from_job_id(monkeypatch):
    monkeypatch.setattr(process_group.shutil, "which", lambda name: None)   # no scontrol here
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[007-008,010],login1", "SLURM_JOB_ID": "123456"}
    env = detect_launch_env(slurm)
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("slurm", 5, 8, 1)
    assert env.master_addr == "gpu007"
    assert env.master_port == process_group.master_port_for_job("123456")
    assert 20_000 <= env.master_port < 60_000
    # every task of the job derives the same port; another job another one
    assert detect_launch_env(dict(slurm, SLURM_PROCID="0")).master_port == env.master_port
    assert process_group.master_port_for_job("123457") != env.master_port
    # srun's per-step task count wins over the job's
    assert detect_launch_env(dict(slurm, SLURM_STEP_NUM_TASKS="6")).world_size == 6


def test_half_set_slurm_environment_names_what_is_missing():
    with pytest.raises(DistributedSetupError) as err:
        detect_launch_env({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"})
    message = str(err.value)
    assert "SLURM_NTASKS" in message and "SLURM_LOCALID" in message
    assert "SLURM_JOB_NODELIST" in message and "srun" in message


def test_rank_outside_world_is_an_error():
    with pytest.raises(DistributedSetupError, match="rank 2 outside a world of 2"):
        detect_launch_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                           "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_expand_nodelist():
    assert process_group.expand_nodelist("node1") == ["node1"]
    assert process_group.expand_nodelist("n[1-3]") == ["n1", "n2", "n3"]
    assert process_group.expand_nodelist("gpu[08-10,12],cpu3") == ["gpu08", "gpu09", "gpu10", "gpu12",
                                                         "cpu3"]


def test_without_a_group_everything_is_one_process():
    state = process_group.setup_distributed()
    assert not state.created and state.world_size == 1 and not dist.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x
    assert dist.broadcast_object("run-id") == "run-id"
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    process_group.teardown()   # nothing to end


def test_log_lines_carry_the_rank():
    level = logging.getLogger().level
    process_group.configure_logging()
    try:
        handler = next(h for h in logging.getLogger().handlers if isinstance(h, process_group._RankHandler))
        record = logging.LogRecord("hpcbrain.x", logging.INFO, __file__, 1, "hello", None, None)
        assert handler.filter(record)
        assert "[rank 0/1] INFO hpcbrain.x: hello" in handler.format(record)
        assert logging.getLogger().level == logging.INFO     # rank 0 logs INFO
    finally:
        for h in [h for h in logging.getLogger().handlers if isinstance(h, process_group._RankHandler)]:
            logging.getLogger().removeHandler(h)
        logging.getLogger().setLevel(level)


# ---------------------------------------------------------------------------------------------
# 2 gloo processes
# ---------------------------------------------------------------------------------------------
SIZES = {"equal": (3, 3), "unequal": (2, 4)}   # rows per rank
DIM = 5


def rank_data(case: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(n, DIM, generator=g) for n in SIZES[case]]


def rank_loss(rank: int, gathered: torch.Tensor) -> torch.Tensor:
    """A different loss on each rank, each using every rank's rows (like a contrastive loss)."""
    weights = torch.linspace(-1.0, 2.0, gathered.numel()).reshape(gathered.shape)
    if rank == 0:
        return (weights * gathered ** 2).sum()
    sim = gathered @ gathered.T
    return torch.logsumexp(sim, dim=1).mean() + (gathered.sin() * weights).sum()


class LocalSliceGather(torch.autograd.Function):
    """The wrong GatherLayer backward (lightly-ai/lightly#1528): own loss's slice only."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = torch_dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _gather_worker(rank: int) -> dict:
    state = process_group.setup_distributed(timeout_minutes=2)
    result: dict = {"state": (state.source, state.rank, state.world_size, state.created)}
    try:
        for case in SIZES:
            x = rank_data(case)[rank].clone().requires_grad_(True)
            gathered = dist.all_gather_with_grad(x)
            rank_loss(rank, gathered).backward()
            result[case] = {"gathered": gathered.detach(), "grad": x.grad.clone()}
        x = rank_data("equal")[rank].clone().requires_grad_(True)
        rank_loss(rank, LocalSliceGather.apply(x)).backward()
        result["wrong_variant_grad"] = x.grad.clone()
        try:
            dist.all_gather_with_grad(torch.zeros(2, DIM + rank))
        except ValueError as exc:
            result["mismatch_error"] = str(exc)
        result["broadcast"] = dist.broadcast_object(f"run-of-rank-{rank}")
        result["gathered_objects"] = dist.all_gather_object({"rank": rank})
        result["again"] = process_group.setup_distributed().created       # idempotent, adopts
    finally:
        process_group.teardown()
    result["env_restored"] = "RANK" in os.environ and not dist.is_initialized()
    return result


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    return run_on_ranks(_gather_worker, tmp_path_factory.mktemp("gather"), world=WORLD)


def reference_grads(case: str) -> list[torch.Tensor]:
    """One process: autograd of Σ_r loss_r on the concatenated rows, cut back into ranks."""
    parts = rank_data(case)
    full = torch.cat(parts).requires_grad_(True)
    sum(rank_loss(r, full) for r in range(WORLD)).backward()
    return list(full.grad.split([p.shape[0] for p in parts]))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("case", sorted(SIZES))
def test_all_gather_with_grad_equals_autograd_on_the_concatenation(gathered, case):
    parts = rank_data(case)
    expected = reference_grads(case)
    for rank in range(WORLD):
        torch.testing.assert_close(gathered[rank][case]["gathered"], torch.cat(parts))
        torch.testing.assert_close(gathered[rank][case]["grad"], expected[rank], rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_local_slice_backward_is_wrong_and_the_test_sees_it(gathered):
    expected = reference_grads("equal")
    assert not torch.allclose(gathered[0]["wrong_variant_grad"], expected[0], atol=1e-3)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_setup_from_torchrun_env_collectives_and_errors(gathered):
    for rank in range(WORLD):
        result = gathered[rank]
        assert result["state"] == ("torchrun", rank, WORLD, True)
        assert result["again"] is False
        assert result["env_restored"]
        assert "same shape apart from the first dimension" in result["mismatch_error"]
        assert result["broadcast"] == "run-of-rank-0"
        assert result["gathered_objects"] == [{"rank": 0}, {"rank": 1}]
