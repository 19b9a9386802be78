"""Engines (single, DDP, DeepSpeed) run the same LSOR code and give the same result.

Process groups are gloo on CPU; each multi-process test spawns its ranks with
torch.multiprocessing and a free port, and the workers write what they saw into files that the
test (one process, no group) compares with its own single-process reference.

* DDP gradients after one SOM-phase step (all four losses active) with different data on each
  rank equal a single process on the concatenated batch. BatchNorm is the catch: in train mode
  each rank normalises with its own micro-batch statistics (BN stays local, see
  docs/distributed.md), so the concatenated batch is NOT what DDP computes then. Two exact
  statements hold and are both tested:
    1. BN normalising with its running statistics (BN modules in eval mode, everything else in
       train mode): every loss is a per-sample mean, so the DDP gradient (the mean over ranks of
       equal halves) equals the single process on the concatenated batch; the EMA of ΔG too.
    2. BN in train mode: the DDP gradient equals the mean of the single-process gradients of
       the per-rank halves (each normalised with its own statistics) and differs from (1).
* One process gives the same final parameters through single, DDP (world 1) and DeepSpeed
  (world 1, ZeRO-0 and ZeRO-2, fp32).
* DeepSpeed ZeRO-2 with bf16 on 2 processes trains LSOR, is killed after a checkpoint, resumes
  and ends with the parameters of the uninterrupted run; the k-means SOM initialisation reaches
  DeepSpeed's fp32 master weights; ΔG stays fp32 and identical on both ranks; the MLflow run id
  reaches every rank, rides in the checkpoint and the resumed job continues the same run.
* DDP on 2 processes: the same kill/resume equality with the one-writer torch checkpoint.
"""
from __future__ import annotations

import types

import pytest
import torch
from conftest import lsor_run_config, run_on_ranks, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WORLD = 2


# ---------------------------------------------------------------------------------------------
# helpers (module level: spawned workers import them)
# ---------------------------------------------------------------------------------------------
def short_run_config(store, run_root, name, *extra):
    """`lsor_run_config` cut to 3 epochs of 2 steps on one thread, one k-means start."""
    return lsor_run_config(store, run_root, name, "train.epochs=3", "train.max_steps_per_epoch=2",
                           "train.num_threads=1", "lsor.kmeans_n_init=1", *extra)




def method_state(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in method.state_dict().items()}


class Killed(BaseException):
    """Stands in for SIGKILL after a checkpoint: escapes every `except Exception`."""


def instrument_trainer(record: dict, kill_at_epoch: int | None) -> None:
    """Record each run's final method state and run id; optionally die after a checkpoint."""
    import hpcbrain.job
    from hpcbrain.engine.trainer import Trainer

    hpcbrain.job.finish_on_rank0 = lambda *args, **kwargs: None   # figures/registry: not here
    if not hasattr(Trainer, "_real_fit"):
        Trainer._real_fit, Trainer._real_save = Trainer.fit, Trainer.save_checkpoint

    def fit(self):
        progress = Trainer._real_fit(self)
        record["final"] = method_state(self.method)
        record["run_id"] = self.run_id
        record["dtypes"] = {k: v.dtype for k, v in self.method.state_dict().items()}
        return progress

    def save_checkpoint(self):
        path = Trainer._real_save(self)
        if record.get("kill_at_epoch") is not None and self.progress.epoch == record["kill_at_epoch"]:
            raise Killed()
        return path

    record["kill_at_epoch"] = kill_at_epoch
    Trainer.fit, Trainer.save_checkpoint = fit, save_checkpoint


def record_som_init(record: dict) -> None:
    """Keep the G that the k-means initialisation assigned."""
    from hpcbrain.methods.lsor import LSOR

    if not hasattr(LSOR, "_real_assign_som"):
        LSOR._real_assign_som = LSOR._assign_som

    def assign(self, G, dG, centre=None):
        record["G_init"] = G.detach().to("cpu", torch.float32).clone()
        record["G_random"] = self.G.detach().to("cpu", torch.float32).clone()
        LSOR._real_assign_som(self, G, dG, centre)

    LSOR._assign_som = assign


def assert_states_close(got, expected, atol, rtol=0.0, what=""):
    assert got.keys() == expected.keys()
    for key in expected:
        a, b = got[key], expected[key]
        if a.is_floating_point():
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol,
                                       msg=lambda m, k=key: f"{what} {k}: {m}")
        else:
            assert torch.equal(a, b), f"{what} {key}"


