"""CUDA-graph replay of the training micro-step: forward, loss, backward and the accumulation of the
gradients into ``.grad``, recorded once and replayed for every micro-batch (``train.cuda_graphs``).

Why: a micro-step launches ~900 kernels through 13 compiled regions, the autograd engine and the
Python of the custom ops. On an H100 the host needs about as long to issue them as the GPU needs to
run them, so the GPU waits between regions (`speedrun bench --profile` lists the gaps: ~25 ms of a
489 ms step). A replay is one launch: the host is free at once and queues the optimizer and the next
micro-steps meanwhile. (Measured gain +1.3%, not 5%: with the gaps closed the H100 runs into its
power cap and clocks down; docs/benchmarks.md.)

The plain twin is the eager micro-step (``Trainer.micro_step``, which is also what is recorded): the
same kernels in the same order, so a replay computes what it does (tests/test_train_cuda_graph.py: bit-identical
trajectories on the GPU).

What a replay needs, and how this module keeps it true:
* static shapes and no host syncs in the step: the micro-batches of a stage all have the same
  number of tokens and a fixed-length cu_seqlens; windows, YaRN tables and attn_scale are device
  tensors updated in place. A new micro-batch shape (a stage table's batch change, 2 in record 89)
  drops the recording and records again, like a changed host value (below);
* the same memory every time: inputs are copied into static buffers; parameters, their ``.grad``
  and the model's buffers must never be replaced, only updated in place (``load_state_dict`` copies;
  the optimizers zero gradients in place when a graph is in use). After capture every ``.grad`` is
  checked to be the tensor it was before (the autograd engine accumulates out of place when
  something else holds a reference to a gradient; a replay would then write elsewhere);
* lazy initialisation done before capture: the first micro-step runs eagerly on the capture stream
  (real work: it trains), the next one is captured and replayed, the rest are replays;
* host values baked into the recording: FlashAttention's kernels take the window as a host int
  (read from a CPU tensor at launch) and the loss is scaled by 1/accumulation (a Python float), so
  the trainer passes ``host_state`` (the accumulation and, for flash, the window sizes); when it
  changes (a new window stage, 4 times in the record) the graph is dropped, the next micro-step runs
  eagerly and the one after is recorded again (``RecordingPlan``).

Memory: the graph keeps its own pool, the size of one micro-step's activations (the eager
micro-step's blocks go back to the caching allocator). Only forward/backward are recorded: the
optimizer step and validation stay eager (they change with the schedule and run once per step).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from speedrun.config import ConfigError, CudaGraphs, choices
from speedrun.model import flash

MODES = choices(CudaGraphs)


class CudaGraphError(RuntimeError):
    """A micro-step cannot be recorded or replayed safely; the message says why."""
    user_error = True   # the CLI prints the message, not a traceback


def graphs_wanted(mode: str, device: torch.device, compiled: bool, backend: str, world_size: int) -> bool:
    """Whether the trainer replays micro-steps. "auto": on a CUDA device, compiled, one rank, flex
    attention or flash through FlashAttention-4 (the tested paths); "on": any CUDA run (an error
    otherwise); "off": never."""
    if mode not in MODES:
        raise ValueError(f"train.cuda_graphs: {mode!r}, expected one of {', '.join(MODES)}")
    if mode == "off":
        return False
    if device.type != "cuda":
        if mode == "on":
            raise ConfigError(f"train.cuda_graphs: 'on' needs a CUDA device; this run is on {device.type} "
                              "(use auto or off)")
        return False
    if mode == "on":
        return True
    # auto: the tested path (flex, compiled, one rank). Several ranks run their last micro-step
    # eagerly for the gradient hooks (more memory for a smaller gain); uncompiled runs are slow anyway
    if backend == "flash":
        # FA3 runs behind a graph break, never recorded on our machines (it does not install there)
        return compiled and world_size == 1 and flash.flash_attn_impl() == "fa4"
    return compiled and backend == "flex" and world_size == 1


class RecordingPlan:
    """When to run eagerly, record or replay, given the key of each micro-step (its input shapes and
    the host values a recording bakes in): the first micro-step under a new key runs eagerly (lazy
    initialisation), the second is recorded and replayed, the rest are replays. A key that differs
    from the recorded one drops the recording and starts over. Pure logic, tested on the CPU."""

    def __init__(self):
        self.recorded_key: object = None     # the key of the live recording, None if there is none
        self._eager_key: object = None       # the key under which the last eager micro-step ran (keys
        #                                        are never None: None means "none", as for recorded_key)

    def action(self, key) -> str:
        """"eager", "record" or "replay" for a micro-step with ``key``; "drop" is implied (see
        ``drops``) when a recording exists under another key."""
        if self.recorded_key is not None and key == self.recorded_key:
            return "replay"
        if self._eager_key is not None and key == self._eager_key:
            return "record"
        return "eager"

    def drops(self, key) -> bool:
        """Whether the live recording must be dropped before a micro-step with ``key``."""
        return self.recorded_key is not None and key != self.recorded_key

    def ran(self, key, action: str) -> None:
        if action == "eager":
            self.recorded_key, self._eager_key = None, key
        elif action == "record":
            self.recorded_key = key


class MicroStepGraph:
    """Runs ``step(inputs, targets, cu_seqlens) -> summed loss`` (the trainer's eager micro-step, which
    adds the gradients into every ``.grad`` of ``model``) from a recorded graph: ``run(batch)``.
    ``host_state()``, if given, returns the host-side values the step bakes into a recording (compared
    with ==); a change re-records, as does a micro-batch of another shape."""

    def __init__(self, step: Callable[[Tensor, Tensor, Tensor | None], Tensor], model: nn.Module,
                 device: torch.device, host_state: Callable[[], object] | None = None):
        self._step, self.model, self.device = step, model, device
        self.host_state = host_state
        self.plan = RecordingPlan()
        self.recordings = 0
        self.stream = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.replays = 0
        self._static: list[Tensor | None] = []
        self._loss: Tensor | None = None

    def key(self, tensors) -> tuple:
        """What a recording is specific to: the input shapes and the step's host values."""
        shapes = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in tensors)
        return shapes, self.host_state() if self.host_state is not None else None

    def run(self, batch) -> Tensor:
        tensors = (batch.inputs, batch.targets, batch.cu_seqlens)
        key = self.key(tensors)
        if self.plan.drops(key):
            # drop the old recording (its memory pool goes back to the allocator) and start over
            self.graph, self._loss, self._static = None, None, []
            torch.cuda.empty_cache()
        action = self.plan.action(key)
        if action == "eager":
            out = self._on_stream(lambda: self._step(*tensors))
            self.plan.ran(key, action)
            return out
        if action == "record":
            self._capture(tensors)
            self.plan.ran(key, action)
        for dst, src in zip(self._static, tensors):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self._loss

    def _on_stream(self, fn):
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn()
        current.wait_stream(self.stream)
        return out

    def _capture(self, tensors) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # every gradient exists before capture: the graph accumulates in place
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        before = [p.grad for p in params]
        self._static = [t.clone() if t is not None else None for t in tensors]
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, stream=self.stream):
            self._loss = self._step(*self._static)
        replaced = [i for i, (p, g) in enumerate(zip(params, before)) if p.grad is not g]
        if replaced:
            names = {id(p): n for n, p in self.model.named_parameters()}
            shown = ", ".join(names.get(id(params[i]), "?") for i in replaced[:4])
            for p, g in zip(params, before):
                p.grad = g
            raise CudaGraphError(
                f"recording the micro-step replaced the .grad of {len(replaced)} parameters ({shown}...): "
                "something holds a reference to those gradients, so autograd accumulated out of place; "
                "set train.cuda_graphs=off")
        self.graph = graph
        self.recordings += 1
        # the eager micro-step's activations sit cached on the capture stream, where nothing else
        # allocates: give them back (the graph has its own pool)
        torch.cuda.empty_cache()
