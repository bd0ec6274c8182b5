"""The same command twice on a CPU gives the same run, bit for bit (same seed, same thread count).

What broke it: torch.compile lowers the embedding backward to atomic adds from all OpenMP threads,
so rows were summed in a different order in each process (Trainer: use_deterministic_cpu_kernels)."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
from test_train import _cli_env, micro_config, run_trainer, write_synthetic_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")), num_tokens=40000)


def run_record(run_dir) -> tuple[list, str]:
    """(every metrics record but timings, sha256 of the final weights)."""
    records = []
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        records.append({k: v for k, v in r.items() if k in ("step", "train_loss", "val_loss")})
    weights = os.path.join(run_dir, "checkpoints", "step_000030", "model.safetensors")
    return records, hashlib.sha256(open(weights, "rb").read()).hexdigest()


def test_a_cpu_trainer_uses_deterministic_kernels(shards, tmp_path):
    import torch

    from speedrun.distributed import init_world
    from speedrun.train.trainer import Trainer
    torch.use_deterministic_algorithms(False)
    Trainer(micro_config(*shards, tmp_path, steps=30), init_world("cpu"), str(tmp_path)).loader.close()
    assert torch.are_deterministic_algorithms_enabled()


def test_thirty_eager_steps_twice_are_identical(shards, tmp_path):
    for name in ("a", "b"):
        run_trainer(micro_config(*shards, tmp_path / name, steps=30))
    assert run_record(tmp_path / "a") == run_record(tmp_path / "b")


@pytest.mark.slow
def test_thirty_compiled_steps_in_two_processes_are_identical(shards, tmp_path):
    """Two `speedrun train` processes with torch.compile (inductor's C++ kernels, two threads): the
    same losses and weights bit for bit. One compile cache for both keeps it quick; the atomic adds
    it replaced made runs differ also when the second one loaded the first one's kernels."""
    cfg = micro_config(*shards, "", steps=30)
    cfg.train.compile, cfg.train.warmup_compile = True, False
    config = tmp_path / "compiled.json"
    cfg.save(str(config))
    env = {**_cli_env(), "OMP_NUM_THREADS": "2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-m", "speedrun", "train", "--config", str(config), "--cpu",
                               "--save-path", str(tmp_path / name)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_record(tmp_path / "a") == run_record(tmp_path / "b")