# ---------------------------------------------------------------------------------------------
# DDP gradients after one SOM-phase step
# ---------------------------------------------------------------------------------------------
GLOBAL_PAIRS = 4     # 2 per rank


def som_cfg():
    return tiny_config(**{"data.input_size": 16, "model.widths": "[4,4,4,4]", "train.epochs": 2,
                          "train.seed": 0, "lsor.grid_rows": 2, "lsor.grid_cols": 2,
                          "lsor.warmup_epochs": 1, "train.precision": "fp32",
                          "engine.name": "ddp"})


def som_model(cfg):
    """LSOR in its SOM phase: G and ΔG set (as k-means would), τ at the phase start.

    The nodes are latents of the first two pairs of each rank's half, so the scans of a half
    fall into different nodes: with a single BMU for a whole micro-batch, the decoder's first
    BatchNorm would see zero variance on decode(g) and amplify rounding noise ~1e5-fold."""
    import copy

    from hpcbrain.methods.lsor import LSOR

    torch.manual_seed(0)
    model = LSOR.from_config(cfg)
    probe = copy.deepcopy(model.net.encoder).train()
    half = GLOBAL_PAIRS // WORLD
    with torch.no_grad():
        nodes = []
        for rank in range(WORLD):
            batch = pair_batch(rank * half, (rank + 1) * half)
            nodes.extend(probe(torch.cat([batch["x_u"], batch["x_v"]]))[:2])
    g = torch.Generator().manual_seed(1)
    G = torch.stack(nodes) + 0.01 * torch.randn(len(nodes), model.latent_dim, generator=g)
    dG = torch.randn(len(nodes), model.latent_dim, generator=g)
    model._assign_som(G, dG)
    model.set_progress(cfg.lsor.warmup_epochs, 0, 4)
    return model


