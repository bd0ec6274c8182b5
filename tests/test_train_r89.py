"""Record 89's switches through the trainer on the CPU: the embedding untied from the lm_head at its
step (weights and Adam state carried over), checkpoints before and after the untie resume to the
bit-identical trajectory, and checkpoints / exports of a record-89-shaped model load and compute
what the run computed (tied or untied)."""
import os

import pytest
import torch
from test_train import micro_config, run_trainer, train_losses, write_synthetic_shards

import speedrun
from speedrun.config import Config
from speedrun.eval.export import export_model
from speedrun.eval.loading import load_model
from speedrun.presets import record89_model, record89_optim

UNTIE = 3


def r89_config(train_glob, val_glob, save_path, steps=8) -> Config:
    """test_train's micro recipe with record 89's embedding / residual-stream switches, 4 layers:
    no attention on 2 (the skip's target), MUDD on 3 reading the cached output of 1, the post gate
    at 2, untied after step 3."""
    cfg = micro_config(train_glob, val_glob, save_path, steps)
    base = cfg.model
    cfg.model = record89_model(
        vocab_size=base.vocab_size, num_layers=4, model_dim=64, num_heads=2, head_dim=32,
        no_attention_layers=[2], long_window_layers=[3], value_embed_layers=[-1, 0, -1, 1],
        skip_from_layer=0, skip_to_layer=2, backout_layer=1, attn_input_layer=1, mudd_layer=3,
        mudd_value_sources=[-1, 1, 2], mudd_residual_sources=[-1, 1], mudd_final_sources=[-1, 1, 2, 0],
        mudd_gate_layer=2, xsa_layers=[0, 1], attn_out_gate_layers=[3], dc_layers=[3],
        bigram_vocab_size=331, bigram_sign_rows=32, value_embed_gate_dim=4, mudd_hidden=8,
        rope_max_positions=base.rope_max_positions, block_size=base.block_size, untie_after_step=UNTIE,
        attention_backend="sdpa")
    cfg.optim = record89_optim()
    cfg.optim.muon.kernel = "torch"
    return cfg.validate()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")))


@pytest.fixture(scope="module")
def r89_run(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("r89")
    cfg = r89_config(*shards, run_dir)
    cfg.train.save_every = 2
    summary = run_trainer(cfg)
    return str(run_dir), summary


@pytest.mark.parametrize("fused_dc", [True, False])
def test_warmup_helper_compiles_the_dc_kernels_of_the_run(shards, tmp_path, monkeypatch, fused_dc):
    """The parallel warm-up helper JIT-compiles the DC-MHA kernels first, at the run's heads, head
    width, DC window and model dtype (the trainer's first DC call then loads them); not when the
    run takes DC's plain twin."""
    from speedrun.kernels import dc_mha
    from speedrun.train import precompile_worker
    calls = []
    monkeypatch.setattr(dc_mha, "warm_kernels", lambda *a: calls.append(a) or True)
    cfg = r89_config(*shards, tmp_path)
    cfg.model.fused_dc = fused_dc
    cfg.train.compile = False
    path = str(tmp_path / "config.json")
    cfg.save(path)
    assert 0 < precompile_worker.run(path, "cpu") < 7.0     # it still evaluates (untrained: ~ln vocab)
    m = cfg.model
    assert calls == ([(m.num_heads, m.head_dim, m.dc_window, torch.float32, torch.device("cpu"))]
                     if fused_dc else [])


def _weights(ckpt):
    from safetensors.torch import load_file
    return load_file(os.path.join(ckpt, "model.safetensors"))


def test_untie_carries_weights_and_state(r89_run):
    run_dir, summary = r89_run
    ckpts = os.path.join(run_dir, "checkpoints")
    train, val = train_losses(run_dir)
    assert sorted(train) == list(range(1, 9)) and all(torch.isfinite(torch.tensor(list(train.values()))))
    # before the untie the embedding parameter is not trained (the head is read in its place)
    before = _weights(os.path.join(ckpts, "step_000002"))
    first = _weights(os.path.join(ckpts, "step_000008"))
    assert not torch.equal(before["embed.weight"], before["lm_head.weight"])   # the head moved
    # after it both train on their own: they differ from each other and from the untie point
    assert not torch.equal(first["embed.weight"], first["lm_head.weight"])
    at_untie = _weights(os.path.join(ckpts, "step_000004"))       # saved right after step 3's untie
    assert torch.equal(at_untie["embed.weight"], at_untie["lm_head.weight"])
    optim = torch.load(os.path.join(ckpts, "step_000004", "optim_rank0.pt"), weights_only=True)
    shapes = optim["adam"]["shapes"]
    params = optim["adam"]["params"]
    embed_state = params[[i for i, s in enumerate(shapes) if s == list(at_untie["embed.weight"].shape)][0]]
    # steps 0..3 held 2 Adam updates (odd steps); the embedding took the head's count at the untie
    assert embed_state["step"] == 2 and embed_state["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize("resume_from", [2, 4])     # tied at the checkpoint / already untied
def test_resume_across_the_untie_is_bit_identical(r89_run, shards, tmp_path, resume_from):
    run_dir, _ = r89_run
    cfg = r89_config(*shards, tmp_path)
    run_trainer(cfg, resume=os.path.join(run_dir, "checkpoints", f"step_{resume_from:06d}"))
    full_train, full_val = train_losses(run_dir)
    resumed_train, resumed_val = train_losses(tmp_path)
    # the resumed run's metrics carry the original's records up to the checkpoint, then its own
    assert sorted(resumed_train) == list(range(1, 9))
    for step, loss in resumed_train.items():
        assert loss == full_train[step], step
    assert resumed_val[8] == full_val[8]
    a, b = _weights(os.path.join(run_dir, "checkpoints", "step_000008")), \
        _weights(os.path.join(tmp_path, "checkpoints", "step_000008"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_and_export_round_trip(r89_run, tmp_path):
    """Untied (end of the run) and tied (step 2) checkpoints load for evaluation and export with
    every record-89 parameter and the bigram sign table; the exports compute the same logits."""
    run_dir, _ = r89_run
    ids = torch.randint(0, 255, (40,), generator=torch.Generator().manual_seed(0))
    for source, tied in ((run_dir, False), (os.path.join(run_dir, "checkpoints", "step_000002"), True)):
        loaded = load_model(source, "cpu")
        assert loaded.embed_from_head == tied and not loaded.model.embed_tied
        if tied:    # the materialized embedding is the head
            assert torch.equal(loaded.model.embed.weight, loaded.model.lm_head.weight)
        out = str(tmp_path / f"export_{tied}")
        export_model(source, out)
        exported = speedrun.load(out)
        with torch.no_grad():
            torch.testing.assert_close(exported(ids), loaded.model(ids), atol=0, rtol=0)
        names = {n for n, _ in exported.named_parameters()}
        assert {"bigram.weight", "mudd.w2.1", "gate_mlps.scale", "ve_gates", "resid_lambdas"} <= names
        assert torch.equal(exported.bigram.signs, loaded.model.bigram.signs)
