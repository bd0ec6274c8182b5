"""CUDA-graph micro-steps (train/cuda_graph.py): when they are used, in-place gradient zeroing on
the CPU; on a GPU, a graphed run trains exactly as the eager one."""
import pytest
import torch
from test_train import micro_config, train_losses, write_synthetic_shards

from speedrun.config import ConfigError
from speedrun.distributed import init_world
from speedrun.train.cuda_graph import graphs_wanted

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_uses_graphs_only_where_they_pay(monkeypatch):
    from speedrun.model import flash
    monkeypatch.setattr(flash, "flash_attn_impl", lambda: "fa4")
    assert graphs_wanted("auto", CUDA, compiled=True, backend="flex", world_size=1)
    assert not graphs_wanted("auto", CPU, compiled=True, backend="flex", world_size=1)
    assert not graphs_wanted("auto", CUDA, compiled=False, backend="flex", world_size=1)
    assert graphs_wanted("auto", CUDA, compiled=True, backend="flash", world_size=1)
    assert not graphs_wanted("auto", CUDA, compiled=True, backend="sdpa", world_size=1)
    assert not graphs_wanted("auto", CUDA, compiled=True, backend="flex", world_size=8)
    assert graphs_wanted("on", CUDA, compiled=False, backend="sdpa", world_size=8)
    assert graphs_wanted("on", CUDA, compiled=False, backend="flash", world_size=1)
    monkeypatch.setattr(flash, "flash_attn_impl", lambda: "fa3")   # never recorded here: not auto
    assert not graphs_wanted("auto", CUDA, compiled=True, backend="flash", world_size=1)
    assert not graphs_wanted("off", CUDA, compiled=True, backend="flex", world_size=1)
    with pytest.raises(ConfigError, match="cuda_graphs.*needs a CUDA device"):
        graphs_wanted("on", CPU, compiled=False, backend="flex", world_size=1)
    with pytest.raises(ValueError, match="train.cuda_graphs"):
        graphs_wanted("yes", CUDA, compiled=True, backend="flex", world_size=1)


def test_config_rejects_unknown_mode(tmp_path):
    cfg = micro_config("a", "b", tmp_path)
    cfg.train.cuda_graphs = "always"
    with pytest.raises(ConfigError, match="train.cuda_graphs.*one of auto, on, off"):
        cfg.validate()


def test_trainer_on_cpu_with_graphs_on_is_a_clear_error(tmp_path):
    from speedrun.train.trainer import Trainer
    train_glob, val_glob = write_synthetic_shards(tmp_path)
    cfg = micro_config(train_glob, val_glob, tmp_path / "run")
    cfg.train.cuda_graphs = "on"
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Trainer(cfg, init_world("cpu"), str(tmp_path / "run"))


def cpu_trainer(shards, run_dir, keep_grads: bool):
    """A micro-recipe trainer on the CPU whose optimizers keep (True) or drop gradients."""
    from speedrun.train.trainer import Trainer
    trainer = Trainer(micro_config(*shards, run_dir), init_world("cpu"), str(run_dir))
    trainer.optimizers.keep_grads = keep_grads
    return trainer


def cuda_trainer(shards, run_dir, graphs: str, compiled: bool, backend: str = "auto", save_every: int = 0,
                 resume=None):
    """A six-step micro-recipe trainer on the GPU with train.cuda_graphs = ``graphs``."""
    from speedrun.train.trainer import Trainer
    cfg = micro_config(*shards, run_dir, steps=6)
    cfg.train.device, cfg.train.compile, cfg.train.cuda_graphs = "cuda", compiled, graphs
    cfg.model.attention_backend = backend
    cfg.train.parallel_warmup, cfg.train.save_every = False, save_every
    return Trainer(cfg, init_world("cuda"), str(run_dir), resume=resume)