def pair_batch(lo: int, hi: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    flat = {"x_u": torch.randn(GLOBAL_PAIRS, 1, 16, 16, 16, generator=g),
            "x_v": torch.randn(GLOBAL_PAIRS, 1, 16, 16, 16, generator=g),
            "dt": 0.5 + 2 * torch.rand(GLOBAL_PAIRS, generator=g)}
    flat["x_v"] = flat["x_u"] + 0.3 * flat["x_v"]     # pairs of one "subject": related scans
    return {k: v[lo:hi] for k, v in flat.items()}


def freeze_batchnorm(model) -> None:
    """After every .train(), BatchNorm normalises with running statistics (eval mode)."""
    real_train = type(model).train

    def train(self, mode=True):
        real_train(self, mode)
        for module in self.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    model.train = types.MethodType(train, model)


def one_step(engine_name: str, model, batch, frozen_bn: bool):
    """One engine step; returns (gradients, ΔG after the step's EMA update)."""
    from hpcbrain.engine.backends import build_engine

    if frozen_bn:
        freeze_batchnorm(model)
    cfg = som_cfg()
    cfg.engine.name = engine_name
    engine = build_engine(cfg.engine, cfg.train, model, torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the workers' summation order, for the references too
    try:
        engine.train_step(batch, "test")
    finally:
        torch.set_num_threads(threads)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, model.dG.detach().clone()


def _ddp_grad_worker(rank: int) -> dict:
    from hpcbrain import process_group

    process_group.setup_distributed(require_group=True)
    try:
        half = GLOBAL_PAIRS // WORLD
        batch = pair_batch(rank * half, (rank + 1) * half)
        result = {}
        for frozen in (True, False):
            grads, dG = one_step("ddp", som_model(som_cfg()), batch, frozen)
            result[frozen] = {"grads": grads, "dG": dG}
        return result
    finally:
        process_group.teardown()


@pytest.fixture(scope="module")
def ddp_step(tmp_path_factory):
    return run_on_ranks(_ddp_grad_worker, tmp_path_factory.mktemp("ddp_step"), world=WORLD)


def test_ddp_gradients_equal_single_process_on_concatenated_batch(ddp_step):
    """BN with running statistics: DDP over two different halves == one process on both."""
    grads, dG = one_step("single", som_model(som_cfg()), pair_batch(0, GLOBAL_PAIRS), True)
    # every loss reached the parameters: encoder/decoder (recon, commit, dir) and G (commit, som)
    assert grads["G"].abs().sum() > 0
    assert any(k.startswith("net.encoder") and v.abs().sum() > 0 for k, v in grads.items())
    for rank in range(WORLD):
        got = ddp_step[rank][True]
        assert got["grads"].keys() == grads.keys()
        for name, expected in grads.items():
            torch.testing.assert_close(got["grads"][name], expected, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
        # the all-reduced EMA equals the single process's on the global batch, on every rank
        torch.testing.assert_close(got["dG"], dG, rtol=1e-5, atol=1e-6)


def test_ddp_gradients_with_local_batchnorm_equal_mean_of_per_rank_halves(ddp_step):
    """BN in train mode normalises per rank: DDP == mean over ranks of one process per half."""
    half = GLOBAL_PAIRS // WORLD
    per_half = [one_step("single", som_model(som_cfg()),
                         pair_batch(r * half, (r + 1) * half), False)[0] for r in range(WORLD)]
    concatenated, _ = one_step("single", som_model(som_cfg()), pair_batch(0, GLOBAL_PAIRS),
                               False)
    for rank in range(WORLD):
        got = ddp_step[rank][False]["grads"]
        for name in per_half[0]:
            mean = sum(g[name] for g in per_half) / WORLD
            torch.testing.assert_close(got[name], mean, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
    # ... and that is genuinely not the concatenated batch's gradient (BN statistics differ)
    name = next(k for k in concatenated if k.startswith("net.encoder"))
    assert not torch.allclose(ddp_step[0][False]["grads"][name], concatenated[name],
                              rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One process, every engine
# ---------------------------------------------------------------------------------------------
# name: (warm-up epochs, overrides). ZeRO-1/2/3 and the bf16 optimizer step flattened parameter
# groups: a parameter without a gradient (LSOR's G in the warm-up) is stepped with a zero
# gradient and the group's Adam step count, where torch Adam skips it; after the k-means init
# resets G's moments only the bias correction still differs. So ZeRO-2 is compared on a run
# without warm-up, everything else on a run with one (docs/distributed.md).
ENGINE_RUNS = {
    "single": (1, ["engine.name=single"]),
    "ddp": (1, ["engine.name=ddp"]),
    "deepspeed-zero0": (1, ["engine.name=deepspeed", "engine.zero_stage=0"]),
    "single-no-warmup": (0, ["engine.name=single"]),
    "deepspeed-zero2-no-warmup": (0, ["engine.name=deepspeed", "engine.zero_stage=2"]),
}


def _one_process_worker(_, store: str, root: str) -> dict:
    from hpcbrain.job import run_training

    results = {}
    for name, (warmup, overrides) in ENGINE_RUNS.items():
        record: dict = {}
        instrument_trainer(record, kill_at_epoch=None)
        # channels_last off everywhere: DeepSpeed cannot take it, and channels-last kernels
        # round differently, which is a layout difference, not an engine one.
        run_training(short_run_config(store, root, name, f"lsor.warmup_epochs={warmup}",
                                 "train.epochs=2", "train.channels_last=false", *overrides))
        results[name] = record["final"]
    return results


def test_one_process_gives_the_same_result_through_every_engine(tmp_path, age_contrast_store):
    # a fresh process, so that no process group or DeepSpeed state of other tests leaks in
    [results] = run_on_ranks(_one_process_worker, tmp_path, str(age_contrast_store),
                             str(tmp_path / "runs"), world=1)
    for name, (warmup, _) in ENGINE_RUNS.items():
        reference = results["single" if warmup else "single-no-warmup"]
        assert bool(reference["initialised"]) and reference["dG"].abs().sum() > 0
        assert_states_close(results[name], reference, atol=2e-5, rtol=1e-4, what=name)


# ---------------------------------------------------------------------------------------------
# Two processes: train, die after a checkpoint, resume (DeepSpeed ZeRO-2 bf16, DDP fp32)
# ---------------------------------------------------------------------------------------------
def _resume_worker(rank: int, store: str, root: str, uri: str) -> dict:
    from hpcbrain import process_group
    from hpcbrain.engine.deepspeed import DeepSpeedEngine, DeepSpeedGroup
    from hpcbrain.engine.single import SingleEngine
    from hpcbrain.job import run_training

    process_group.setup_distributed(require_group=True, initializer=DeepSpeedGroup())
    loaded: list = []
    for cls in (DeepSpeedEngine, SingleEngine):
        def load_checkpoint(self, run_dir, _real=cls.load_checkpoint):
            state = _real(self, run_dir)
            loaded.append(None if state is None else
                          {"epoch": state["epoch"], "mlflow_run_id": state["mlflow_run_id"]})
            return state
        cls.load_checkpoint = load_checkpoint
    results = {}
    try:
        for engine, extra in (("deepspeed", ["engine.name=deepspeed", "engine.zero_stage=2",
                                             "train.precision=bf16", "tracking.enabled=true",
                                             f"tracking.uri={uri}", "engine.grad_clip=1.0"]),
                              ("ddp", ["engine.name=ddp"])):
            runs = {}
            for run, kill in (("straight", None), ("killed", 2), ("resumed", None)):
                record: dict = {}
                instrument_trainer(record, kill_at_epoch=kill)
                record_som_init(record)
                loaded.clear()
                name = f"{engine}-{'straight' if run == 'straight' else 'killed'}"
                try:
                    run_training(short_run_config(store, root, name, *extra))
                except Killed:
                    record["killed"] = True
                record["loaded"] = list(loaded)
                runs[run] = record
            results[engine] = runs
    finally:
        process_group.teardown()
    return results


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    from conftest import build_age_contrast_store

    tmp_path = tmp_path_factory.mktemp("resume")
    store = build_age_contrast_store(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return run_on_ranks(_resume_worker, tmp_path, str(store), str(tmp_path / "runs"), uri,
                        world=WORLD), uri


@pytest.mark.parametrize("engine", ["deepspeed", "ddp"])
def test_two_process_resume_after_kill_ends_with_the_uninterrupted_parameters(resumed, engine):
    results, _ = resumed
    for rank in range(WORLD):
        runs = results[rank][engine]
        assert runs["killed"].get("killed") and "final" not in runs["killed"]
        assert runs["resumed"]["loaded"][0]["epoch"] == 2        # resumed from its checkpoint
        assert_states_close(runs["resumed"]["final"], runs["straight"]["final"], atol=1e-6,
                            what=f"{engine} rank {rank}")
    # the SOM grid, the EMA and every parameter are identical on both ranks (BatchNorm running
    # statistics are rank 0's at every forward, then move with each rank's own last batch)
    same = [{k: v for k, v in results[r][engine]["straight"]["final"].items()
             if "running_" not in k} for r in range(WORLD)]
    assert_states_close(same[1], same[0], atol=0, what=f"{engine} ranks")


def test_deepspeed_keeps_the_kmeans_grid_and_an_fp32_ema(resumed):
    results, _ = resumed
    for rank in range(WORLD):
        run = results[rank]["deepspeed"]["straight"]
        final = run["final"]
        assert run["dtypes"]["dG"] == torch.float32          # the EMA is not rounded to bf16
        assert run["dtypes"]["G"] == torch.bfloat16          # ... while parameters are
        # 4 Adam steps after the k-means init G is still next to it, far from its random init:
        # the init reached DeepSpeed's fp32 master weights (a bare G.data write does not).
        moved = (final["G"].float() - run["G_init"]).abs().max()
        assert moved < 0.05, moved
        assert (run["G_random"] - run["G_init"]).abs().max() > 10 * moved
        assert bool(final["initialised"]) and final["dG"].abs().sum() > 0


def test_mlflow_run_id_reaches_every_rank_and_the_resumed_job_continues_the_run(resumed):
    import mlflow

    results, uri = resumed
    runs = [results[r]["deepspeed"] for r in range(WORLD)]
    killed_id = runs[0]["resumed"]["run_id"]
    assert killed_id and runs[1]["resumed"]["run_id"] == killed_id          # every rank knows it
    assert runs[0]["straight"]["run_id"] != killed_id
    for rank in range(WORLD):                   # ... and reads it back from the checkpoint
        assert runs[rank]["resumed"]["loaded"][0]["mlflow_run_id"] == killed_id
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hpcbrain")
    found = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in found) == sorted([killed_id,
                                                           runs[0]["straight"]["run_id"]])
    steps = [m.step for m in client.get_metric_history(killed_id, "train/loss")]
    assert steps == list(range(1, 7))           # 3 epochs × 2 steps: before AND after the kill
    for name in ("throughput/samples_per_s", "throughput/samples_per_s_per_rank",
                 "throughput/data_wait_share", "throughput/data_wait_share_max",
                 "throughput/step_time_s", "memory/peak_mb"):
        assert client.get_metric_history(killed_id, name), name
    assert client.get_run(killed_id).info.status == "FINISHED"
