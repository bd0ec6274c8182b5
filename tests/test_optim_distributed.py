"""Sharded optimizers over 2 gloo processes == the same recipe in 1 process; init_world's env rules.

The 1-process run accumulates 4 micro-batches per step; each of the 2 ranks accumulates its 2 of the
same 4 (the optimizers average over ranks). Gradients have small integer entries so both runs see
bitwise equal averaged gradients, and the bucket sizes need padding on 2 ranks (7 matrices of one
shape, 1 smear gate, 3 attention gates).
"""
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from optim_helpers import FakeModel, integer_sources

from speedrun import distributed
from speedrun.config import OptimConfig, ScheduleConfig
from speedrun.distributed import World, destroy_world, init_world
from speedrun.optim.build import build_optimizers
from speedrun.optim.schedules import lr_multiplier
from speedrun.presets import record89_optim

STEPS, SOURCES = 4, 4
SCHED = ScheduleConfig(num_scheduled_steps=4, num_extension_steps=0)


def _bigram_rows(step: int, source: int) -> list[int]:
    """The rows of the 16-row bigram table a source touches (as a batch touches few hash rows); none
    for two sources of step 0, so at step 1 rank 0's gradient holds only step 1's rows."""
    if step == 0 and source < 2:
        return []
    return sorted({(3 * step + source) % 16, (5 * step + 2 * source + 7) % 16})


def _train(world: World, r89: bool = False, sparse: bool = False) -> tuple[dict, list[int]]:
    """Run STEPS optimizer steps; returns final params and how many Adam grads hooks reduced.
    r89: every record-89 NorMuon switch on (matrix axis, Q/K head pairs, bf16 weights + mantissa,
    c_proj lr), on bf16 block matrices; record 89's labels and Adam groups too, some of them
    replicated (dim 0 not divisible). sparse: the bigram table's gradient is row-sparse
    (_bigram_rows) and reduced as its nonzero rows (optim.adam.sparse_bigram_comms on)."""
    torch.manual_seed(0)
    model = FakeModel(matrix_dtype=torch.bfloat16 if r89 else torch.float32, r89=r89)
    cfg = record89_optim() if r89 else OptimConfig()
    cfg.muon.kernel = "torch"
    if r89:
        m = cfg.muon
        m.axis, m.qk_head_pairs, m.bf16_weights, m.c_proj_lr_mul, m.lr, m.beta2 = "matrix", True, True, 4.0, 0.023, 0.9
    cfg.adam.weight_decay, cfg.adam.cautious_weight_decay = 0.1, True   # exercise every path
    cfg.adam.sparse_bigram_comms = "on" if sparse else "off"
    opt = build_optimizers(model, cfg, world)
    assert len(opt.adam.sparse) == (1 if sparse and world.world_size > 1 else 0)
    accum = SOURCES // world.world_size
    hooked = []
    for step in range(STEPS):
        sources = integer_sources(model, step, SOURCES)
        if sparse:
            for i, src in enumerate(sources):
                keep = torch.zeros(16, 1)
                keep[_bigram_rows(step, i)] = 1
                src["bigram"] = src["bigram"] * keep
        sources = sources[world.rank * accum:(world.rank + 1) * accum]
        opt.begin_step(step)
        for i, src in enumerate(sources):
            if i == accum - 1:
                opt.before_last_backward()
            loss = sum((p.float() * src[n]).sum() for n, p in model.named_parameters()) / accum
            loss.backward()
        hooked.append(len(opt.adam._pending))
        opt.step(step, lr_multiplier(step, SCHED), 0.9)
        opt.zero_grad(step)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, hooked


def _helpers(world: World) -> list[float]:
    """reduce_scatter_avg then all_gather of [0,1,2,3] + 10*rank: the mean, so AVG and not SUM."""
    shard, gathered = torch.empty(2), torch.empty(4)
    distributed.reduce_scatter_avg(shard, torch.arange(4.0) + 10 * world.rank, world).wait()
    distributed.all_gather(gathered, shard, world).wait()
    return gathered.tolist()


