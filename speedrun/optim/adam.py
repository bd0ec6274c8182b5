"""DistAdam: Adam for embeddings, value embeddings, lm_head and scalars (reference-spec 1.8, 1.12),
with row-sharded state and communication overlapped with the backward pass.

Per param, on the rank-averaged gradient g of this rank's row shard, t = number of Adam steps taken:

    m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g^2           (stored in state_dtype, bf16 in the record)
    eff_lr = lr * lr_mult * lr_mul ;  u = m / (sqrt(v) + eps)
    decay_form "lr" (record 45's form; its weight_decay is 0):
      p <- p - eff_lr * weight_decay * wd_mul * [u*p >= 0] * p  (only if that is > 0; the mask only
                                                                 with cautious_weight_decay)
      p <- p - eff_lr * sqrt(1-b2^t)/(1-b1^t) * u
    decay_form "lr_squared" (records 50+, record 89: weight_decay 0.005, r89-training.md 5.3):
      p <- p - (eff_lr * sqrt(1-b2^t)/(1-b1^t) * u + eff_lr^2 * weight_decay * wd_mul * [u*p > 0] * p)
      (the decay scales with the square of the scheduled lr; a strict cautious mask)

lr_mul, wd_mul, betas and eps are per param group (one group per parameter label, optim/build.py).

Sharding: rank r owns rows [r*N/W, (r+1)*N/W) of a param whose dim 0 divides by the world size and
keeps Adam state only for them. When ``should_sync`` is set (by the Optimizers bundle, for the last
backward of a step that updates Adam) a post-accumulate-grad hook launches each gradient's
reduce-scatter (AVG) as soon as backward has produced it; step() waits per param, updates its shard and
all-gathers the param. Params whose reduce was not launched from a hook are reduced inside step()
(same result, no overlap). ``sparse_params`` (record 89's bigram table on many ranks) are
reduce-scattered as their nonzero rows only (distributed.py:sparse_reduce_scatter_avg). Every other param (0-d, or dim 0 not divisible: the record-89 gates,
lambdas and MUDD weights, a few thousand values) is replicated: its gradient is all-reduced and every
rank updates all of it with full state, as the record does for its small parameters. World size 1:
no hooks, no communication, same math.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from speedrun.distributed import (
    World,
    all_gather,
    all_reduce_avg,
    reduce_scatter_avg,
    sparse_reduce_scatter_avg,
)
from speedrun.kernels.adam_update import adam_update_


class DistAdam(torch.optim.Optimizer):
    """Param groups may set lr, betas, eps, weight_decay, lr_mul and wd_mul."""

    def __init__(self, params, lr: float = 0.008, betas: tuple[float, float] = (0.65, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, cautious_weight_decay: bool = False,
                 state_dtype: torch.dtype = torch.bfloat16, world: World | None = None,
                 kernel: str = "auto", decay_form: str = "lr", sparse_params=()):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_mul=1.0, wd_mul=1.0)
        super().__init__(params, defaults)
        self.cautious = cautious_weight_decay
        if decay_form not in ("lr", "lr_squared"):
            raise ValueError(f"DistAdam: decay_form must be 'lr' or 'lr_squared', got {decay_form!r}")
        self.decay_form = decay_form      # optim.adam.decay_form (see the module docstring)
        self.state_dtype = state_dtype
        self.kernel = kernel              # auto | triton | torch: the fused update or its twin
        self.world = world or World()
        self.should_sync = False          # armed by the bundle for the last backward of a syncing step
        # params whose gradient is reduced as its nonzero rows only (a choice of this run's world
        # size, made by optim/build.py)
        self.sparse = set(sparse_params)
        self._pending: dict[Tensor, tuple[Tensor, object]] = {}
        W = self.world.world_size
        for p in self._params():
            shape = self._shard(p).shape
            self.state[p] = {"step": 0,
                             "exp_avg": torch.zeros(shape, dtype=state_dtype, device=p.device),
                             "exp_avg_sq": torch.zeros(shape, dtype=state_dtype, device=p.device)}
            if W > 1:
                p.register_post_accumulate_grad_hook(self._launch_reduce)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _replicated(self, p: Tensor) -> bool:
        return p.dim() == 0 or p.size(0) % self.world.world_size != 0

    def _shard(self, t: Tensor) -> Tensor:
        """This rank's rows of a sharded param (all of a replicated one)."""
        if self._replicated(t):
            return t
        rows = t.size(0) // self.world.world_size
        return t[self.world.rank * rows:(self.world.rank + 1) * rows]

    def _reduce(self, p: Tensor):
        """Launch the averaging of p's gradient over ranks: (this rank's gradient rows, handle)."""
        if self._replicated(p):
            return all_reduce_avg(p.grad, self.world)
        shard = p.grad.new_empty(p.size(0) // self.world.world_size, *p.shape[1:])
        reduce = sparse_reduce_scatter_avg if p in self.sparse else reduce_scatter_avg
        return shard, reduce(shard, p.grad, self.world)

    def _launch_reduce(self, p: Tensor) -> None:
        if not self.should_sync or p.grad is None:
            return
        self._pending[p] = self._reduce(p)

    @torch.no_grad()
    def step(self, lr_mult: float = 1.0) -> None:
        """Update every param that has a gradient. Collective when world_size > 1."""
        W = self.world.world_size
        gathers = []
        for group in reversed(self.param_groups):          # roughly the order backward produced grads
            for p in reversed(group["params"]):
                if p in self._pending:
                    grad, handle = self._pending.pop(p)
                    handle.wait()
                elif p.grad is None:
                    continue
                elif W > 1:                                # not launched from a hook: reduce now
                    grad, handle = self._reduce(p)
                    handle.wait()
                else:
                    grad = p.grad
                shard = self._shard(p)
                self._update(p, shard, grad, group, lr_mult)
                if W > 1 and not self._replicated(p):
                    gathers.append(all_gather(p, shard, self.world))
        for handle in gathers:
            handle.wait()
        self._pending.clear()
        self.should_sync = False

    def _update(self, p: Tensor, shard: Tensor, grad: Tensor, group: dict, lr_mult: float) -> None:
        b1, b2 = group["betas"]
        state = self.state[p]
        state["step"] += 1
        t = state["step"]
        eff_lr = group["lr"] * lr_mult * group["lr_mul"]
        if self.decay_form == "lr_squared":
            lr_wd = eff_lr ** 2 * group["weight_decay"] * group["wd_mul"]
        else:
            lr_wd = eff_lr * group["weight_decay"] * group["wd_mul"]
        # one pass over p, g, m, v (kernels/adam_update.py; its twin is the plain torch update)
        adam_update_(shard, grad, state["exp_avg"], state["exp_avg_sq"], b1=b1, b2=b2, eps=group["eps"],
                     step_size=eff_lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t), lr_wd=lr_wd,
                     cautious=self.cautious, kernel=self.kernel, decay_form=self.decay_form)

    @torch.no_grad()
    def copy_state(self, src: Tensor, dst: Tensor) -> None:
        """dst's Adam state (step count and this rank's moments) <- src's: both params must have the
        same shape (the untie of the embedding from the lm_head, record 53/61)."""
        if src.shape != dst.shape:
            raise ValueError(f"DistAdam.copy_state: shapes differ, {tuple(src.shape)} vs {tuple(dst.shape)}")
        s, d = self.state[src], self.state[dst]
        d["step"] = s["step"]
        d["exp_avg"].copy_(s["exp_avg"])
        d["exp_avg_sq"].copy_(s["exp_avg_sq"])

    # ---- state: this rank's row shards only ----------------------------------------------------

    def state_dict(self) -> dict:
        """{"world_size", "rank", "shapes", "params": [{"step", "exp_avg", "exp_avg_sq"}]} in param
        order; the moments cover this rank's rows only."""
        params = self._params()
        return {"world_size": self.world.world_size, "rank": self.world.rank,
                "shapes": [list(p.shape) for p in params],
                "params": [{"step": self.state[p]["step"], "exp_avg": self.state[p]["exp_avg"].clone(),
                            "exp_avg_sq": self.state[p]["exp_avg_sq"].clone()} for p in params]}

    def load_state_dict(self, state: dict) -> None:
        params = self._params()
        shapes = [list(p.shape) for p in params]
        if state.get("shapes") != shapes or state.get("world_size") != self.world.world_size \
                or state.get("rank") != self.world.rank:
            raise ValueError(f"DistAdam state was saved by rank {state.get('rank')} of world size "
                             f"{state.get('world_size')} for params {state.get('shapes')}; this is rank "
                             f"{self.world.rank} of {self.world.world_size} with {shapes}")
        for p, s in zip(params, state["params"]):
            self.state[p]["step"] = int(s["step"])
            self.state[p]["exp_avg"].copy_(s["exp_avg"])
            self.state[p]["exp_avg_sq"].copy_(s["exp_avg_sq"])

    def reset(self) -> None:
        for p in self._params():
            st = self.state[p]
            st["step"] = 0
            st["exp_avg"].zero_()
            st["exp_avg_sq"].zero_()
