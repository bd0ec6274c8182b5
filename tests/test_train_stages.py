"""The trainer on a stage table (schedule.stages) on the CPU: each step takes its stage's batch,
accumulation, windows and lr; a run resumed across a stage edge continues exactly; one process and
two gloo processes follow the same trajectory through a batch change; the warm-up compiles every
micro-batch size."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import _cli_env, micro_config, run_trainer, train_losses, write_synthetic_shards

from speedrun.config import ScheduleConfig, StageConfig, Window
from speedrun.distributed import init_world


def staged_config(train_glob, val_glob, save_path, steps=6):
    """The micro recipe of test_train on a three-stage table: steps 0-1 at 256 tokens a step (2
    micro-batches of 128, documents cut at 64), steps 2-3 at 512 (2 x 256, cut at 128, lr x1.5),
    then the extension stage: windows (1, 2), (2, 4), (3, 6) in blocks of 16 tokens."""
    cfg = micro_config(train_glob, val_glob, save_path, steps=steps)
    default = ScheduleConfig()
    cfg.schedule.window_stages, cfg.schedule.extension_window = default.window_stages, default.extension_window
    cfg.schedule.cooldown_frac, cfg.schedule.final_lr_frac = 0.5, 0.2
    cfg.schedule.stages = [
        StageConfig(share=0.5, tokens_per_step=256, max_doc_len=64, windows=[1, 2]),
        StageConfig(share=0.5, tokens_per_step=512, max_doc_len=128, windows=[2, 4], lr_mul=1.5),
        StageConfig(tokens_per_step=512, max_doc_len=128, windows=[3, 6]),
    ]
    cfg.train.micro_batches_per_step = 2
    cfg.train.val_every = 2
    return cfg.validate()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="module")
def staged_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged")
    cfg = staged_config(*shards, run_dir)
    cfg.train.save_every = 1
    run_trainer(cfg)
    return run_dir


@pytest.mark.slow
def test_each_step_takes_its_stages_batch_windows_and_lr(shards, tmp_path, monkeypatch):
    from speedrun.train.trainer import Trainer
    cfg = staged_config(*shards, tmp_path)
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    assert trainer.model.max_doc_len == 128                    # the largest cap of the table
    calls = []
    real_step = trainer.optimizers.step
    monkeypatch.setattr(trainer.optimizers, "step", lambda step, lr, mu: (calls.append((step, lr, mu)),
                                                                          real_step(step, lr, mu)))
    # (micro-batches, tokens each, largest document, windows) by step; lr by the r89 formula:
    # lr_mul (1, 1.5, 1) blended into 0.2 from step int(4 * 0.5) = 2 over 2 steps, 0.2 from step 4
    expected = [(2, 128, 64, (1, 2), 1.0), (2, 128, 64, (1, 2), 1.0), (2, 256, 128, (2, 4), 1.5),
                (2, 256, 128, (2, 4), 1.5 * 0.5 + 0.2 * 0.5), (2, 256, 128, (3, 6), 0.2), (2, 256, 128, (3, 6), 0.2)]
    for step, (micro, tokens, cap, window, lr) in enumerate(expected):
        trainer.apply_window(step)
        batches = trainer.next_batches(step)
        assert len(batches) == micro and all(b.inputs.numel() == tokens for b in batches), step
        longest = max(max(torch.diff(b.cu_seqlens.unique()).tolist()) for b in batches)
        assert longest <= cap and (step >= 2 or longest == cap)  # stage 0 cuts the long documents at 64
        assert trainer.model.window == Window(*window)
        loss = trainer.train_step(step, batches)
        assert trainer.grad_accum == micro and 0 < float(loss) < 7
        assert calls[-1][0] == step and calls[-1][1] == pytest.approx(lr, abs=1e-12)
    trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [1, 2])
def test_resume_across_a_stage_edge_continues_exactly(staged_run, shards, tmp_path, checkpoint):
    """Resumed after step 1 (the batch doubles at step 2, the windows change at 2 and 4) or exactly at
    the edge: the same losses, bit for bit, as the uninterrupted run."""
    cfg = staged_config(*shards, tmp_path)
    run_trainer(cfg, resume=os.path.join(staged_run, "checkpoints", f"step_{checkpoint:06d}"))
    full_train, full_val = train_losses(staged_run)
    resumed_train, resumed_val = train_losses(tmp_path)
    # the original's records up to the checkpoint, then the resumed run's own
    assert sorted(resumed_train) == list(range(1, 7))
    assert {s: full_train[s] for s in resumed_train} == resumed_train
    assert resumed_val[6] == full_val[6]


@pytest.mark.slow
def test_two_processes_follow_one_through_a_batch_change(staged_run, shards, tmp_path):
    """2 gloo processes (1 micro-batch each) against 1 process (2 micro-batches): same losses
    through the batch change at step 2 and the window changes."""
    cfg = staged_config(*shards, tmp_path / "two")
    cfg.train.save_every = 0
    config_file = str(tmp_path / "staged.json")
    cfg.save(config_file)
    proc = subprocess.run([sys.executable, "-m", "speedrun", "train", "--config", config_file, "--cpu",
                           "--num-gpus", "2"], env=_cli_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1: steps 2-3 | 512 tokens/step = 2 x 256 (grad_accum 1)" in proc.stdout + proc.stderr
    one_train, one_val = train_losses(staged_run)
    two_train, two_val = train_losses(tmp_path / "two")
    assert sorted(two_train) == sorted(one_train) == list(range(1, 7))
    for step in one_train:
        assert two_train[step] == pytest.approx(one_train[step], rel=2e-4, abs=2e-4), step
    assert two_val[6] == pytest.approx(one_val[6], rel=2e-4)
    with open(os.path.join(tmp_path / "two", "config.json")) as f:
        assert len(json.load(f)["schedule"]["stages"]) == 3


@pytest.mark.parametrize("dynamic", ["off", "auto"])
def test_warmup_compiles_every_micro_batch_size(shards, tmp_path, monkeypatch, dynamic):
    """Static compiled regions are specialised on the micro-batch length: the warm-up runs one step
    of each stage with a new one, so no stage of the run (nor validation) compiles anything after it.
    With train.compile_dynamic (auto: on, the batch grows here) the new length compiles nothing."""
    from torch._dynamo.utils import counters

    from speedrun.model.gpt import GPT
    from speedrun.optim.schedules import stage_spans
    from speedrun.train.trainer import Trainer
    original = GPT.compile_regions
    asked = []
    monkeypatch.setattr(GPT, "compile_regions",
                        lambda self, **kw: asked.append(kw) or original(self, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    cfg = staged_config(*shards, tmp_path)
    cfg.train.compile = True
    cfg.train.compile_dynamic = dynamic
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    before = [t.detach().clone() for t in [*trainer.model.parameters(), *trainer.model.buffers()]]
    seen = []   # graphs compiled so far at each window change (step 0, stage 1) and at the eval
    for name in ("apply_window", "warm_eval"):
        monkeypatch.setattr(trainer, name, lambda *a, f=getattr(trainer, name): seen.append(
            counters["stats"]["unique_graphs"]) or f(*a))
    trainer.warmup()
    monkeypatch.undo()
    assert asked == [{"dynamic": dynamic == "auto"}]
    assert "stage1" in trainer.warmup_phases and "stage2" not in trainer.warmup_phases  # 2: same size
    assert len(seen) == 3 and seen[0] == 0, seen
    if dynamic == "auto":        # stage 1's longer micro-batch ran step 0's graphs
        assert seen[2] == seen[1], seen
    else:
        assert seen[2] > seen[1], seen
    # the warm-up trained nothing: weights, buffers (YaRN tables, attention scale) back, no gradient
    after = [*trainer.model.parameters(), *trainer.model.buffers()]
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in trainer.model.parameters()) and trainer.window is None
    assert trainer.loader.state_dict()["steps"] == 0            # the run's loader is untouched
    compiled = counters["stats"]["unique_graphs"]
    for span in stage_spans(cfg.schedule):
        for step in (span.start, span.start + 1):
            trainer.apply_window(step)
            trainer.train_step(step, trainer.next_batches(step))
    trainer.validate()
    trainer.close()
    assert counters["stats"]["unique_graphs"] == compiled
    torch._dynamo.reset()