def _sparse_helper(world: World) -> tuple[list, list, int]:
    """The sparse reduce-scatter of a 2-rank (8, 3) gradient with a few nonzero rows (rank 0: rows
    1 and 6, rank 1: rows 2 and 6) against the dense one; and how many rows this rank received."""
    full = torch.zeros(8, 3)
    for row in ((1, 6) if world.rank == 0 else (2, 6)):
        full[row] = torch.arange(3.0) + 10 * row + 100 * world.rank
    sparse, dense = torch.empty(4, 3), torch.empty(4, 3)
    handle = distributed.sparse_reduce_scatter_avg(sparse, full, world)
    handle.wait()
    distributed.reduce_scatter_avg(dense, full, world).wait()
    return sparse.tolist(), dense.tolist(), handle.received_rows


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    world = init_world("cpu")
    try:
        assert world.backend == "gloo" and world.world_size == 2
        native, hooked = _train(world)
        gathered = [_helpers(world)]
        distributed._reduce_scatter_ok["gloo"] = False       # the all-reduce fallback path
        fallback, _ = _train(world)
        gathered.append(_helpers(world))
        distributed._reduce_scatter_ok.pop("gloo")             # probe again: the native path
        r89, r89_hooked = _train(world, r89=True)
        r89_sparse, _ = _train(world, r89=True, sparse=True)
        sparse_helper = _sparse_helper(world)
        mean = world.all_reduce_mean(float(rank))
        world.barrier()
        torch.save({"native": native, "fallback": fallback, "hooked": hooked, "mean": mean,
                    "gathered": gathered, "r89": r89, "r89_hooked": r89_hooked, "r89_sparse": r89_sparse,
                    "sparse_helper": sparse_helper},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_world()


def _worker_r89(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    world = init_world("cpu")
    try:
        params, _ = _train(world, r89=True)
        sparse, _ = _train(world, r89=True, sparse=True)
        torch.save({"dense": params, "sparse": sparse}, os.path.join(out_dir, f"r89_rank{rank}.pt"))
    finally:
        destroy_world()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process run did not finish in 120 s")
    single, _ = _train(World())
    single89, _ = _train(World(), r89=True)
    single_sparse, _ = _train(World(), r89=True, sparse=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # rank 0 owns rows 0-3 and receives rank 1's row 2; rank 1 owns 4-7 and receives rank 0's row 6
    for rank, res in enumerate(results):
        sparse, dense, received = res["sparse_helper"]
        assert sparse == dense and received == 1, rank
    for res in results:
        # a row-sparse bigram gradient reduced as its nonzero rows: bit for bit the 1-process run
        for name, p in single_sparse.items():
            assert torch.equal(res["r89_sparse"][name], p), f"sparse {name}"
        assert res["mean"] == 0.5
        assert res["gathered"] == [[5.0, 6.0, 7.0, 8.0]] * 2
        assert res["hooked"] == [0, 5, 0, 5]   # Adam's 5 grads reduced from hooks on odd steps only
        for variant in ("native", "fallback"):
            for name, p in single.items():
                atol = 1e-6 if p.dtype == torch.float32 else 0.0   # bf16: the same rounding
                torch.testing.assert_close(res[variant][name], p, atol=atol, rtol=0,
                                           msg=lambda m: f"{variant} {name}: {m}")
        # record 89's groups: the smear gate and 4 more labels on Adam, 3 of them replicated
        assert res["r89_hooked"] == [0, 10, 0, 10]
        for name, p in single89.items():   # bf16 weights with mantissas on the owning rank: exact
            atol = 1e-6 if p.dtype == torch.float32 else 0.0
            torch.testing.assert_close(res["r89"][name], p, atol=atol, rtol=0, msg=lambda m: f"r89 {name}: {m}")
    for name in single:   # every rank holds the same full params
        assert torch.equal(results[0]["native"][name], results[1]["native"][name])
    for name in single89:
        assert torch.equal(results[0]["r89"][name], results[1]["r89"][name])


@pytest.mark.slow
def test_four_gloo_ranks_match_one_process_record89_switches(tmp_path):
    """4 ranks (one micro-batch each; some ranks own no slot of a bucket) with every record-89
    NorMuon switch on == 1 process, bit for bit; also with the bigram gradient reduced sparsely."""
    ctx = mp.start_processes(_worker_r89, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=False,
                             start_method="spawn")
    deadline = time.time() + 180
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("4-process run did not finish in 180 s")
    single, _ = _train(World(), r89=True)
    single_sparse, _ = _train(World(), r89=True, sparse=True)
    for r in range(4):
        res = torch.load(tmp_path / f"r89_rank{r}.pt")
        for name, p in single.items():
            assert torch.equal(res["dense"][name], p), f"rank {r} {name}"
        for name, p in single_sparse.items():   # 4 ranks: sums in another order, equal on integers
            assert torch.equal(res["sparse"][name], p), f"rank {r} sparse {name}"


def test_init_world_without_env_is_single_process(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    w = init_world("cpu")
    assert (w.rank, w.world_size, w.backend, w.is_main) == (0, 1, None, True)
    assert w.all_reduce_mean(3.5) == 3.5
    w.barrier()


def test_init_world_half_set_env_is_an_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(RuntimeError, match="WORLD_SIZE, LOCAL_RANK missing"):
        init_world("cpu")


def test_init_world_size_one_and_missing_master(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    w = init_world("cpu")
    assert w.world_size == 1 and w.backend is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_world("cpu")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RuntimeError, match="integers"):
        init_world("cpu")
