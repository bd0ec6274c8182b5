"""The training loop: build data / model / optimizers from a Config, warm up (compile) untimed and
restore the state, then run the recipe's steps with gradient accumulation, scheduled lr / momentum /
windows, timed validation pauses, checkpoints, and guards (NaN, Ctrl-C, data exhaustion).

One code path for every world size: rank r of W runs ``grad_accum = micro_batches / W`` micro-steps
per optimizer step, and the optimizers average gradients over ranks, so 1 GPU x 8 micro-steps
follows the 8-GPU trajectory. The batch (and with it the accumulation) is the step's stage's
(``schedules.batch_shape``): the loader, the loss scaling and the CUDA graph follow it each step.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import numpy as np
import torch

from speedrun.config import Config, ConfigError, Window
from speedrun.data.embedded import embedded_shards
from speedrun.data.loader import DataExhaustedError, TrainLoader, ValLoader
from speedrun.data.shards import read_shard, shard_paths
from speedrun.model import GPT, LossWeights
from speedrun.optim.build import build_optimizers
from speedrun.optim.schedules import (
    batch_shape,
    final_window_blocks,
    loss_terms,
    loss_weights,
    lr_multiplier,
    muon_momentum,
    stage_spans,
    window_blocks,
)
from speedrun.train import checkpoint as ckpt
from speedrun.train.cuda_graph import MicroStepGraph, graphs_wanted
from speedrun.train.metrics import MetricsLogger, device_peak_flops, flops_per_token, unigram_entropy
from speedrun.train.precompile import Precompile
from speedrun.train.validation import loss_sum_and_count
from speedrun.utils import atomic_write_text, available_memory


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, data ran out); the message says why and where."""
    user_error = True


