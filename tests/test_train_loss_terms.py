"""The stage table's loss weights through the trainer (CPU): every micro-step hands the model its
step's MTP / prefix weights (padded to the run's most, in one device buffer a CUDA graph can read);
a schedule without them keeps the plain next-token path; the embedding unties at the first odd
step of ``model.untie_at_stage``."""
import pytest
import torch
from test_train_stages import staged_config

from speedrun.distributed import init_world
from speedrun.optim.schedules import LossTerms, loss_terms, loss_weights


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from test_train import write_synthetic_shards
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")))


def weighted_config(train_glob, val_glob, save_path):
    """test_train_stages' table with record 89's kind of weights: 3 MTP weights and a prefix weight
    in stage 0, 2 fading in stage 1, next token only after."""
    cfg = staged_config(train_glob, val_glob, save_path)
    first, second = cfg.schedule.stages[:2]
    first.mtp_weights_start, first.mtp_weights_end = [1.0, 0.5, 0.25], [1.0, 0.5, 0.0]
    first.prefix_weight_start = first.prefix_weight_end = 0.25
    second.mtp_weights_start, second.mtp_weights_end = [1.0, 0.5], [1.0, 0.0]
    second.prefix_weight_start, second.prefix_weight_end = 0.25, 0.0
    return cfg.validate()


@pytest.mark.slow
def test_each_micro_step_gets_its_steps_weights(shards, tmp_path, monkeypatch):
    from speedrun.train.trainer import Trainer
    cfg = weighted_config(*shards, tmp_path)
    terms = loss_terms(cfg.schedule)
    assert terms == LossTerms(3, True)
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    model = trainer.model
    assert model.prefix_table is not None
    seen = []
    real = type(model).forward

    def spy(self, *args, loss_weights=None, **kw):
        seen.append((torch.cat([loss_weights.mtp, loss_weights.prefix[None]]).tolist(),
                     loss_weights.mtp.data_ptr()))
        return real(self, *args, loss_weights=loss_weights, **kw)
    monkeypatch.setattr(type(model), "forward", spy)
    # stage 0: steps 0-1 at t = 0, 1/2; stage 1: 2-3; the extension 4-5 (next token, zero padding)
    want = {0: [1.0, 0.5, 0.25, 0.25], 1: [1.0, 0.5, 0.125, 0.25], 2: [1.0, 0.5, 0.0, 0.25],
            3: [1.0, 0.25, 0.0, 0.125], 4: [1.0, 0.0, 0.0, 0.0], 5: [1.0, 0.0, 0.0, 0.0]}
    for step in range(6):
        assert loss_weights(step, cfg.schedule, terms) == want[step]
        trainer.apply_window(step)
        before = len(seen)
        loss = trainer.train_step(step, trainer.next_batches(step))
        assert torch.isfinite(loss)
        assert [w for w, _ in seen[before:]] == [want[step]] * trainer.grad_accum, step
    assert len({ptr for _, ptr in seen}) == 1     # one buffer, updated in place
    trainer.close()


def test_a_schedule_without_weights_keeps_the_plain_loss(shards, tmp_path):
    from speedrun.train.trainer import Trainer
    cfg = staged_config(*shards, tmp_path)
    assert loss_terms(cfg.schedule) is None
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    assert trainer.loss_weights is None and trainer.model.prefix_table is None
    trainer.close()
    cfg.schedule.stages[1].prefix_weight_start = 0.1       # a prefix weight alone: [1.0] + prefix
    assert loss_terms(cfg.schedule) == LossTerms(1, True)


@pytest.mark.slow
def test_untie_at_stage_follows_the_schedule(shards, tmp_path):
    """Stage 1 starts at step 2 of 4 scheduled: the untie follows step 3's update (the first odd
    step of the stage); with 8 scheduled steps it would be step 5."""
    from speedrun.train.trainer import Trainer
    cfg = staged_config(*shards, tmp_path)
    cfg.model.tie_embed, cfg.model.head_init_std, cfg.model.untie_at_stage = True, 0.02, 1
    cfg.validate()
    assert cfg.untie_step() == 3 and cfg.embed_tied_at(3) and not cfg.embed_tied_at(4)
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    assert trainer.untie_step == 3
    for step in range(5):
        trainer.apply_window(step)
        trainer.train_step(step, trainer.next_batches(step))
        assert trainer.model.embed_tied == (step < 3), step
    trainer.close()
    cfg.schedule.num_scheduled_steps = 8
    assert cfg.untie_step() == 5