def test_kept_gradients_are_zeroed_in_place_and_train_identically(tmp_path):
    """keep_grads (what a recorded graph needs) zeroes the same .grad tensors instead of dropping
    them; accumulating onto zeros gives the same parameters as starting from None."""
    shards = write_synthetic_shards(tmp_path)
    params = {}
    for keep in (False, True):
        trainer = cpu_trainer(shards, tmp_path / f"k{keep}", keep)
        for step in range(4):
            trainer.apply_window(step)
            grads = [p.grad for p in trainer.model.parameters()]
            trainer.train_step(step, trainer.loader.next_step())
            if keep and step > 0:  # the very same tensors, and NorMuon's are zero after the step
                assert all(g is p.grad for g, p in zip(grads, trainer.model.parameters()))
        if keep:
            muon = [p for g in trainer.optimizers.muon.param_groups for p in g["params"]]
            assert all(p.grad is not None and not p.grad.any() for p in muon)
        else:
            assert all(p.grad is None for g in trainer.optimizers.muon.param_groups for p in g["params"])
        params[keep] = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.loader.close()
    for a, b in zip(params[False], params[True]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_training_matches_eager(tmp_path, compiled):
    """Six steps (two window stages, both Adam step kinds, a validation) with the micro-steps
    replayed from a CUDA graph give the eager run's losses and parameters exactly."""
    shards = write_synthetic_shards(tmp_path)
    runs = {}
    for mode in ("off", "on"):
        run_dir = tmp_path / mode
        trainer = cuda_trainer(shards, run_dir, mode, compiled)
        trainer.run()
        assert (trainer.micro_graph is not None) == (mode == "on")
        if mode == "on":
            assert trainer.micro_graph.replays >= 6  # 2 micro-steps a step, the first one eager
        runs[mode] = (train_losses(run_dir), [p.detach().clone() for p in trainer.model.parameters()])
    (train_off, val_off), params_off = runs["off"]
    (train_on, val_on), params_on = runs["on"]
    assert train_on == train_off and val_on == val_off
    for a, b in zip(params_off, params_on):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_graphed_resume_continues_exactly(tmp_path):
    """With CUDA-graph micro-steps: stop at the step-3 checkpoint (Adam holds step 2's gradients,
    loaded into .grad before anything is recorded), resume, and the losses and parameters are those
    of the uninterrupted graphed run."""
    import os

    shards = write_synthetic_shards(tmp_path)
    full = cuda_trainer(shards, tmp_path / "full", "on", compiled=False, save_every=3)
    full.run()
    resumed = cuda_trainer(shards, tmp_path / "resumed", "on", compiled=False, save_every=3,
                           resume=os.path.join(tmp_path, "full", "checkpoints", "step_000003"))
    resumed.run()
    assert resumed.micro_graph.replays > 0
    full_train, full_val = train_losses(tmp_path / "full")
    resumed_train, resumed_val = train_losses(tmp_path / "resumed")
    assert sorted(resumed_train) == [4, 5, 6]
    assert all(resumed_train[s] == full_train[s] for s in resumed_train) and resumed_val[6] == full_val[6]
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_checkpoints_leave_out_gradients_kept_as_zeros(tmp_path):
    """With keep_grads the zeroed NorMuon gradients stay allocated; a checkpoint saves only the
    pending ones (Adam's, after an even step), as without keep_grads, less any that is all zeros
    (restored as None, which accumulates to the same values)."""
    import os

    shards = write_synthetic_shards(tmp_path)
    saved = {}
    for keep in (False, True):
        trainer = cpu_trainer(shards, tmp_path / f"k{keep}", keep)
        for step in range(3):  # steps 0, 1, 2: Adam's gradients of step 2 are pending
            trainer.apply_window(step)
            trainer.train_step(step, trainer.loader.next_step())
        path = trainer.save(3, trainer.loader.state_dict())
        trainer.loader.close()
        saved[keep] = torch.load(os.path.join(path, "grads_rank0.pt"), weights_only=True)
    kept, dropped = saved[True], saved[False]
    assert kept and set(kept) <= set(dropped) and not any(".mlp." in n for n in kept)
    for name, grad in dropped.items():  # left out only where the pending gradient is all zeros
        assert torch.equal(kept[name], grad) if name in kept else not grad.any()


@pytest.mark.gpu
def test_changed_host_state_re_records():
    """A step that bakes a Python int into its kernels (as FlashAttention's window): with host_state
    naming it, a change drops the recording, runs one micro-step eagerly and records again, so every
    result uses the current value; without, a replay would keep the recorded one."""
    from types import SimpleNamespace

    from speedrun.train.cuda_graph import MicroStepGraph
    dev = torch.device("cuda")
    model = torch.nn.Linear(4, 4, device=dev)
    factor = {"k": 2}

    def step(inputs, targets, cu_seqlens):
        return (inputs.float() * factor["k"]).sum()

    graph = MicroStepGraph(step, model, dev, host_state=lambda: factor["k"])
    batch = SimpleNamespace(inputs=torch.arange(4, device=dev), targets=torch.zeros(4, device=dev), cu_seqlens=None)
    got = []
    for k in (2, 2, 2, 3, 3, 3, 5):
        factor["k"] = k
        got.append(graph.run(batch).item())
    assert got == [6 * k for k in (2, 2, 2, 3, 3, 3, 5)]
    # k=2: eager, record + replay, replay; k=3: the same; k=5: eager
    assert graph.recordings == 2 and graph.replays == 4


@pytest.mark.gpu
def test_graphed_flash_training_matches_eager(tmp_path):
    """The flash backend with CUDA-graph micro-steps (re-recorded at each window stage) follows the
    eager flash run (FlashAttention's backward accumulates dq with atomics: equal within noise)."""
    from speedrun.model.flash import flash_attn_impl
    if flash_attn_impl() is None:
        pytest.skip("no FlashAttention package importable")
    shards = write_synthetic_shards(tmp_path)
    runs = {}
    for mode in ("off", "auto"):
        run_dir = tmp_path / mode
        trainer = cuda_trainer(shards, run_dir, mode, compiled=True, backend="flash")
        trainer.run()
        assert (trainer.micro_graph is not None) == (mode == "auto")
        if mode == "auto":
            assert trainer.micro_graph.recordings >= 2 and trainer.micro_graph.replays > 0
        runs[mode] = train_losses(run_dir)
    (train_off, val_off), (train_on, val_on) = runs["off"], runs["auto"]
    assert sorted(train_on) == sorted(train_off)
    for s in train_off:
        assert abs(train_on[s] - train_off[s]) < 1e-2 * abs(train_off[s]), s
    for s in val_off:
        assert abs(val_on[s] - val_off[s]) < 1e-2 * abs(val_off[s]), s


def test_recording_plan_re_records_on_a_new_key():
    """The graph's decisions on the CPU: per key (micro-batch shapes, host values) eager, record,
    replays; a new key (a stage's new micro-batch size, a new loss scale or flash window) drops the
    recording and starts over, also when the key changes back."""
    from speedrun.train.cuda_graph import RecordingPlan
    plan = RecordingPlan()
    keys = ["a", "a", "a", "b", "b", "b", "b", "a", "c", "a", "a"]
    actions, drops = [], []
    for key in keys:
        drops.append(plan.drops(key))
        action = plan.action(key)
        plan.ran(key, action)
        actions.append(action)
    assert actions == ["eager", "record", "replay", "eager", "record", "replay", "replay",
                       "eager", "eager", "eager", "record"]
    assert [k for k, d in zip(keys, drops) if d] == ["b", "a"]   # a live recording under another key


def staged_cuda_trainer(shards, run_dir, graphs: str):
    """The stage-table micro recipe (tests/test_train_stages.py) on the GPU, compiled."""
    from test_train_stages import staged_config

    from speedrun.train.trainer import Trainer
    cfg = staged_config(*shards, run_dir)
    cfg.train.device, cfg.train.compile, cfg.train.cuda_graphs = "cuda", True, graphs
    cfg.train.parallel_warmup = False
    return Trainer(cfg, init_world("cuda"), str(run_dir))


@pytest.mark.gpu
def test_graphed_training_through_a_batch_change_matches_eager(tmp_path):
    """A stage table whose micro-batch doubles at step 2: the graph is recorded again for the new
    shape, and the run's losses and parameters equal the eager run's."""
    shards = write_synthetic_shards(tmp_path)
    runs = {}
    for mode in ("off", "on"):
        trainer = staged_cuda_trainer(shards, tmp_path / mode, mode)
        trainer.run()
        if mode == "on":
            assert trainer.micro_graph.recordings >= 2 and trainer.micro_graph.replays > 0
        runs[mode] = (train_losses(tmp_path / mode), [p.detach().clone() for p in trainer.model.parameters()])
    assert runs["on"][0] == runs["off"][0]
    for a, b in zip(runs["off"][1], runs["on"][1]):
        assert torch.equal(a, b)
