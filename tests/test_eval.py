"""Using a trained model: the KV-cache decoder against the full forward (sliding windows, smear,
value embeddings, skip, backout, YaRN), sampling and its filters, HellaSwag data / packing /
scoring, validation loss, export + speedrun.load, and the commands through speedrun.cli.main."""
import gzip
import json
import os
import re
import shutil
import urllib.error

import pytest
import torch
from test_model_gpt import decode_in_pieces
from test_model_gpt import randomized as randomize_parameters

import speedrun
from speedrun.cli import main
from speedrun.config import Config, ModelConfig, Window
from speedrun.data.tokenizer import EOT_ID, encode
from speedrun.eval import hellaswag as hs
from speedrun.eval.export import export_model, is_export_dir
from speedrun.eval.generate import TextStream, filter_logits, generate
from speedrun.eval.loading import EvalError, apply_eval_windows, load_model
from speedrun.model import GPT
from speedrun.model.kv_cache import KVCache

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hellaswag_tiny.jsonl")


def tiny_cfg(**kw) -> ModelConfig:
    """The record's structure scaled down: a layer without attention, long and short window
    layers, value embeddings on the first and last layers, skip, backout, every switch on."""
    base = dict(vocab_size=500, num_layers=5, model_dim=64, num_heads=2, head_dim=32,
                no_attention_layers=[3], long_window_layers=[2, 4], value_embed_layers=[1, 0, -1, -1, 1],
                skip_from_layer=1, skip_to_layer=3, backout_layer=2, block_size=8,
                attention_backend="sdpa")
    base.update(kw)
    return ModelConfig(**base)


def randomized(model: GPT, seed: int = 0) -> GPT:
    """The model tests' randomization (every path carries signal), larger outputs, in eval mode."""
    return randomize_parameters(model, seed, scale=0.1).eval()


def model_with_windows(cfg=None, seed=0) -> GPT:
    torch.manual_seed(seed)
    model = randomized(GPT(cfg or tiny_cfg()), seed)
    model.set_window(Window(1, 2))          # long 16 tokens, short 8: smaller than the test sequences
    model.set_window(Window(1, 3))          # a YaRN update: rescaled frequencies and attention scale
    return model