@dataclass
class Summary:
    steps: int
    final_val_loss: float | None
    val_unigram_entropy: float | None
    train_time_s: float
    warmup_time_s: float
    peak_memory_gib: float | None
    tokens_per_s: float | None
    run_dir: str
    first_step_s: float | None = None   # this process's first step (it compiles if warmup_compile is off)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def resolve_device(cfg: Config) -> str:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field 'train.device': cuda was requested but no CUDA GPU is visible "
                          "(torch.cuda.is_available() is False)")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """Activation dtype ``train.dtype`` (or eval's --dtype): 'auto' = bf16 on CUDA (as the record
    trains and validates), fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_data(cfg: Config) -> tuple[str, str]:
    """Train / val shard globs; the embedded corpus when none is configured. Fails before any compile."""
    train, val = cfg.data.train_path, cfg.data.val_path
    if not train or not val:
        emb_train, emb_val = embedded_shards()
        train, val = train or emb_train, val or emb_val
    shard_paths(train)  # raises a one-line ShardError naming the pattern if nothing is there
    shard_paths(val)
    return train, val


def use_deterministic_cpu_kernels() -> None:
    """Make CPU runs repeat bit for bit (same seed, same thread count).

    The one nondeterministic op found on the CPU: torch.compile (inductor) lowers the embedding
    backward, an index_put with accumulate, to a C++ loop over the tokens that adds rows with atomic
    adds from all OpenMP threads, so the order of the float additions into a row (and its rounding)
    changes from process to process; eager runs and runs under aot_eager repeat exactly. In
    deterministic mode inductor falls back to ATen's index_put, which accumulates serially. Applies
    to the whole process (PyTorch has no narrower switch); ops without a deterministic version only
    warn. Uninitialized memory is not filled with NaN (determinism's other default): that costs a pass
    over every new buffer and fixes nothing a correct program reads."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def replay_windows(model, schedule, step: int) -> Window:
    """Reset the model's windows and YaRN state, then apply every window change of steps 0..step
    in order (YaRN updates compound, so a jump must replay them). Returns step's window."""
    model.reset_window()
    current = None
    for span in stage_spans(schedule):
        if span.start > step and current is not None:
            break
        if span.end > span.start and span.window != current:
            model.set_window(span.window, update_yarn=True)
            current = span.window
    return current


class Trainer:
    def __init__(self, cfg: Config, world, run_dir: str, resume: str | None = None, stream=None):
        self.cfg = cfg.validate()
        self.world = world
        self.run_dir = run_dir
        self.device = world.device
        self.dtype = resolve_dtype(cfg.train.dtype, self.device.type)
        # the first stage's; train_step sets each step's (the number of micro-batches it is given)
        self.grad_accum = cfg.grad_accum(world.world_size)
        if self.device.type == "cpu":
            use_deterministic_cpu_kernels()
        self.total_steps = cfg.schedule.total_steps
        # where this run stops: the schedule's end unless train.max_steps cuts it short
        self.end_step = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        # before anything is built: resuming with another recipe is a clear error, not a size mismatch
        changes = ckpt.resume_changes(resume, cfg) if resume else {}
        self.train_glob, self.val_glob = resolve_data(cfg)
        self.log = MetricsLogger(run_dir, world.is_main, self.total_steps, stream=stream)
        self._stop_requested = False

        t = time.perf_counter()
        phases = self.setup_phases = {}   # seconds per setup phase, for `speedrun bench`

        def done(name: str) -> None:
            nonlocal t
            now = time.perf_counter()
            phases[name], t = now - t, now

        # an absurd size is refused before it is allocated: weights, gradients and optimizer state
        # are at least three copies of the parameters in the model dtype
        cfg.model.check_fits(available_memory(self.device), 3 * self.dtype.itemsize, str(self.device))
        self._init_loss_weights()
        torch.manual_seed(cfg.train.seed)
        # built on the device: initializing 190M parameters there takes milliseconds, on the host
        # seconds (CUDA draws its init from the CUDA generator, seeded by manual_seed above)
        with torch.device(self.device):
            # the loader cuts training documents at the stage's cap: the model's bound is the largest;
            # micro_steps: the FP8 MLP keeps a delayed activation scale per micro-step (kernels/fp8_mlp.py)
            self.model = GPT(cfg.model, dtype=self.dtype,
                             max_doc_len=max(shape.max_doc_len for shape in cfg.batch_shapes()),
                             matrix_dtype=torch.bfloat16 if cfg.optim.muon.bf16_weights else torch.float32,
                             micro_steps=max(shape.grad_accum(world.world_size) for shape in cfg.batch_shapes()),
                             prefix_loss=bool(self.loss_terms and self.loss_terms.prefix))
        self._broadcast_parameters()
        done("model")
        self.optimizers = build_optimizers(self.model, cfg.optim, world)
        done("optimizers")
        self.micro_graph = None   # replays the forward/backward micro-step (train.cuda_graphs)
        backend = self.model.attention_backend(self.device)
        if graphs_wanted(cfg.train.cuda_graphs, self.device, cfg.train.compile, backend, world.world_size):
            # a recording bakes in the loss scale 1/grad_accum, the embedding's tie to the lm_head (it
            # reads the table it was recorded with) and, for flash (whose kernels take the window as a
            # host value at launch), the window sizes: re-record when any of them changes
            flash_windows = backend == "flash"
            self.micro_graph = MicroStepGraph(
                self.micro_step, self.model, self.device,
                host_state=lambda: (self.grad_accum, self.model.embed_tied,
                                    self.model.window if flash_windows else None))
            self.optimizers.keep_grads = True
        self.loader = self._train_loader()
        done("loader")
        self.start_step, self.train_time_ms = 0, 0.0
        if resume:
            state = ckpt.load_checkpoint(resume, self.model, self.optimizers, world)
            self._load_pending_grads(state.rank_state.get("grads", {}))
            self.loader.load_state_dict(state.loader_state)
            self.start_step, self.train_time_ms = state.step, state.train_time_ms
            # metrics.jsonl continues the run's: the records up to the checkpoint, then a mark
            self.log.resume_at(state.step, ckpt.run_dir_of(state.path),
                               {"checkpoint": state.path, "changed": changes})
        # the checkpoint of a step after the untie holds the embedding's own weights and state
        self.model.embed_tied = cfg.embed_tied_at(self.start_step)
        self.window: Window | None = None  # the windows currently applied to the model
        self.warmup_phases: dict[str, float] = {}
        self.first_step_s: float | None = None   # set by run(): the first step's seconds
        self.warmup_helper: str | None = None   # parallel warm-up helper: finished / stopped / failed
        self.peak_flops = (device_peak_flops(torch.cuda.get_device_name(self.device))
                           if self.device.type == "cuda" else None)

    # ---- setup helpers --------------------------------------------------------------------------
    def _init_loss_weights(self) -> None:
        """The MTP / prefix loss weights of every step as one device table, and the buffer the
        micro-steps read (``loss_weights``, views of it; None: next-token loss only). train_step copies
        its step's row into the buffer on the device: no host transfer, and a CUDA graph recorded
        with the buffer reads each step's values."""
        sched = self.cfg.schedule
        self.loss_terms = loss_terms(sched)
        self.untie_step = self.cfg.untie_step()
        self._loss_weight_table = self.loss_weights = None
        if self.loss_terms is None:
            return
        rows = [loss_weights(step, sched, self.loss_terms) for step in range(self.total_steps)]
        self._loss_weight_table = torch.tensor(rows, dtype=torch.float32, device=self.device)
        self._loss_weight_buffer = self._loss_weight_table[0].clone()
        k = self.loss_terms.num_mtp
        self.loss_weights = LossWeights(self._loss_weight_buffer[:k],
                                        self._loss_weight_buffer[k] if self.loss_terms.prefix else None)

    def _broadcast_parameters(self) -> None:
        for p in self.model.parameters():
            self.world.broadcast_(p.data)

    def _train_loader(self):
        c = self.cfg
        shape = batch_shape(0, c)   # until next_batches passes a step's own
        return TrainLoader(self.train_glob, tokens_per_step=shape.tokens_per_step,
                           sequence_tokens=shape.micro_batch_tokens, world_size=self.world.world_size,
                           rank=self.world.rank, max_doc_len=shape.max_doc_len, bos_id=c.data.bos_id,
                           wrap=c.data.wrap, async_loading=c.data.async_loading, device=str(self.device),
                           max_num_docs_rule=c.data.max_num_docs_rule, vocab_size=c.model.vocab_size)

    def val_loader(self) -> ValLoader:
        """This rank's share of the validation tokens (a fresh pass over the fixed first N)."""
        c = self.cfg
        return ValLoader(self.val_glob, num_tokens=c.train.val_tokens,
                         sequence_tokens=c.train.val_sequence_tokens, world_size=self.world.world_size,
                         rank=self.world.rank, bos_id=c.data.bos_id, device=str(self.device),
                         max_num_docs_rule=c.data.max_num_docs_rule, vocab_size=c.model.vocab_size)

    def next_batches(self, step: int, loader: TrainLoader | None = None) -> list:
        """This rank's micro-batches of optimizer step ``step``, in order, at that step's batch
        (from the trainer's loader, or ``loader``)."""
        try:
            return (loader or self.loader).next_step(batch_shape(step, self.cfg))
        except DataExhaustedError as e:
            raise TrainingError(f"{e} (stopped before step {step}; set data.wrap=true to cycle the data)") from None

    def close(self) -> None:
        """Stop the loader's background thread (the trainer is not used afterwards)."""
        self.loader.close()

    # ---- windows ----------------------------------------------------------------------------------
    def apply_window(self, step: int) -> None:
        """Bring the model's attention windows (and YaRN state) to what ``step`` uses.

        YaRN updates compound over window changes, so on a jump (resume) the changes are replayed
        from the base frequencies in order.
        """
        target = window_blocks(step, self.cfg.schedule)
        if target == self.window:
            return
        if self.window is None or target.long < self.window.long:
            self.window = replay_windows(self.model, self.cfg.schedule, step)
        else:
            self.model.set_window(target, update_yarn=True)
            self.window = target

    # ---- one optimizer step ---------------------------------------------------------------------
    def micro_step(self, inputs, targets, cu_seqlens, mark=None) -> torch.Tensor:
        """Forward and backward of one micro-batch (gradients added into .grad); its summed loss as
        an fp32 device tensor. What a CUDA graph records (train/cuda_graph.py) and its eager twin."""
        loss = self.model(inputs, targets, cu_seqlens, reduction="sum", loss_weights=self.loss_weights)
        if mark:
            mark("forward")
        (loss / self.grad_accum).backward()
        if mark:
            mark("backward")
        return loss.detach().float()

    def train_step(self, step: int, batches, mark=None) -> torch.Tensor:
        """Forward/backward over this rank's micro-batches, then the optimizer step. Returns the
        mean per-token training loss of this rank as a device tensor (no host sync); with MTP /
        prefix weights (a stage table's) it is the weighted objective, not the next-token loss.
        ``mark(phase)``, if given, is called as each phase ends ("forward", "backward" per
        micro-batch, or "forward_backward" for a CUDA-graph replay, then "optimizer"): ``speedrun bench``
        times the phases with it. The gradient is the mean over the micro-batches (of every rank)
        of their summed losses: each micro-step's loss is scaled by 1/len(batches)."""
        self.grad_accum = len(batches)   # the step's stage's accumulation (next_batches)
        if self._loss_weight_table is not None:   # the step's MTP / prefix weights, in place
            self._loss_weight_buffer.copy_(self._loss_weight_table[min(step, self.total_steps - 1)])
        self.optimizers.begin_step(step)
        total = torch.zeros((), device=self.device, dtype=torch.float32)
        for i, batch in enumerate(batches):
            if i == len(batches) - 1:
                self.optimizers.before_last_backward()
            if self.micro_graph is not None and not self.optimizers.backward_hooks_armed:
                total += self.micro_graph.run(batch)  # forward + backward, one replay
                if mark:
                    mark("forward_backward")
            else:
                total += self.micro_step(batch.inputs, batch.targets, batch.cu_seqlens, mark)
        self.optimizers.step(step, lr_multiplier(step, self.cfg.schedule),
                             muon_momentum(step, self.cfg.optim.muon, self.cfg.schedule))
        self.model.after_optimizer_step(step)   # the FP8 MLP's weight copies follow the new weights
        self.optimizers.zero_grad(step)
        if self.model.embed_tied and step == self.untie_step:
            self.untie_embed()
        if mark:
            mark("optimizer")
        return total / (self.grad_accum * batches[0].inputs.numel())

    def untie_embed(self) -> None:
        """After this step's update the embedding is its own parameter (model.untie_after_step or
        model.untie_at_stage, record 53/61): it starts from the lm_head's weights and Adam state (step count, moments), so
        training continues exactly as if the two had been one parameter until now."""
        self.model.untie_embed()
        self.optimizers.copy_adam_state(self.model.lm_head.weight, self.model.embed.weight)

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        total = self.world.all_reduce_(loss_sum_and_count(self.model, self.val_loader(), self.device))
        self.model.train()
        return float(total[0] / total[1])

    # ---- warm-up ----------------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compile every graph the run will need (both Adam step kinds, every micro-batch size of
        the schedule, eval) on throwaway batches, then restore model and optimizer state: the
        warm-up trains nothing."""
        if not self.cfg.train.compile:
            return 0.0
        t0 = time.perf_counter()
        helper = None
        if self.cfg.train.warmup_compile and self.cfg.train.parallel_warmup \
                and self.device.type == "cuda" and self.world.local_rank == 0:
            helper = Precompile(self.cfg, str(self.device))  # compiles the eval graphs meanwhile
        self.model.compile_regions(dynamic=self.cfg.compile_dynamic())
        if not self.cfg.train.warmup_compile:
            return time.perf_counter() - t0
        model_state = copy.deepcopy(self.model.state_dict())
        optim_state = copy.deepcopy(self.optimizers.state_dict())
        embed_tied = self.model.embed_tied
        loader = self._train_loader()
        val_batch = next(iter(self.val_loader()))
        phases = self.warmup_phases = {"compile_regions": time.perf_counter() - t0}
        last = time.perf_counter()

        def done(name: str) -> None:  # seconds per warm-up phase (synced), for `speedrun bench`
            nonlocal last
            self._sync()
            now = time.perf_counter()
            if name not in phases or now - last >= 1.0:   # not once per remaining micro-batch
                # compiling a recipe's graphs can take minutes: say where the warm-up is
                self.log.print(f"warm-up {name}: {now - last:.1f}s")
            phases[name] = phases.get(name, 0.0) + now - last
            last = now

        def first_step(phase: str) -> None:  # step 0: first forward / backward (the compiles), rest
            done(f"step0_{phase}" + ("_rest" if f"step0_{phase}" in phases else ""))

        try:
            # every backend reads window sizes and YaRN state from tensors (flash: a CPU tensor), so
            # every window stage runs the graphs compiled for the first one (tests/test_train.py and
            # tests/test_model_gpt.py check that nothing recompiles): steps 0 and 1 cover them all
            self.apply_window(0)
            for step in (0, 1):  # an even and an odd step: Muon alone, then Muon + Adam
                self.train_step(step, self.next_batches(step, loader), mark=first_step if step == 0 else None)
                done(f"step{step}")
            # static compiled regions are specialised on the micro-batch's length: one step at the
            # first step of each stage with a new one (a stage table's batch growth) compiles its
            # graphs (train.compile_dynamic: reuses them; the step still records its CUDA graph)
            seen = {batch_shape(0, self.cfg).micro_batch_tokens}
            for span in stage_spans(self.cfg.schedule):
                shape = batch_shape(span.start, self.cfg)
                if span.end > span.start and shape.micro_batch_tokens not in seen:
                    seen.add(shape.micro_batch_tokens)
                    self.apply_window(span.start)
                    self.train_step(span.start, self.next_batches(span.start, loader))
                    done(f"stage{span.index}")
            if helper is not None:  # its eval graphs are in the cache if it has finished
                self.warmup_helper = helper.settle()
                if self.warmup_helper == "failed":
                    self.log.print("parallel warm-up helper failed; compiling its graphs here. "
                                   f"Its log ends: {helper.tail()}")
                helper = None
            self.warm_eval(val_batch)
            done("eval0")
        finally:
            loader.close()
            if helper is not None:  # an exception before it was settled: do not leave it running
                helper.settle()
        self.model.load_state_dict(model_state)
        self.optimizers.load_state_dict(optim_state)
        self.model.embed_tied = embed_tied   # a warm-up step may have been the untie
        self.optimizers.zero_grad(1)  # odd step: drop every gradient
        self.model.reset_window()
        self.window = None
        self._sync()
        return time.perf_counter() - t0

    @torch.no_grad()
    def warm_eval(self, batch) -> float:
        """One validation forward on ``batch`` (compiles the eval graphs); its mean loss."""
        self.model.eval()
        loss = self.model(batch.inputs, batch.targets, batch.cu_seqlens, reduction="mean")
        self.model.train()
        return float(loss)

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, next_step: int, loader_state: dict) -> str:
        # Adam keeps the gradients of even steps to sum them with the next step's: they are part of
        # the checkpoint, written with the rest before it is published (gradients kept as zeros for
        # a CUDA graph are not pending: leave them out, as if dropped)
        grads = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None
                 and not (self.optimizers.keep_grads and not p.grad.any())}
        return ckpt.save_checkpoint(self.run_dir, next_step, self.model, self.optimizers, loader_state,
                                    self.world, self.train_time_ms, self.cfg.to_dict(),
                                    rank_state={"grads": grads})

    def _load_pending_grads(self, grads: dict) -> None:
        for n, p in self.model.named_parameters():
            p.grad = grads.get(n)

    # ---- the run ---------------------------------------------------------------------------------
    def _install_sigint(self):
        def handler(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.log.print("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")
        try:
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. in tests)
            return None

    def _stop_agreed(self) -> bool:
        if self.world.world_size == 1:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        return bool(self.world.all_reduce_(flag, "max").item())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self) -> Summary:
        cfg, log = self.cfg, self.log
        if self.world.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            cfg.save(os.path.join(self.run_dir, "config.json"))
        log.print(f"run dir {self.run_dir} | device {self.device} x{self.world.world_size} | "
                  f"{self.model.num_params() / 1e6:.1f}M params | grad_accum {self.grad_accum} | "
                  f"steps {self.start_step}->{self.total_steps} | train {self.train_glob}")
        if cfg.schedule.stages:
            for span in stage_spans(cfg.schedule):
                shape = batch_shape(span.start, cfg)
                log.print(f"  stage {span.index}: steps {span.start}-{span.end - 1} | {shape.tokens_per_step} "
                          f"tokens/step = {shape.micro_batches} x {shape.micro_batch_tokens} (grad_accum "
                          f"{shape.grad_accum(self.world.world_size)}) | documents <= {shape.max_doc_len} | "
                          f"windows {tuple(span.window)} | lr_mul {span.stage.lr_mul}")
        warmup_s = self.warmup()
        # without the warm-up, torch.compile compiles on the first step (and the first validation):
        # that step's time is the figure to show, not the near-zero warm-up
        lazy_compile = cfg.train.compile and not cfg.train.warmup_compile
        if warmup_s and not lazy_compile:
            log.print(f"compile + warm-up: {warmup_s:.1f} s (untimed; state restored)")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        previous_handler = self._install_sigint()
        val_loss = None
        step = self.start_step
        last_good = None
        # the logged ms/step and tokens/s: training time (train_time_ms) per step since the last
        # log, so validations, checkpoints and logging in between are not counted as steps
        last_log_train_ms, last_log_step = self.train_time_ms, step
        tokens_per_s = None
        # Training time runs from a sync after each untimed stretch (validation, checkpoint) to the
        # sync before the next one, with log steps synced too: no step waits for the GPU otherwise,
        # so the host queues the next step while the GPU finishes this one.
        timed_from = None

        def stop_timing() -> None:
            nonlocal timed_from
            if timed_from is not None:
                self._sync()
                self.train_time_ms += 1e3 * (time.perf_counter() - timed_from)
                timed_from = None

        try:
            while True:
                last = step >= self.end_step
                if last or (cfg.train.val_every and step % cfg.train.val_every == 0) or step == self.start_step == 0:
                    stop_timing()
                    if last and step == self.total_steps:
                        self.apply_window(step - 1)
                        self.model.set_window(final_window_blocks(cfg.schedule), update_yarn=False)
                        self.window = None  # forces a replay if anything runs after this
                    else:
                        self.apply_window(step)
                    val_loss = self.validate()
                    log.print(f"step {step}/{self.total_steps} val_loss {val_loss:.4f} "
                              f"train_time {self.train_time_ms / 1e3:.1f}s")
                    log.log({"step": step, "val_loss": val_loss, "train_time_ms": self.train_time_ms})
                    log.plot(force=last)
                if last:
                    break
                self.apply_window(step)
                if timed_from is None:
                    self._sync()
                    timed_from = time.perf_counter()
                loss = self.train_step(step, self.next_batches(step))
                step += 1
                logging_now = step % cfg.train.log_every == 0 or step == self.end_step
                first = self.first_step_s is None
                if logging_now or first or self.device.type == "cpu":
                    self._sync()
                now = time.perf_counter()
                if first:
                    self.first_step_s = now - timed_from
                    if lazy_compile:
                        log.print(f"first step {self.first_step_s:.1f} s (torch.compile compiled the training "
                                  f"graphs in it: train.warmup_compile is false, so this is training time)")
                self.train_time_ms += 1e3 * (now - timed_from)
                timed_from = now
                if logging_now:
                    loss_value = self._mean_over_ranks(loss)
                    if cfg.train.nan_guard and not math.isfinite(loss_value):
                        where = f"; last good checkpoint: {last_good}" if last_good else ""
                        raise TrainingError(f"training loss is {loss_value} at step {step - 1}; "
                                            f"stopped{where}")
                    ms = (self.train_time_ms - last_log_train_ms) / max(1, step - last_log_step)
                    # a stage table's batch changes: the mean batch of the steps since the last log
                    tokens = sum(batch_shape(s, cfg).tokens_per_step for s in range(last_log_step, step))
                    tokens_per_s = tokens / max(1, step - last_log_step) / (ms / 1e3)
                    last_log_train_ms, last_log_step = self.train_time_ms, step
                    mfu = self.mfu(tokens_per_s)
                    log.progress(step, loss_value, ms, tokens_per_s, mfu)
                    log.log({"step": step, "train_loss": loss_value, "ms_per_step": ms,
                             "tokens_per_s": tokens_per_s, "mfu": mfu,
                             "train_time_ms": self.train_time_ms})
                    log.plot()
                    timed_from = time.perf_counter()  # the GPU waited for logging: not training time
                save_now = cfg.train.save_every and step % cfg.train.save_every == 0
                # ranks agree on a Ctrl-C through an all-reduce, a host sync: only on log steps
                ask = logging_now or self.world.world_size == 1
                if save_now or (ask and self._stop_agreed()):
                    stop_timing()
                    last_good = self.save(step, self.loader.state_dict())
                    if self._stop_requested:
                        log.print(f"saved {last_good}; stopping at step {step} on request")
                        raise KeyboardInterrupt
            stop_timing()
            if last_good != ckpt.checkpoint_dir(self.run_dir, step):   # not saved at this step already
                last_good = self.save(step, self.loader.state_dict())
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            self.loader.close()
        return self._finish(val_loss, warmup_s, tokens_per_s)

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        return float(self.world.all_reduce_(value.clone())) / self.world.world_size

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilization of ``tokens_per_s`` (all ranks) at the current windows; None where
        the device's peak is unknown (CPU, unlisted GPUs)."""
        if not self.peak_flops or self.window is None:
            return None
        fpt = flops_per_token(self.cfg.model, self.window)
        return fpt * tokens_per_s / (self.peak_flops * self.world.world_size)

    def _finish(self, val_loss, warmup_s, tokens_per_s) -> Summary:
        peak = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        entropy = None
        if self.world.is_main:
            entropy = self._val_unigram_entropy()
        summary = Summary(steps=self.end_step, final_val_loss=val_loss, val_unigram_entropy=entropy,
                          train_time_s=self.train_time_ms / 1e3, warmup_time_s=warmup_s,
                          peak_memory_gib=peak, tokens_per_s=tokens_per_s, run_dir=self.run_dir,
                          first_step_s=self.first_step_s)
        lines = [f"final val loss {val_loss:.4f}"]
        if entropy is not None:
            lines.append(f"unigram entropy of the val tokens {entropy:.4f} "
                         f"(a model knowing only token frequencies); gap {entropy - val_loss:.3f} nats")
        if self.cfg.train.compile and not self.cfg.train.warmup_compile and self.first_step_s is not None:
            start = f", of which the first step (compiling) {self.first_step_s:.1f} s"
        else:
            start = f" | compile+warm-up {warmup_s:.1f} s" if self.cfg.train.compile else ""
        lines.append(f"train time {summary.train_time_s:.1f} s{start}"
                     + (f" | peak memory {peak:.2f} GiB" if peak is not None else ""))
        for line in lines:
            self.log.print(line)
        self.log.log({"summary": summary.as_dict()})
        if self.world.is_main:
            atomic_write_text(os.path.join(self.run_dir, "summary.json"), json.dumps(summary.as_dict(), indent=1))
        self.log.close()
        return summary

    def _val_unigram_entropy(self) -> float:
        need, parts = self.cfg.train.val_tokens, []
        for path in shard_paths(self.val_glob):
            tokens = read_shard(path)
            parts.append(np.asarray(tokens[:need]))
            need -= len(parts[-1])
            if need <= 0:
                break
        return unigram_entropy(np.concatenate(parts))
