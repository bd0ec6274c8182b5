"""NorMuon for the block matrices and gates (reference-spec 1.8, 1.12), sharded over ranks.

Per matrix, with g the rank-averaged gradient and mu the (scheduled) momentum:

    m  <- mu*m + (1-mu)*g                    momentum buffer (param dtype)
    u  =  (1-mu)*g + mu*m                    Nesterov-style (nesterov=False: u = m)
    O  =  PolarExpress(u)                    attention (d, 4d) params: 4 separate (d, d) matrices
    s  <- beta2*s + (1-beta2)*mean(O^2, ax)  ax from the param's stored shape: rows < cols -> rows
    O' =  O / sqrt(max(s, 1e-10)),  then rescaled so ||O'||_F = ||O||_F (per matrix)
    p  <- p - eff_lr * (O' + eff_wd * [O'*p >= 0] * p)

    eff_lr = lr * lr_mult * lr_mul * sqrt(max(1, rows/cols)),   eff_wd = lr_mult * lr * weight_decay

lr_mult is the schedule's multiplier (so decay scales with lr_mult^2, as in the record); lr_mul is a
per-group constant (2 for the MLP up-projection). normalize=False skips the s/O' lines (plain Muon);
cautious_weight_decay=False drops the sign mask (decoupled decay everywhere).

Sharding: params are bucketed by (shape, dtype, statistic size) -- so attention and MLP matrices of
the same shape share a bucket, sorted attention first -- and each bucket is cut into world_size chunks
of ceil(n/world_size) slots (zero-padded). Gradients are stacked and reduce-scattered (AVG), each rank
updates its chunk, and the updated chunks are all-gathered back into every rank's params. All
reduce-scatters are launched first (small buckets first), then per bucket: wait, update, launch the
gather; all gathers are awaited at the end. World size 1 does no communication.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from speedrun.distributed import World, all_gather, reduce_scatter_avg
from speedrun.optim.polar_express import polar_express

# Order inside a bucket: attention first, so chunks are runs of one kind (fewer, larger batches).
_LABEL_ORDER = {"attn": 0, "mlp_fc": 1, "mlp_proj": 2, "attn_gate": 3, "smear_gate": 4}


def _is_split(p: Tensor) -> bool:
    """Attention weights (d, 4d) hold [Wq, Wk, Wv, Wo]; each is orthogonalized on its own."""
    return getattr(p, "label", None) == "attn"


def _matrices(x: Tensor, split: bool) -> Tensor:
    """(k, R, C) slots -> the batch of matrices that are orthogonalized: (4k, R, C/4) if split."""
    k, R, C = x.shape
    return x.reshape(4 * k, R, C // 4) if split else x


def _stat_size(shape: torch.Size, split: bool) -> int:
    """Number of second-moment entries of one param (one per column if rows < cols, else per row)."""
    R, C = shape
    r, c = (R, C // 4) if split else (R, C)
    return (4 if split else 1) * (c if R < C else r)


@dataclass
class _Bucket:
    params: list[Tensor]       # sorted by label order; slot i of the stacked buffers is params[i]
    groups: list[dict]         # the param group of each param (lr, weight_decay, lr_mul)
    chunk: int                 # slots per rank
    start: int                 # first slot owned by this rank
    real: int                  # slots of this rank that hold a param (the rest is padding)
    momentum: Tensor           # (real, R, C) param dtype
    second_moment: Tensor      # (real, S) param dtype

    @property
    def shape(self) -> torch.Size:
        return self.params[0].shape

    def runs(self) -> list[tuple[int, int, bool]]:
        """Local slot ranges [s, e) whose params are all split or all whole."""
        out: list[tuple[int, int, bool]] = []
        for i in range(self.real):
            split = _is_split(self.params[self.start + i])
            if out and out[-1][2] == split:
                out[-1] = (out[-1][0], i + 1, split)
            else:
                out.append((i, i + 1, split))
        return out


class NorMuon(torch.optim.Optimizer):
    """NorMuon with cautious weight decay. Param groups may set lr, weight_decay, lr_mul; beta2 is
    taken per bucket from its first param's group. Every param must be 2-D."""

    def __init__(self, params, lr: float = 0.03, weight_decay: float = 1.2, momentum: float = 0.95,
                 beta2: float = 0.95, nesterov: bool = True, normalize: bool = True,
                 cautious_weight_decay: bool = True, kernel: str = "auto", world: World | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2, lr_mul=1.0)
        super().__init__(params, defaults)
        self.nesterov, self.normalize, self.cautious = nesterov, normalize, cautious_weight_decay
        self.kernel = kernel
        self.world = world or World()
        self.buckets = self._make_buckets()

    def _make_buckets(self) -> list[_Bucket]:
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"NorMuon: params must be 2-D, got {getattr(p, 'label', '?')} "
                                     f"of shape {tuple(p.shape)} (use Adam for it)")
                if _is_split(p) and p.size(1) % 4:
                    raise ValueError(f"NorMuon: attention weight of shape {tuple(p.shape)} must have "
                                     f"4*d columns ([Wq, Wk, Wv, Wo])")
                entries.append((p, group))
        by_key: dict[tuple, list] = {}
        for p, group in entries:
            key = (tuple(p.shape), p.dtype, _stat_size(p.shape, _is_split(p)))
            by_key.setdefault(key, []).append((p, group))
        W, rank = self.world.world_size, self.world.rank
        buckets = []
        for key in sorted(by_key, key=lambda k: math.prod(k[0]) * len(by_key[k])):  # small first
            members = sorted(by_key[key], key=lambda e: _LABEL_ORDER.get(getattr(e[0], "label", ""), 9))
            n = len(members)
            chunk = -(-n // W)
            start = rank * chunk
            real = max(0, min(chunk, n - start))
            p0 = members[0][0]
            buckets.append(_Bucket(
                params=[p for p, _ in members], groups=[g for _, g in members], chunk=chunk,
                start=start, real=real,
                momentum=torch.zeros(real, *p0.shape, dtype=p0.dtype, device=p0.device),
                second_moment=torch.zeros(real, key[2], dtype=p0.dtype, device=p0.device)))
        return buckets

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, lr_mult: float = 1.0, momentum: float | None = None) -> None:
        """One update of every param. lr_mult: schedule multiplier; momentum: this step's mu
        (None: the group default). Collective when world_size > 1: every rank must call it."""
        W = self.world.world_size
        grads = []
        for b in self.buckets:  # 1. launch every gradient reduce-scatter
            stacked = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
            if W == 1:
                grads.append((torch.stack(stacked), None))
                continue
            full = b.params[0].new_zeros(b.chunk * W, *b.shape)   # padding slots stay zero
            torch.stack(stacked, out=full[:len(b.params)])
            local = full.new_empty(b.chunk, *b.shape)
            grads.append((local, reduce_scatter_avg(local, full, self.world)))

        gathers = []
        for b, (grad, handle) in zip(self.buckets, grads):  # 2. per bucket: wait, update, gather
            if handle is not None:
                handle.wait()
            mine = b.params[b.start:b.start + b.real]
            send = b.params[0].new_zeros(b.chunk, *b.shape)   # padding slots stay zero
            if b.real:
                torch.stack(mine, out=send[:b.real])
                self._update(b, grad[:b.real], send[:b.real], lr_mult, momentum)
            if W == 1:  # chunk == real == n: write straight back
                torch._foreach_copy_(mine, list(send.unbind(0)))
                continue
            full = send.new_empty(b.chunk * W, *b.shape)
            gathers.append((b, full, all_gather(full, send, self.world)))

        for b, full, handle in gathers:  # 3. every rank gets every updated param
            handle.wait()
            torch._foreach_copy_(b.params, list(full[:len(b.params)].unbind(0)))

    @staticmethod
    def _slot_values(b: _Bucket, fn) -> float | Tensor:
        """fn(group) for each of this rank's slots: a scalar if all agree, else a (real, 1, 1) tensor."""
        vals = [fn(g) for g in b.groups[b.start:b.start + b.real]]
        if all(v == vals[0] for v in vals):
            return vals[0]
        return torch.tensor(vals, dtype=torch.float32).view(-1, 1, 1).to(b.momentum.device, non_blocking=True)

    def _update(self, b: _Bucket, grad: Tensor, params: Tensor, lr_mult: float,
                momentum: float | None) -> None:
        """Update this rank's slots in place: grad, params (real, R, C)."""
        R, C = b.shape
        mu = b.groups[0]["momentum"] if momentum is None else momentum
        beta2 = b.groups[0]["beta2"]

        m = b.momentum
        m.lerp_(grad, 1 - mu)
        u = grad.lerp(m, mu) if self.nesterov else m

        update = torch.empty(params.shape, dtype=torch.float32, device=params.device)
        for s, e, split in b.runs():
            O = polar_express(_matrices(u[s:e], split), kernel=self.kernel).float()
            if self.normalize:
                O = self._normalize(O, b.second_moment[s:e], reduce_rows=R < C, beta2=beta2)
            update[s:e] = O.reshape(e - s, R, C)

        eff_lr = self._slot_values(b, lambda g: g["lr"] * lr_mult * g["lr_mul"] * math.sqrt(max(1.0, R / C)))
        eff_wd = self._slot_values(b, lambda g: lr_mult * g["lr"] * g["weight_decay"])
        p32 = params.float()
        decay = eff_wd * p32
        if self.cautious:  # decay only where it pushes the same way as the update
            decay = decay * (update * p32 >= 0)
        p32.sub_(eff_lr * (update + decay))
        params.copy_(p32)

    @staticmethod
    def _normalize(O: Tensor, state: Tensor, reduce_rows: bool, beta2: float) -> Tensor:
        """Second-moment normalization of O (k, r, c) fp32 with norm restore; state (slots, S)."""
        v = O.square().mean(dim=-2 if reduce_rows else -1, keepdim=True)   # (k, 1, c) or (k, r, 1)
        s = state.view(v.shape)
        s.lerp_(v.to(s.dtype), 1 - beta2)
        normed = O * s.float().clamp_min(1e-10).rsqrt()
        scale = O.norm(dim=(-2, -1), keepdim=True) / normed.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
        return normed * scale

    # ---- state: this rank's shard only ---------------------------------------------------------

    def reset(self) -> None:
        """Zero momentum and second moments (e.g. after an untimed compile warm-up)."""
        for b in self.buckets:
            b.momentum.zero_()
            b.second_moment.zero_()

    def _layout(self) -> list[list]:
        return [[list(b.shape), len(b.params), b.chunk, b.start, b.real] for b in self.buckets]

    def state_dict(self) -> dict:
        """{"world_size", "rank", "layout", "buckets": [{"momentum", "second_moment"}]}: the slots
        this rank owns. Load it on the same rank of a run with the same world size and params."""
        return {"world_size": self.world.world_size, "rank": self.world.rank, "layout": self._layout(),
                "buckets": [{"momentum": b.momentum.clone(), "second_moment": b.second_moment.clone()}
                            for b in self.buckets]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("layout") != self._layout() or state.get("world_size") != self.world.world_size \
                or state.get("rank") != self.world.rank:
            raise ValueError(f"NorMuon state was saved by rank {state.get('rank')} of world size "
                             f"{state.get('world_size')} with bucket layout {state.get('layout')}; this is "
                             f"rank {self.world.rank} of {self.world.world_size} with {self._layout()}")
        for b, s in zip(self.buckets, state["buckets"]):
            b.momentum.copy_(s["momentum"])
            b.second_moment.copy_(s["second_moment"])