# ---- KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", [[40], [1] * 40, [7, 1, 1, 1, 12, 1, 17], [20, 20]])
def test_kv_cache_logits_equal_full_forward(split):
    model = model_with_windows()
    ids = torch.randint(0, 500, (sum(split),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
    cache = KVCache(model, 64)
    with torch.no_grad():
        decoded = decode_in_pieces(model, ids, split, cache)
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)
    assert cache.length == 40


@pytest.mark.parametrize("off", ["smear", "rotary", "value_embeds", "skip_connection", "backout",
                                 "block_lambdas", "attn_gate", "qk_norm"])
def test_kv_cache_with_a_switch_off(off):
    model = model_with_windows(tiny_cfg(**{off: False}))
    ids = torch.randint(0, 500, (30,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
    cache = KVCache(model, 30)
    with torch.no_grad():
        got = torch.cat([model(ids[:5], kv_cache=cache)] + [model(ids[t:t + 1], kv_cache=cache)
                                                            for t in range(5, 30)])
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_kv_cache_window_matters_and_no_window():
    model = model_with_windows()
    ids = torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        windowed = model(ids, kv_cache=KVCache(model, 40))
        model.reset_window()            # no window: every earlier token is visible
        full = model(ids)
        cache = KVCache(model, 40)
        got = torch.cat([model(ids[:10], kv_cache=cache), model(ids[10:], kv_cache=cache)])
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    # the windows (and their YaRN state) did change what the decoder computed
    assert not torch.allclose(windowed, full, atol=1e-3)


def test_kv_cache_overflow_is_an_error():
    model = model_with_windows()
    cache = KVCache(model, 4)
    with torch.no_grad():
        model(torch.tensor([1, 2, 3]), kv_cache=cache)
        with pytest.raises(ValueError, match="cache size"):
            model(torch.tensor([4, 5]), kv_cache=cache)


# ---- generation ----------------------------------------------------------------------------------

def test_generation_is_deterministic_under_a_seed():
    model = model_with_windows()
    kw = dict(temperature=1.0, top_k=50, top_p=0.9, stop_at_eot=False, bos=False)
    a = list(generate(model, [5, 6, 7], 25, seed=11, **kw))
    b = list(generate(model, [5, 6, 7], 25, seed=11, **kw))
    c = list(generate(model, [5, 6, 7], 25, seed=12, **kw))
    assert a == b and len(a) == 25
    assert a != c
    assert all(0 <= t < 500 for t in a)


def test_greedy_equals_argmax_of_the_full_forward():
    cfg = tiny_cfg(vocab_size=EOT_ID + 1)     # the real vocabulary, so the BOS id exists
    model = model_with_windows(cfg)
    tokens = list(generate(model, [11, 12], 12, temperature=0.0, stop_at_eot=False))
    context = [EOT_ID, 11, 12]
    for t in tokens:                # recompute each step with the plain forward
        with torch.no_grad():
            logits = model(torch.tensor(context))[-1, :cfg.vocab_size]
        assert t == int(logits.argmax())
        context.append(t)


def rig_head(model: GPT, favourite: slice | int) -> GPT:
    """Make the head's logits constant: 30 for ``favourite`` token id(s), 0 elsewhere."""
    def logits(xn):
        out = torch.zeros(xn.shape[0], model.cfg.padded_vocab_size)
        out[:, favourite] = 30.0
        return out
    model._logits = logits
    return model


def test_padded_vocabulary_is_never_sampled():
    model = rig_head(model_with_windows(), slice(500, None))   # padding rows 500..511 favoured
    tokens = list(generate(model, [1], 20, temperature=2.0, seed=0, stop_at_eot=False, bos=False))
    assert len(tokens) == 20 and all(t < 500 for t in tokens)


def test_generation_stops_at_eot_and_rejects_bad_settings():
    model = rig_head(model_with_windows(tiny_cfg(vocab_size=EOT_ID + 1)), EOT_ID)
    assert list(generate(model, [1, 2], 10, temperature=0.0)) == [EOT_ID]
    assert list(generate(model, [1, 2], 3, temperature=0.0, stop_at_eot=False)) == [EOT_ID] * 3
    with pytest.raises(EvalError, match="top-p"):
        list(generate(model, [1], 3, top_p=0.0))
    with pytest.raises(EvalError, match="temperature"):
        list(generate(model, [1], 3, temperature=-1.0))
    with pytest.raises(ValueError, match="token id 60000"):
        list(generate(model, [60000], 3))


def test_top_k_filter():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = filter_logits(logits, top_k=2)
    assert torch.isinf(out).tolist() == [True, False, True, False, True]
    assert out[1] == 5.0 and out[3] == 4.0
    assert torch.equal(filter_logits(logits, top_k=0), logits)
    assert torch.equal(filter_logits(logits, top_k=10), logits)


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05])
    logits = probs.log()

    def kept(p):
        return (~torch.isinf(filter_logits(logits, top_p=p))).nonzero().flatten().tolist()

    assert kept(0.5) == [1]                 # 0.5 alone reaches 0.5
    assert kept(0.6) == [1, 2]              # 0.5 + 0.2
    assert kept(0.8) == [1, 2, 3]           # 0.5 + 0.2 + 0.15 = 0.85
    assert kept(0.9) == [0, 1, 2, 3]
    assert kept(1.0) == [0, 1, 2, 3, 4]
    assert kept(0.01) == [1]                # the most likely token always survives
    # batched rows, combined with top-k
    rows = torch.stack([logits, logits.flip(0)])
    both = filter_logits(rows, top_k=3, top_p=0.6)
    assert (~torch.isinf(both)).sum(dim=1).tolist() == [2, 2]


def test_text_stream_holds_back_split_characters():
    stream = TextStream()
    text = "🙂 日本語"
    pieces = [stream.push(t) for t in encode(text)]
    assert "".join(pieces) + stream.flush() == text
    assert "\ufffd" not in "".join(pieces)
    assert pieces[0] == ""                  # the first token is half an emoji


# ---- HellaSwag: data -----------------------------------------------------------------------------

def test_load_items_fixture_and_gzip(tmp_path):
    items = hs.load_items(FIXTURE)
    assert [i.label for i in items] == [0, 1, 2, 3]          # label "2" (a string) accepted
    assert items[2].where.endswith("hellaswag_tiny.jsonl:4")  # the blank line 3 is skipped
    assert len(hs.load_items(FIXTURE, limit=2)) == 2
    gz = tmp_path / "hs.jsonl.gz"
    with open(FIXTURE, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    assert [i.endings for i in hs.load_items(str(gz))] == [i.endings for i in items]


def test_load_items_errors_name_file_and_line(tmp_path):
    with pytest.raises(EvalError, match="nope.jsonl: HellaSwag data file not found"):
        hs.load_items(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    lines = open(FIXTURE).read().splitlines()
    bad.write_text("\n".join(lines[:2] + ['{"ctx": "x", "endings": ['] + lines[3:]) + "\n")
    with pytest.raises(EvalError, match=r"bad\.jsonl:3: not valid JSON"):
        hs.load_items(str(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(lines[0] + "\n" + json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}) + "\n")
    with pytest.raises(EvalError, match=r"wrong\.jsonl:2: expected .*endings \(4 strings\)"):
        hs.load_items(str(wrong))
    label = tmp_path / "label.jsonl"
    label.write_text(json.dumps({"ctx": "a", "endings": list("bcde"), "label": 4}) + "\n")
    with pytest.raises(EvalError, match=r"label\.jsonl:1"):
        hs.load_items(str(label))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"endings": list("bcde"), "label": 1}) + "\n")
    with pytest.raises(EvalError, match="missing ctx"):
        hs.load_items(str(missing))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(EvalError, match="no HellaSwag items"):
        hs.load_items(str(empty))
    with pytest.raises(EvalError, match="not found"):
        hs.data_file(str(tmp_path / "absent.jsonl"))


