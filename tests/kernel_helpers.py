"""Helpers shared by the kernel tests.

- ``run_interpreted``: run a script under Triton's CPU interpreter in a subprocess (TRITON_INTERPRET=1
  only there, so this pytest process never switches Triton into interpreter mode and GPU tests stay
  real), after INTERPRETER_PRELUDE (imports, thread count, ``rel``), and return the JSON the script
  printed after "RESULT ".
- ``small_gpu_model``: the 4-layer bf16 GPT and batch on which the GPU tests compare a fused path of
  the model with its plain twin.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec("triton") is not None


# every interpreted script starts with this: the interpreter switched on before triton is imported,
# json / os / sys / torch, a thread count, and the relative error the scripts report
INTERPRETER_PRELUDE = """\
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
torch.set_num_threads({threads})


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()

"""


def run_interpreted(script: str, tmp_dir, threads: int = 1) -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    # a file, not `python -c`: @triton.jit reads a kernel's source with inspect
    path = os.path.join(str(tmp_dir), "interpret.py")
    with open(path, "w") as f:
        f.write(INTERPRETER_PRELUDE.format(threads=threads) + script)
    env = dict(os.environ, TRITON_INTERPRET="1", TEST_DIR=os.path.join(ROOT, "tests"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, path], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def small_gpu_model(T: int = 8192):
    """(cfg, model, ids, targets): 4 attention layers (one long-window, value embeddings on two),
    bf16 on CUDA, a non-zero head so the loss carries gradient into every layer."""
    from speedrun.config import ModelConfig
    from speedrun.model import GPT
    dev = torch.device("cuda")
    cfg = ModelConfig(num_layers=4, no_attention_layers=[], long_window_layers=[3],
                      value_embed_layers=[0, -1, -1, 0], skip_from_layer=1, skip_to_layer=2, backout_layer=2)
    torch.manual_seed(0)
    model = GPT(cfg, torch.bfloat16).to(dev)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.05)
    g = torch.Generator(device=dev).manual_seed(2)
    ids = torch.randint(0, 50256, (T,), device=dev, generator=g, dtype=torch.int32)
    targets = torch.randint(0, 50256, (T,), device=dev, generator=g)
    return cfg, model, ids, targets
