"""`speedrun seeds` on the CPU micro recipe: one run per seed, statistics of the finished runs,
resuming the harness (finished seeds skipped, an interrupted one continued exactly), errors."""
import json
import os
import shutil

import pytest
from test_train import micro_config, write_synthetic_shards

from speedrun.cli import main
from speedrun.config import ConfigError
from speedrun.train.significance import below_target


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("seeds_data")
    train_glob, val_glob = write_synthetic_shards(str(d))
    cfg = micro_config(train_glob, val_glob, d / "unused", steps=6)
    cfg.train.save_every = 3
    path = str(d / "micro.json")
    cfg.save(path)
    return path


@pytest.fixture(scope="module")
def two_seeds(recipe, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("seeds") / "runs")
    assert main(["seeds", runs, "--runs", "2", "--", "--config", recipe, "--cpu"]) == 0
    return runs


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def test_one_run_per_seed_and_their_statistics(two_seeds, capsys):
    with open(os.path.join(two_seeds, "seeds.json")) as f:
        report = json.load(f)
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    losses = []
    for r in report["runs"]:
        run_dir = os.path.join(two_seeds, f"seed_{r['seed']:04d}")
        with open(os.path.join(run_dir, "config.json")) as f:
            assert json.load(f)["train"]["seed"] == r["seed"]
        assert r["final_val_loss"] == summary(run_dir)["final_val_loss"]
        losses.append(r["final_val_loss"])
    assert losses[0] != losses[1]  # different initializations
    expected = below_target(losses, 3.28).as_dict()
    expected["ci95"] = list(expected["ci95"])  # a JSON list
    assert report["below_target"] == expected
    main(["seeds", two_seeds, "--report", "--target", "6.0"])
    out = capsys.readouterr().out
    assert "n 2 | mean" in out and "target 6.0" in out and "track-1 rule" in out


def test_harness_resumes(recipe, two_seeds, tmp_path, capsys):
    """Finished seeds are not rerun; a seed stopped after a checkpoint is continued and ends exactly
    where an uninterrupted run of that seed ends."""
    runs = str(tmp_path / "runs")
    shutil.copytree(two_seeds, runs)
    before = os.path.getmtime(os.path.join(runs, "seed_0000", "summary.json"))
    # seed 1 "crashed" after its step-3 checkpoint: keep that checkpoint, drop the rest
    seed1 = os.path.join(runs, "seed_0001")
    expected = summary(seed1)["final_val_loss"]
    os.remove(os.path.join(seed1, "summary.json"))
    shutil.rmtree(os.path.join(seed1, "checkpoints", "step_000006"))
    with open(os.path.join(seed1, "checkpoints", "latest"), "w") as f:
        f.write("step_000003\n")
    assert main(["seeds", runs, "--runs", "2", "--", "--config", recipe, "--cpu"]) == 0
    out = capsys.readouterr().out
    assert "seed 0: finished earlier" in out and "seed 1: resuming" in out
    assert os.path.getmtime(os.path.join(runs, "seed_0000", "summary.json")) == before
    assert summary(seed1)["final_val_loss"] == pytest.approx(expected, rel=1e-6)


def test_a_seed_killed_in_its_first_save_starts_again(recipe, two_seeds, tmp_path, capsys):
    """Killed while its first checkpoint was staged: only step_*.incomplete exists and nothing can be
    resumed, so the harness starts that seed again (--overwrite) and it ends as the seed's run did."""
    runs = str(tmp_path / "runs")
    shutil.copytree(two_seeds, runs)
    seed1 = os.path.join(runs, "seed_0001")
    expected = summary(seed1)["final_val_loss"]
    os.remove(os.path.join(seed1, "summary.json"))
    shutil.rmtree(os.path.join(seed1, "checkpoints"))
    os.makedirs(os.path.join(seed1, "checkpoints", "step_000003.incomplete"))
    assert main(["seeds", runs, "--runs", "2", "--", "--config", recipe, "--cpu"]) == 0
    assert "seed 1: training into" in capsys.readouterr().out
    assert summary(seed1)["final_val_loss"] == pytest.approx(expected, rel=1e-6)


def test_against_another_set(two_seeds, capsys):
    assert main(["seeds", two_seeds, "--report", "--against", two_seeds]) == 0
    assert "difference +0.0000" in capsys.readouterr().out
    with open(os.path.join(two_seeds, "seeds.json")) as f:
        assert json.load(f)["against"]["p_value"] == pytest.approx(1.0)


def test_errors(recipe, two_seeds, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--seed.*set by the harness"):
        from speedrun.cli import build_parser
        from speedrun.train.seeds import run_seeds
        args = build_parser().parse_args(["seeds", str(tmp_path / "r"), "--runs", "1"])
        args.overrides = ["--", "--config", recipe, "--seed", "3"]
        run_seeds(args)
    assert main(["seeds", str(tmp_path / "nothing"), "--report"]) == 1  # one-line error, no traceback
    capsys.readouterr()
    assert main(["seeds", str(tmp_path / "bad"), "--runs", "1", "--", "--config",
                 str(tmp_path / "missing.json"), "--cpu"]) == 1
    err = capsys.readouterr().err
    assert "run of seed 0 failed (exit code 1)" in err and "seed_0000/seeds_harness.log" in err
    with open(tmp_path / "bad" / "seed_0000" / "seeds_harness.log") as f:
        assert "missing.json" in f.read()  # the train command's own error is in the log
    one = tmp_path / "one"
    shutil.copytree(os.path.join(two_seeds, "seed_0000"), one / "seed_0000")
    assert main(["seeds", two_seeds, "--report", "--against", str(one)]) == 1
    assert "at least 2 runs" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["seeds", str(tmp_path / "empty"), "--report"]) == 1
    assert "no finished run" in capsys.readouterr().err