def test_data_file_download_cache_and_offline_error(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(FIXTURE, dest)

    monkeypatch.setattr(hs, "download", fake_download)
    path = hs.data_file(None, str(tmp_path))
    assert path == hs.cache_path(str(tmp_path)) and os.path.isfile(path)
    assert hs.data_file(None, str(tmp_path)) == path and calls == [hs.URL]   # cached: no 2nd fetch

    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(hs, "download", offline)
    with pytest.raises(EvalError) as e:
        hs.data_file(None, str(tmp_path / "other"))
    message = str(e.value)
    assert hs.URL in message and "--data" in message and "no network" in message
    assert "\n" not in message


# ---- HellaSwag: packing and scoring --------------------------------------------------------------

GOOD, BAD = encode(" good")[0], encode(" bad")[0]


def stub_losses(inputs, targets, cu_seqlens):
    """A 'model' that finds ' good' easy (loss 1) and ' bad' harder (loss 2)."""
    losses = torch.full(targets.shape, 5.0)
    losses[targets == GOOD] = 1.0
    losses[targets == BAD] = 2.0
    return losses


@pytest.mark.parametrize("batch_tokens", [16, 128, 4096])
def test_scoring_picks_the_rigged_answer_both_ways(batch_tokens):
    items = hs.load_items(FIXTURE)
    result = hs.evaluate(items, stub_losses, batch_tokens)
    # mean loss: the all-'good' (or mostly 'good') ending wins every item; summed loss prefers the
    # single ' bad' over four ' good's (item 1) and over 'good bad good' (item 4)
    assert (result.items, result.correct_norm, result.correct_sum) == (4, 4, 2)
    assert result.acc_norm == 1.0 and result.acc_sum == 0.5


def test_packs_have_one_shape_and_spans_point_at_endings():
    rendered = [hs.render(i) for i in hs.load_items(FIXTURE)]
    packs = list(hs.pack_items(rendered, 256))
    assert sum(len(p.labels) for p in packs) == 4
    for p in packs:
        assert p.inputs.numel() == 256 and p.targets.numel() == 256
        assert int(p.cu_seqlens[0]) == 0 and int(p.cu_seqlens[-1]) == 256
        for item, spans in zip(rendered[:len(p.labels)], p.spans):
            for ending, (a, b) in zip(item.endings, spans):
                assert p.targets[a:b].tolist() == ending          # losses a..b-1 score the ending
                start = a - len(item.context)                       # the row's BOS
                assert p.inputs[start].item() == EOT_ID and p.inputs[start - 1].item() == EOT_ID
                assert start in p.cu_seqlens.tolist()                # each row is its own document
        rendered = rendered[len(p.labels):]


def test_item_losses_do_not_depend_on_packing():
    model = model_with_windows(tiny_cfg(vocab_size=EOT_ID + 1))
    rendered = [hs.render(i) for i in hs.load_items(FIXTURE)]
    scorer = hs.model_token_losses(model)
    alone = torch.cat([hs.ending_losses(p, scorer)[0] for p in hs.pack_items(rendered, 16)])
    packs = list(hs.pack_items(rendered, 1024))
    assert len(packs) == 1
    together = hs.ending_losses(packs[0], scorer)[0]
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)
    # and they are the losses of the row scored on its own: [EOT, EOT, context, ending]
    item, (a, b) = rendered[0], packs[0].spans[0][1]
    row = [EOT_ID, EOT_ID] + item.context + item.endings[1]
    cu = torch.tensor([0, 1, len(row)], dtype=torch.int32)
    ids = torch.tensor(row)
    with torch.no_grad():
        losses = model(ids[:-1], ids[1:], cu, reduction="none")
    n = len(item.endings[1])
    torch.testing.assert_close(losses[-n:].sum(), together[0, 1], atol=1e-4, rtol=1e-5)
    assert b - a == n


