"""Parallel warm-up: a helper process compiles the evaluation graphs (and JIT-compiles the DC-MHA
and optimizer Triton kernels) while the trainer compiles the training graphs.

Why: torch.compile runs one graph at a time in a process, and the no-grad evaluation graphs at the
validation length are separate graphs from the training ones (about a fifth of a cold start on an
H100). A second process on the same GPU fills the same on-disk compile caches (inductor's FX-graph
and AOTAutograd caches, Triton's kernel cache); when the trainer reaches its own evaluation warm-up
it loads them instead of compiling. Nothing is shared but the cache directory, so a failed or slow
helper only costs what the trainer would have spent anyway: a helper still running when the trainer
gets there is stopped (a warm cache makes the trainer faster than the helper's own start-up) and the
trainer compiles or loads those graphs itself, as without a helper.

This module is the trainer's handle on the helper; the helper's own work is
``python -m speedrun.train.precompile_worker CONFIG_JSON DEVICE`` (cuda:N), which the trainer starts
(``train.parallel_warmup``) on local rank 0 of CUDA runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

# torchrun's variables would make the helper join the process group: it runs alone
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_RUN_ID")


class Precompile:
    """Handle on the helper process (see the module docstring)."""

    def __init__(self, cfg, device: str):
        self.dir = tempfile.mkdtemp(prefix="speedrun-precompile-")
        config_path = os.path.join(self.dir, "config.json")
        cfg.save(config_path)
        env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
        self.log_path = os.path.join(self.dir, "log.txt")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "speedrun.train.precompile_worker", config_path,
                                      device], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def settle(self) -> str:
        """Called when the trainer reaches the graphs the helper compiles: "finished" (its cache
        entries are there to load), "failed", or "stopped": still running, so it is stopped and the
        trainer compiles or loads those graphs itself. Never waits: with a warm cache the trainer's
        own loading (~1.5 s) beats waiting for a helper that is still starting up (15 s on an H100);
        with a cold cache the helper is done long before the training graphs are."""
        rc = self.proc.poll()
        if rc is None:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            return "stopped"
        self._log.close()
        return "finished" if rc == 0 else "failed"

    def tail(self, chars: int = 600) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]
