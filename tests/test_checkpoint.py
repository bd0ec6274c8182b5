"""Checkpoints never lose a run: a kill at any point of a save leaves a run that resumes exactly
(from the previous checkpoint or the new one), and a checkpoint that is incomplete, truncated or not
ours is refused with one line naming the file."""
import json
import os
import pickle

import pytest
import torch
from test_train import micro_config, run_trainer, train_losses, write_synthetic_shards

from speedrun.distributed import init_world
from speedrun.train import checkpoint as ckpt
from speedrun.train.checkpoint import CheckpointError


class RunsCode:
    """Unpickling this calls a function: what a hostile 'checkpoint' would do."""
    def __reduce__(self):
        return (os.getcwd, ())


class Killed(BaseException):
    """Stands for kill -9: no ``except Exception`` sees it, so nothing tidies up after it."""


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")), num_tokens=30000)


def config(shards, run_dir, steps=6):
    cfg = micro_config(*shards, run_dir, steps=steps)
    cfg.train.save_every = 2
    return cfg


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted run: its losses and final weights are what every resumed run must give."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_trainer(config(shards, run_dir))
    with open(run_dir / "checkpoints" / "step_000006" / "model.safetensors", "rb") as f:
        return train_losses(run_dir), f.read()


def save_points(shards, tmp_path) -> list[str]:
    """The labels of the points between the writes of one save, in order."""
    seen = []
    original = ckpt._crash_point
    ckpt._crash_point = seen.append
    try:
        run_trainer(config(shards, tmp_path / "probe", steps=3))
    finally:
        ckpt._crash_point = original
    return seen[:seen.index("published") + 1]   # the first save's


def test_a_kill_at_any_point_of_a_save_resumes_exactly(shards, reference, tmp_path, monkeypatch):
    from speedrun.train.trainer import Trainer
    points = save_points(shards, tmp_path)
    assert points[:4] == ["optim_rank0", "rng_rank0", "buffers_rank0", "grads_rank0"] and "published" in points, points
    (ref_train, ref_val), ref_weights = reference
    for k, point in enumerate(points + ["after the save"]):
        run_dir = tmp_path / f"run{k}"
        calls = []

        def crash(label, point=point):
            calls.append(label)
            # the second save (step 4) dies at this point; "after the save": at the first point of
            # the next save, once the second one is complete
            second = len(points) < len(calls) <= 2 * len(points)
            if second and label == point or point == "after the save" and len(calls) == 2 * len(points) + 1:
                raise Killed(label)
        monkeypatch.setattr(ckpt, "_crash_point", crash)
        with pytest.raises(Killed):
            run_trainer(config(shards, run_dir))
        monkeypatch.setattr(ckpt, "_crash_point", lambda label: None)
        trainer = Trainer(config(shards, run_dir), init_world("cpu"), str(run_dir), resume=str(run_dir))
        published = k >= points.index("published") + 1
        assert trainer.start_step == (4 if published else 2), (point, trainer.start_step)
        trainer.run()
        train, val = train_losses(run_dir)
        for step in range(1, 7):   # bit for bit, including the steps after the resume
            assert train[step] == ref_train[step], (point, step)
        assert val[6] == ref_val[6], point
        with open(run_dir / "checkpoints" / "step_000006" / "model.safetensors", "rb") as f:
            assert f.read() == ref_weights, point


@pytest.fixture
def finished(shards, tmp_path):
    run_dir = tmp_path / "run"
    run_trainer(config(shards, run_dir, steps=4))
    return run_dir, run_dir / "checkpoints" / "step_000004"


def resume(shards, run_dir):
    from speedrun.train.trainer import Trainer
    return Trainer(config(shards, run_dir, steps=4), init_world("cpu"), str(run_dir), resume=str(run_dir))


def test_every_file_is_in_the_manifest(finished):
    _, path = finished
    meta = json.loads((path / "meta.json").read_text())
    assert sorted(meta["files"]) == ["buffers_rank0.pt", "grads_rank0.pt", "model.safetensors", "optim_rank0.pt",
                                     "rng_rank0.pt"]
    for name, size in meta["files"].items():
        assert os.path.getsize(path / name) == size
    assert not any(name.endswith(".incomplete") for name in os.listdir(path.parent))


