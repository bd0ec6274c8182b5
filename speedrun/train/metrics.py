"""What a run reports: console lines (a live progress line on a terminal, plain lines otherwise), a
JSONL metrics file, a loss-curve PNG, and the FLOP / MFU arithmetic behind the throughput figures.
Only rank 0 writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from speedrun.config import Window
from speedrun.utils import atomic_write_text

# dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s); MFU is reported against these
DATASHEET_BF16_PEAK = {
    "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def device_peak_flops(device_name: str) -> float | None:
    for key, peak in DATASHEET_BF16_PEAK.items():
        if key.lower() in device_name.lower():
            return peak
    return None


def flops_per_token(model_cfg, window: Window, mean_doc_len: float = 1024.0) -> float:
    """Training FLOPs per token: 6 x matmul parameters (forward 2, backward 4) plus attention.

    Attention: per layer and query, QK^T and PV cost 2*2*d FLOPs per attended key forward, 3x that
    with backward; a query attends min(window, its position in the document) keys, which averages
    about min(window, mean_doc_len/2) with causal documents. ``window`` in blocks of
    model_cfg.block_size tokens.
    """
    d, hdim = model_cfg.model_dim, model_cfg.num_heads * model_cfg.head_dim
    attn_layers = [i for i in range(model_cfg.num_layers) if model_cfg.has_attention(i)]
    matmul_params = len(attn_layers) * 4 * d * hdim + model_cfg.num_layers * 2 * d * model_cfg.mlp_dim
    matmul_params += model_cfg.padded_vocab_size * d  # lm_head
    attn = 0.0
    for i in attn_layers:
        blocks = window.long if i in model_cfg.long_window_layers else window.short
        attn += 12 * hdim * min(blocks * model_cfg.block_size, mean_doc_len / 2)
    return 6 * matmul_params + attn


def unigram_entropy(tokens) -> float:
    """Cross-entropy (nats) of a model that knows only the token frequencies of ``tokens``."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a kill (the last one) is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _before_checkpoint(record: dict, step: int) -> bool:
    """Whether a record of the earlier run stays when it resumes from the checkpoint of ``step``:
    training losses of steps up to it (step N's loss is logged before checkpoint N is saved), but not
    the validation at ``step`` (the resumed run validates there again), nor a summary."""
    if "summary" in record:
        return False
    if "resume" in record:
        return isinstance(record["resume"], dict) and record["resume"].get("step", 0) <= step
    at = record.get("step")
    if not isinstance(at, int):
        return False
    return at < step or (at == step and "val_loss" not in record)


class MetricsLogger:
    """Console + JSONL + PNG. ``log`` writes a record; ``progress`` shows a step line."""

    def __init__(self, run_dir: str | None, enabled: bool, total_steps: int, stream=None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.run_dir = run_dir
        self._file = None
        self.history: list[dict] = []
        self._last_plot = 0.0
        # the file is opened at the first record, so a run that fails before it leaves no file (and a
        # resumed run's earlier records are only rewritten once it really continues)
        self._rewrite: list[dict] | None = None

    def resume_at(self, step: int, source_run_dir: str | None, note: dict) -> None:
        """Continue the metrics of the run a checkpoint of step ``step`` came from: its records up to
        the checkpoint are kept (also in the plot), the later ones (steps the resumed run redoes) are
        dropped, and a ``{"resume": ...}`` record marks where the run continued."""
        if not self.enabled:
            return
        records = read_metrics(os.path.join(source_run_dir, "metrics.jsonl")) if source_run_dir else []
        kept = [r for r in records if _before_checkpoint(r, step)]
        self.history = [r for r in kept if "step" in r]
        self._rewrite = kept + [{"resume": {"step": step, **note, "dropped_records": len(records) - len(kept),
                                            "time": time.time()}}]

    def _open(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if self._rewrite is not None:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self._rewrite))
            self._rewrite = None
        self._file = open(path, "a", encoding="utf-8")

    def print(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            print(text, file=self.stream, flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.history.append(record)
        if self.run_dir:
            if self._file is None:
                self._open()
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def progress(self, step: int, loss: float, ms_per_step: float, tokens_per_s: float,
                 mfu: float | None) -> None:
        if not self.enabled:
            return
        mfu_text = f" mfu {100 * mfu:.1f}%" if mfu is not None else ""
        line = (f"step {step:>5}/{self.total_steps} loss {loss:.4f} {ms_per_step:7.1f} ms/step "
                f"{tokens_per_s / 1e3:8.1f}k tok/s{mfu_text}")
        if self.tty:
            width = 24
            filled = int(width * step / max(1, self.total_steps))
            self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (width - filled)}] {line}")
            self.stream.flush()
        else:
            print(line, file=self.stream, flush=True)

    def plot(self, force: bool = False) -> str | None:
        """Write loss_curve.png (train and val loss against step); at most every 30 s unless forced."""
        if not (self.enabled and self.run_dir) or (not force and time.time() - self._last_plot < 30):
            return None
        self._last_plot = time.time()
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        train = [(r["step"], r["train_loss"]) for r in self.history if r.get("train_loss") is not None]
        val = [(r["step"], r["val_loss"]) for r in self.history if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        if train:
            ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
        if val:
            ax.plot(*zip(*val), "o-", ms=3, label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = os.path.join(self.run_dir, "loss_curve.png")
        tmp = path + ".tmp.png"
        fig.savefig(tmp, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self.tty and self.enabled:
            self.stream.write("\n")
        if self._file:
            self._file.close()
            self._file = None
