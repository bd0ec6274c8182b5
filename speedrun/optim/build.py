"""Partition a model's parameters by ``param.label`` into NorMuon and DistAdam, and the ``Optimizers``
bundle the trainer drives (step timing rules, every-other-step Adam, zeroing, per-rank state).

Step protocol per optimizer step ``step`` (0-based), used by the trainer:

    opt.begin_step(step)
    for each micro-batch:  (before the last one's backward: opt.before_last_backward())  backward
    opt.step(step, lr_multiplier(step, ...), muon_momentum(step, ...))
    opt.zero_grad(step)

With ``adam.every_other_step`` Adam steps only on odd steps (1, 3, 5, ...) with the gradients of
that step and the previous one summed (their grads are not zeroed on even steps); NorMuon steps and
is zeroed every step.
"""
from __future__ import annotations

import torch
from torch import nn

from speedrun.config import OptimConfig
from speedrun.distributed import World
from speedrun.optim.adam import DistAdam
from speedrun.optim.muon import NorMuon

MUON_LABELS = ("attn", "mlp_fc", "mlp_proj", "smear_gate", "attn_gate")
# Adam's labels; each names the AdamConfig field (an AdamGroup) with its lr_mul, betas, wd_mul
ADAM_LABELS = ("embed", "value_embed", "lm_head", "scalars",
               # record 89 (present only with their technique on)
               "bigram_embed", "ve_gate", "resid_lambdas", "post_lambdas", "mudd", "mudd_bias",
               "mudd_gate", "mudd_gate_bias", "gate_constants")

STATE_FORMAT = "speedrun.optim/1"