# ---- checkpoints, windows, export ----------------------------------------------------------------

def tiny_run_config() -> Config:
    cfg = Config()
    cfg.model = tiny_cfg(vocab_size=EOT_ID + 1, attention_backend="auto")
    s = cfg.schedule
    s.num_scheduled_steps, s.num_extension_steps = 6, 2
    s.window_stages, s.extension_window, s.final_val_window = [1, 2, 3], 4, 5
    cfg.train.val_tokens, cfg.train.val_sequence_tokens = 256, 128
    return cfg


def write_checkpoint(run_dir, cfg: Config, step: int, seed: int = 0) -> str:
    """The trainer's checkpoint layout (weights + meta + latest), without training."""
    from safetensors.torch import save_file

    from speedrun.train.checkpoint import _plain_state_dict, checkpoint_dir
    torch.manual_seed(seed)
    model = randomized(GPT(cfg.model), seed)
    path = checkpoint_dir(str(run_dir), step)
    os.makedirs(path)
    save_file(_plain_state_dict(model), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"step": step, "world_size": 1, "config": cfg.to_dict()}, f)
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write(os.path.basename(path) + "\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    write_checkpoint(run, tiny_run_config(), step=8)           # a finished run (6 + 2 steps)
    return str(run)


def test_eval_windows_match_the_trainers_validation():
    cfg = tiny_run_config()
    model = GPT(cfg.model)
    apply_eval_windows(model, cfg.schedule, 8)                  # finished: final validation
    assert model.window == Window(2, 5)
    reference = GPT(cfg.model)                                  # the trainer's sequence of calls
    for long, short in [(1, 1), (2, 1), (3, 1), (4, 2)]:
        reference.set_window(Window(short, long), update_yarn=True)
    reference.set_window(Window(2, 5), update_yarn=False)
    torch.testing.assert_close(model.rotary.freqs, reference.rotary.freqs, atol=0, rtol=0)
    torch.testing.assert_close(model.rotary.attn_scale, reference.rotary.attn_scale, atol=0, rtol=0)
    apply_eval_windows(model, cfg.schedule, 2)                  # mid-run: the windows of step 2
    assert model.window == Window(1, 2)


def test_load_accepts_run_and_checkpoint_dirs(run_dir):
    by_run = load_model(run_dir, "cpu")
    by_ckpt = load_model(by_run.source, "cpu")
    assert by_run.source.endswith("step_000008") and by_run.step == 8
    assert not by_run.model.training and by_run.model.window.long == 5
    ids = torch.tensor([EOT_ID, 10, 20, 30])
    with torch.no_grad():
        torch.testing.assert_close(by_run.model(ids), by_ckpt.model(ids), atol=0, rtol=0)
    with pytest.raises(EvalError, match="no such"):
        load_model(os.path.join(run_dir, "missing"), "cpu")
    from speedrun.train.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(os.path.dirname(run_dir), "cpu")


def test_export_round_trip(run_dir, tmp_path):
    out = str(tmp_path / "exported")
    export_model(run_dir, out)
    assert is_export_dir(out) and not is_export_dir(run_dir)
    with open(os.path.join(out, "tokenizer.json")) as f:
        tok = json.load(f)
    assert (tok["name"], tok["eot_id"], tok["vocab_size"]) == ("gpt2", 50256, 50257)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["window"] == {"long_blocks": 5, "short_blocks": 2, "yarn_blocks": 4}
    assert config["source"]["step"] == 8
    assert sorted(os.listdir(tmp_path)) == ["exported"]        # no staging left behind

    model = speedrun.load(out)
    original = load_model(run_dir, "cpu").model
    assert isinstance(model, GPT) and not model.training
    ids = torch.randint(0, 50257, (50,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), original(ids), atol=0, rtol=0)
    torch.testing.assert_close(model.rotary.freqs, original.rotary.freqs, atol=0, rtol=0)
    assert model.window == Window(2, 5)

    export_model(out, out)                                      # re-export over an earlier export
    assert speedrun.load(out).window.long == 5
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    config["model"]["mlp_ratio"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvalError, match="weights do not match the config"):
        speedrun.load(str(broken))
    shutil.rmtree(broken)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(EvalError, match="not an earlier export"):
        export_model(run_dir, str(tmp_path / "other"))
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_val_loss_equals_the_models_mean_loss(run_dir, tmp_path):
    from speedrun.data.shards import write_shard
    from speedrun.eval.val import evaluate_val
    tokens = torch.randint(0, 50257, (600,), generator=torch.Generator().manual_seed(1))
    tokens[[0, 100, 300]] = EOT_ID
    write_shard(tmp_path / "v_val_000000.bin", tokens.numpy().astype("uint16"))
    model = load_model(run_dir, "cpu").model
    result = evaluate_val(model, str(tmp_path / "v_val_*.bin"), 256, 128)
    with torch.no_grad():   # by hand: two chunks of 128, documents split at each BOS
        parts = []
        for i in range(2):
            x, y = tokens[i * 128:(i + 1) * 128], tokens[i * 128 + 1:(i + 1) * 128 + 1]
            starts = [0] + [j for j in range(1, 128) if x[j] == EOT_ID] + [128]
            parts.append(model(x, y, torch.tensor(starts, dtype=torch.int32), reduction="mean"))
    assert result.tokens == 256
    assert result.loss == pytest.approx(float(sum(parts) / 2), rel=1e-5)
    with pytest.raises(EvalError, match="multiple"):
        evaluate_val(model, str(tmp_path / "v_val_*.bin"), 200, 128)


# ---- the commands --------------------------------------------------------------------------------

def test_cli_sample(run_dir, capsys):
    argv = ["sample", "--checkpoint", run_dir, "--prompt", "Hello", "--max-tokens", "8",
            "--seed", "3", "--device", "cpu", "--ignore-eot"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("Hello") and first.out.endswith("\n")
    assert "8 tokens in" in first.err and "step 8" in first.err
    assert main(argv) == 0
    assert capsys.readouterr().out == first.out                 # same seed, same text
    # the text is the decoded tokens of generate()
    model = load_model(run_dir, "cpu").model
    ids = list(generate(model, encode("Hello"), 8, temperature=0.8, top_k=200, seed=3, stop_at_eot=False))
    from speedrun.data.tokenizer import decode
    assert first.out == "Hello" + decode(ids) + "\n"
    assert main(["sample", "--checkpoint", run_dir, "--temperature", "0", "--max-tokens", "4",
                 "--device", "cpu"]) == 0
    assert main(["sample", "--checkpoint", run_dir, "--top-p", "2"]) == 1
    assert "--top-p 2.0" in capsys.readouterr().err


def test_cli_eval_hellaswag(run_dir, capsys, monkeypatch, tmp_path):
    assert main(["eval", "hellaswag", "--checkpoint", run_dir, "--data", FIXTURE, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("hellaswag 4 items: acc_norm ") and "| acc " in out
    assert main(["eval", "hellaswag", "--checkpoint", run_dir, "--data", FIXTURE, "--limit", "2",
                 "--batch-tokens", "64", "--quiet"]) == 0
    assert "hellaswag 2 items" in capsys.readouterr().out

    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(hs, "download", offline)
    assert main(["eval", "hellaswag", "--checkpoint", run_dir, "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("speedrun eval: error: HellaSwag data:") and hs.URL in err
    assert len(err.splitlines()) == 1
    assert main(["eval", "hellaswag", "--checkpoint", run_dir, "--data", str(tmp_path / "x.jsonl")]) == 1
    assert "x.jsonl: HellaSwag data file not found" in capsys.readouterr().err


def test_cli_eval_val_and_export(run_dir, capsys, tmp_path):
    from speedrun.data.shards import write_shard
    tokens = torch.randint(0, 50257, (700,), generator=torch.Generator().manual_seed(2))
    tokens[0] = EOT_ID
    write_shard(tmp_path / "d_val_000000.bin", tokens.numpy().astype("uint16"))
    argv = ["eval", "val", "--checkpoint", run_dir, "--data-path", str(tmp_path / "d_val_*.bin"),
            "--tokens", "256"]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert line.startswith("val loss ") and "256 tokens" in line and "chunks of 128" in line

    out = str(tmp_path / "export")
    assert main(["export", "--checkpoint", run_dir, "--out", out]) == 0
    assert f"exported {run_dir} to {out}" in capsys.readouterr().out
    # the exported model gives the same val loss and the same sample
    assert main(argv[:3] + [out] + argv[4:]) == 0
    assert capsys.readouterr().out.split("|")[0] == line.split("|")[0]
    sample = ["sample", "--prompt", "A", "--max-tokens", "5", "--seed", "0", "--checkpoint"]
    assert main(sample + [run_dir]) == 0 and main(sample + [out]) == 0
    texts = capsys.readouterr().out
    assert texts[:len(texts) // 2] == texts[len(texts) // 2:]

    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", out]) == 1
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["eval", "val", "--checkpoint", run_dir, "--tokens", "lots"]) == 1
    assert "--tokens" in capsys.readouterr().err
    tokens[100] = 60000                         # an id the model has no embedding for
    write_shard(tmp_path / "d_val_000000.bin", tokens.numpy().astype("uint16"))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] + "\n" == (f"speedrun eval: error: {tmp_path / 'd_val_000000.bin'}: token id 60000 (in the validation "
                   f"tokens, first at position 100) is outside the model's vocabulary, model.vocab_size 50257 "
                   f"(ids 0..50256); were these shards made with another tokenizer?\n")


# ---- damaged or hostile model files: one line, exit 1, nothing written ----------------------------

def damage_checkpoint(run_dir, how: str) -> None:
    ckpt = os.path.join(run_dir, "checkpoints", "step_000008")
    weights = os.path.join(ckpt, "model.safetensors")
    meta_path = os.path.join(ckpt, "meta.json")
    data = open(weights, "rb").read()
    if how == "truncated weights":
        open(weights, "wb").write(data[:len(data) // 2])
    elif how == "corrupt weights":
        open(weights, "wb").write(data[:8] + b"not json" + data[16:])
    else:
        meta = json.load(open(meta_path))
        model = meta["config"]["model"]
        if how == "absurd meta.json":      # consistent, but 35 trillion parameters
            model.update(model_dim=1048576, num_heads=8192, head_dim=128)
        elif how == "inconsistent meta.json":   # a size the weights were not trained at
            model.update(model_dim=128, num_heads=2, head_dim=64)
        else:
            model["num_layers"] = "five"
        json.dump(meta, open(meta_path, "w"))


@pytest.mark.parametrize("how, message", [
    ("truncated weights", r"model\.safetensors: not a readable safetensors file \(.*\); the file is corrupt or truncated"),
    ("corrupt weights", r"model\.safetensors: not a readable safetensors file \(.*\); the file is corrupt or truncated"),
    ("absurd meta.json", r"meta\.json: model\.num_layers 5, model\.model_dim 1048576, .* make a model of "
                         r"[\d,]+ parameters needing at least [\d,.]+ GiB, more than the [\d,.]+ GiB of memory "
                         r"available on cpu; check these fields"),
    ("inconsistent meta.json", r"model\.safetensors: weights do not match the config: tensor 'embed\.weight' "
                               r"has shape \(50304, 64\), the config's model has \(50304, 128\)"),
    ("wrong type in meta.json", r"meta\.json: config field 'model\.num_layers': expected int, got 'five'"),
])
def test_commands_refuse_a_damaged_checkpoint_in_one_line(run_dir, tmp_path, capsys, how, message):
    run = str(tmp_path / "run")
    shutil.copytree(run_dir, run)
    damage_checkpoint(run, how)
    for argv in (["sample", "--max-tokens", "3"], ["eval", "val", "--tokens", "256"],
                 ["export", "--out", str(tmp_path / "out")]):
        assert main(argv + ["--checkpoint", run, "--device", "cpu"] * (argv[0] != "export")
                    + ["--checkpoint", run] * (argv[0] == "export")) == 1, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), (argv, err)
    assert not os.path.exists(tmp_path / "out")


# ---- sampler numerics -----------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0 (0 = greedy)"),
    (["--temperature", "inf"], "--temperature inf: expected a finite number >= 0 (0 = greedy)"),
    (["--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0 (0 = greedy)"),
    (["--top-p", "nan"], "--top-p nan: expected a probability in (0, 1]"),
    (["--top-k", "-3"], "--top-k -3: expected >= 0 (0 = no limit)"),
    (["--max-tokens", "-1"], "--max-tokens -1: expected >= 0"),
    (["--max-tokens", "300000", "--prompt", "Hi"],
     "--max-tokens 300000: the prompt (2 tokens with <|endoftext|>) plus 300000 new tokens exceed the model's "
     "context of 262144 positions (model.rope_max_positions); use --max-tokens 262142 or less"),
])
def test_sample_refuses_bad_numbers_in_one_line(run_dir, capsys, flags, message):
    assert main(["sample", "--checkpoint", run_dir, "--device", "cpu", *flags]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"speedrun sample: error: {message}\n" and captured.out == ""


def test_sample_refuses_a_kv_cache_that_does_not_fit(run_dir, capsys, monkeypatch):
    from speedrun.eval import generate as gen
    monkeypatch.setattr(gen, "available_memory", lambda device: 2**20)   # 1 MiB left
    assert main(["sample", "--checkpoint", run_dir, "--device", "cpu", "--max-tokens", "5000"]) == 1
    assert capsys.readouterr().err == (
        "speedrun sample: error: --max-tokens 5000: the KV cache for 5,001 tokens needs 9.8 MiB, more than "
        "the 1.0 MiB of memory available; ask for fewer tokens\n")


def test_a_tiny_temperature_is_greedy_and_nan_weights_are_named():
    model = model_with_windows(tiny_cfg(vocab_size=EOT_ID + 1))
    greedy = list(generate(model, [11, 12], 6, temperature=0.0, stop_at_eot=False))
    assert list(generate(model, [11, 12], 6, temperature=1e-30, seed=0, stop_at_eot=False)) == greedy
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(EvalError, match="non-finite logits .* for new token 1; its weights are damaged"):
        list(generate(model, [11, 12], 3, temperature=0.8, seed=0))
