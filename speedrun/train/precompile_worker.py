"""The parallel warm-up helper's work (train/precompile.py explains why it exists): build the run's
trainer from its saved config, JIT-compile the DC-MHA kernels (record 89) and the optimizers' Triton
kernels and compile the evaluation graphs into the shared on-disk caches, then exit.

Run as ``python -m speedrun.train.precompile_worker CONFIG_JSON DEVICE`` by ``Precompile``.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from speedrun.config import Config
from speedrun.distributed import World
from speedrun.kernels import dc_mha
from speedrun.train.trainer import Trainer


def run(config_path: str, device: str) -> float:
    """The helper's work (see the module docstring); returns the eval loss it computed."""
    cfg = Config.load(config_path)
    cfg.train.parallel_warmup = False
    cfg.train.cuda_graphs = "off"  # it runs no training step
    world = World(device=torch.device(device))
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    trainer = Trainer(cfg, world, os.path.dirname(config_path))
    trainer.close()
    model = trainer.model
    m = cfg.model
    if m.dc_layers and m.fused_dc:
        # first: the trainer's own first DC call comes within its first region traces
        t0 = time.perf_counter()
        if dc_mha.warm_kernels(m.num_heads, m.head_dim, m.dc_window, model.dtype, world.device):
            print(f"DC-MHA kernels compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    if cfg.train.compile:
        model.compile_regions(dynamic=cfg.compile_dynamic())   # the trainer's graphs exactly
    # one optimizer step of each kind on random gradients: the Triton kernels of Polar Express and
    # Adam are JIT-compiled into Triton's on-disk cache (this copy of the model is thrown away)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    trainer.optimizers.step(1, 1.0, cfg.optim.muon.momentum)
    trainer.apply_window(0)
    loss = trainer.warm_eval(next(iter(trainer.val_loader())))
    print(f"precompile done: eval loss {loss:.4f}", flush=True)
    return loss


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