class Optimizers:
    """The two optimizers and the rules of when each steps. Either may be None (no such params)."""

    def __init__(self, muon: NorMuon | None, adam: DistAdam | None, every_other_step: bool = True,
                 world: World | None = None):
        self.muon, self.adam = muon, adam
        self.every_other_step = every_other_step
        self.world = world or World()
        self._step = 0
        # zero gradients in place instead of dropping them: a recorded CUDA graph accumulates into
        # the very .grad tensors it saw (train/cuda_graph.py)
        self.keep_grads = False

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adam) if o is not None]

    def adam_steps_at(self, step: int) -> bool:
        return not self.every_other_step or step % 2 == 1

    def begin_step(self, step: int) -> None:
        """Call before the micro-steps of ``step``; Adam's hooks stay disarmed until the last one."""
        self._step = step
        if self.adam is not None:
            self.adam.should_sync = False

    def before_last_backward(self) -> None:
        """Call right before the last micro-step's backward: on a step where Adam updates, its
        gradient reduce-scatters are then launched from hooks as backward produces each gradient."""
        if self.adam is not None:
            self.adam.should_sync = self.adam_steps_at(self._step)

    def step(self, step: int, lr_mult: float, momentum: float) -> None:
        if self.muon is not None:
            self.muon.step(lr_mult=lr_mult, momentum=momentum)
        if self.adam is not None and self.adam_steps_at(step):
            self.adam.step(lr_mult=lr_mult)

    def zero_grad(self, step: int) -> None:
        """NorMuon grads every step; Adam grads only after a step where Adam updated."""
        drop = not self.keep_grads
        if self.muon is not None:
            self.muon.zero_grad(set_to_none=drop)
        if self.adam is not None and self.adam_steps_at(step):
            self.adam.zero_grad(set_to_none=drop)

    @property
    def backward_hooks_armed(self) -> bool:
        """True while a backward launches Adam's gradient reduce-scatters from hooks (several ranks,
        last micro-step of a step where Adam updates): that backward must run eagerly."""
        return self.adam is not None and self.adam.should_sync and self.world.world_size > 1

    def copy_adam_state(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """dst's Adam state <- src's (the embedding's untie from the lm_head)."""
        if self.adam is None:
            raise ValueError("copy_adam_state: this model has no Adam parameters")
        self.adam.copy_state(src, dst)

    def reset(self) -> None:
        """Zero all optimizer state (after an untimed warm-up that must not train)."""
        for o in self.optimizers:
            o.reset()

    def state_dict(self) -> dict:
        """This rank's shard of the optimizer state:
        {"format": STATE_FORMAT, "rank", "world_size", "muon": NorMuon.state_dict() | None,
         "adam": DistAdam.state_dict() | None}. Tensors only where state lives on this rank, so the
        trainer saves one file per rank (e.g. optim_rank{r}.pt) and each rank loads its own file;
        resuming needs the same world size (a clear error otherwise)."""
        return {"format": STATE_FORMAT, "rank": self.world.rank, "world_size": self.world.world_size,
                "muon": self.muon.state_dict() if self.muon is not None else None,
                "adam": self.adam.state_dict() if self.adam is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"optimizer state format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if (state["rank"], state["world_size"]) != (self.world.rank, self.world.world_size):
            raise ValueError(f"optimizer state is rank {state['rank']} of world size {state['world_size']}; "
                             f"this process is rank {self.world.rank} of {self.world.world_size} (resume "
                             f"with the same world size, each rank loading its own file)")
        for name, opt in (("muon", self.muon), ("adam", self.adam)):
            if (opt is None) != (state[name] is None):
                raise ValueError(f"optimizer state {'has' if state[name] is not None else 'lacks'} "
                                 f"{name} state but this model {'lacks' if opt is None else 'has'} {name} params")
            if opt is not None:
                opt.load_state_dict(state[name])


def optimizer_of(label: str, cfg: OptimConfig) -> str:
    """"muon" or "adam": which optimizer trains the parameters labelled ``label``."""
    if label == "smear_gate":
        return cfg.smear_gate_optimizer
    if label in MUON_LABELS:
        return "muon"
    if label in ADAM_LABELS:
        return "adam"
    raise ValueError(f"label {label!r}; expected one of {', '.join(MUON_LABELS + ADAM_LABELS)}")


def adam_group(label: str, cfg: OptimConfig) -> dict:
    """The DistAdam param-group settings of an Adam label (its AdamGroup in the config)."""
    ac, group = cfg.adam, getattr(cfg.adam, label)
    return {"lr_mul": group.lr_mul, "betas": tuple(group.betas) or (ac.beta1, ac.beta2),
            "wd_mul": group.wd_mul}


def sparse_bigram_comms(cfg: OptimConfig, world_size: int) -> bool:
    """Whether the bigram table's gradient is reduced as its nonzero rows (optim.adam.sparse_bigram_comms):
    "auto" turns it on from 8 ranks, where each rank's batch touches a small share of the table (the
    record's condition); with fewer, a rank's accumulated batch touches most rows and dense is cheaper."""
    mode = cfg.adam.sparse_bigram_comms
    return world_size > 1 and (mode == "on" or (mode == "auto" and world_size >= 8))


def build_optimizers(model: nn.Module, cfg: OptimConfig, world: World | None = None) -> Optimizers:
    """NorMuon for labels attn/mlp_fc/mlp_proj/attn_gate (and smear_gate unless
    optim.smear_gate_optimizer is adam), DistAdam for the others, one param group per label with
    that label's AdamGroup (lr_mul, betas, wd_mul). Every trainable param must carry a known label."""
    world = world or World()
    mc, ac = cfg.muon, cfg.adam
    muon_groups: dict[str, list] = {}
    adam_groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        label = getattr(p, "label", None)
        try:
            which = optimizer_of(label, cfg)
        except ValueError as e:
            raise ValueError(f"parameter '{name}' has {e}") from None
        (muon_groups if which == "muon" else adam_groups).setdefault(label, []).append(p)

    muon = None
    if muon_groups:
        lr_mul = {"mlp_fc": mc.c_fc_lr_mul, "mlp_proj": mc.c_proj_lr_mul}
        groups = [{"params": ps, "lr_mul": lr_mul.get(label, 1.0)} for label, ps in muon_groups.items()]
        muon = NorMuon(groups, lr=mc.lr, weight_decay=mc.weight_decay, momentum=mc.momentum,
                       beta2=mc.beta2, nesterov=mc.nesterov, normalize=mc.normalize,
                       cautious_weight_decay=mc.cautious_weight_decay, kernel=mc.kernel, world=world,
                       axis=mc.axis, qk_head_pairs=mc.qk_head_pairs, bf16_weights=mc.bf16_weights)
    adam = None
    if adam_groups:
        groups = [{"params": ps, **adam_group(label, cfg)} for label, ps in adam_groups.items()]
        sparse = adam_groups.get("bigram_embed", []) if sparse_bigram_comms(cfg, world.world_size) else []
        adam = DistAdam(groups, lr=ac.lr, betas=(ac.beta1, ac.beta2), eps=ac.eps,
                        weight_decay=ac.weight_decay, cautious_weight_decay=ac.cautious_weight_decay,
                        state_dtype=getattr(torch, ac.state_dtype), world=world, kernel=ac.kernel,
                        decay_form=ac.decay_form, sparse_params=sparse)
    return Optimizers(muon, adam, every_other_step=ac.every_other_step, world=world)