@pytest.mark.parametrize("damage, message", [
    ("delete grads_rank0.pt", r"grads_rank0\.pt: is listed in meta\.json but missing; this checkpoint is incomplete"),
    ("truncate optim_rank0.pt", r"optim_rank0\.pt: \d+ bytes, but \d+ were written \(meta\.json\); the file is truncated"),
    ("corrupt model.safetensors", r"model\.safetensors: not a readable safetensors file .*corrupt or truncated"),
    ("pickle rng_rank0.pt", r"rng_rank0\.pt: holds Python objects other than tensors .*refused"),
    ("meta step", r"meta\.json: field 'step' is \"four\", expected a whole number >= 0"),
    ("meta loader", r"meta\.json: field 'loader' is missing, expected the loader position"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(finished, shards, damage, message):
    run_dir, path = finished
    action, name = damage.split()
    target = path / name if name != "step" and name != "loader" else path / "meta.json"
    if action == "delete":
        target.unlink()
    elif action == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif action == "corrupt":   # same size, so only the reader can tell
        data = bytearray(target.read_bytes())
        data[:8] = (10**9).to_bytes(8, "little")
        target.write_bytes(bytes(data))
    elif action == "pickle":    # a pickle that would run code; refused, and the manifest updated to let it through
        target.write_bytes(pickle.dumps(RunsCode()))
        meta = json.loads((path / "meta.json").read_text())
        meta["files"][name] = target.stat().st_size
        (path / "meta.json").write_text(json.dumps(meta))
    else:
        meta = json.loads(target.read_text())
        if name == "step":
            meta["step"] = "four"
        else:
            del meta["loader"]
        target.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as e:
        resume(shards, run_dir)
    assert "\n" not in str(e.value)


def test_a_failed_write_keeps_the_previous_checkpoint(shards, tmp_path, monkeypatch):
    """A full disk while saving: an OSError naming the file, no staging folder left behind, and
    `latest` still names the previous complete checkpoint."""
    import errno
    run_dir = tmp_path / "run"
    cfg = config(shards, run_dir, steps=6)
    real_save = torch.save
    saves = []

    def full_disk(obj, f, *a, **kw):
        saves.append(f.name)
        if len(saves) > 4:   # the second checkpoint's first file (optim, rng, buffers, grads each)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        run_trainer(cfg)
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("step_000004.incomplete/optim_rank0.pt")
    checkpoints = run_dir / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["latest", "step_000002"]
    assert (checkpoints / "latest").read_text().strip() == "step_000002"


def test_a_kill_while_a_step_is_saved_again(shards, reference, tmp_path, monkeypatch):
    """A run rolled back to step 2 saves step 4 again while `latest` names the old step 4: the old
    one is set aside, not deleted, until the new one is in place, so a kill in between resumes from
    it."""
    from speedrun.train.trainer import Trainer
    run_dir = tmp_path / "run"
    first = config(shards, run_dir)
    first.train.max_steps = 4
    run_trainer(first)
    checkpoints = run_dir / "checkpoints"

    def crash(label):
        if label == "set aside":
            raise Killed(label)
    monkeypatch.setattr(ckpt, "_crash_point", crash)
    with pytest.raises(Killed):
        Trainer(config(shards, run_dir), init_world("cpu"), str(run_dir), resume=str(checkpoints / "step_000002")).run()
    assert (checkpoints / "latest").read_text().strip() == "step_000004"
    assert not (checkpoints / "step_000004").exists() and (checkpoints / "step_000004.replaced").is_dir()
    monkeypatch.setattr(ckpt, "_crash_point", lambda label: None)
    trainer = Trainer(config(shards, run_dir), init_world("cpu"), str(run_dir), resume=str(run_dir))
    assert trainer.start_step == 4
    trainer.run()
    (ref_train, ref_val), ref_weights = reference
    assert train_losses(run_dir) == (ref_train, ref_val)
    assert (checkpoints / "step_000006" / "model.safetensors").read_bytes() == ref_weights


def test_leftovers_of_a_killed_save_are_cleared_by_the_next_one(shards, tmp_path, monkeypatch):
    """A kill leaves a staging folder; the resumed run's next save removes it (it was never
    published), and a run with no checkpoint at all says how to start it again."""
    from speedrun.train.trainer import Trainer
    run_dir = tmp_path / "run"

    def crash(label):
        if label == "meta.json" and "step_000004" in str(os.listdir(run_dir / "checkpoints")):
            raise Killed(label)
    monkeypatch.setattr(ckpt, "_crash_point", crash)
    with pytest.raises(Killed):
        run_trainer(config(shards, run_dir))
    assert (run_dir / "checkpoints" / "step_000004.incomplete").is_dir()
    monkeypatch.setattr(ckpt, "_crash_point", lambda label: None)
    Trainer(config(shards, run_dir), init_world("cpu"), str(run_dir), resume=str(run_dir)).run()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step_000002", "step_000004", "step_000006"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"this run has no checkpoint .* --save-path .*fresh --overwrite"):
        ckpt.find_checkpoint(str(fresh))
