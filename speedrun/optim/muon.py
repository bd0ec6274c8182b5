"""NorMuon for the block matrices and gates (reference-spec 1.8, 1.12; record 89: r89-training 5.2),
sharded over ranks.

Per param, with g the rank-averaged gradient and mu the (scheduled) momentum:

    m  <- mu*m + (1-mu)*g                    momentum buffer (param dtype; fp32 with bf16_weights)
    u  =  (1-mu)*g + mu*m                    Nesterov-style (nesterov=False: u = m)
    O  =  PolarExpress(M) for each matrix M of u (see "matrices" below)
    s  <- beta2*s + (1-beta2)*mean(O^2, ax)  one statistic per row or per column (see "axis")
    O' =  O / sqrt(max(s, 1e-10)),  then rescaled so ||O'||_F = ||O||_F (per matrix)
    p  <- p - eff_lr * (O' + eff_wd * [O'*p >= 0] * p)

    eff_lr = lr * lr_mult * lr_mul * sqrt(max(1, rows/cols)),   eff_wd = lr_mult * lr * weight_decay

lr_mult is the schedule's multiplier (so decay scales with lr_mult^2, as in the record); lr_mul is a
per-group constant (build.py: c_fc_lr_mul, c_proj_lr_mul); rows/cols is the param's stored shape
(1 for every block matrix of ours; record 89's shape factor 2 of its tall MLP storage is part of
those lr_mul values). normalize=False skips the s/O' lines (plain Muon); cautious_weight_decay=False
drops the sign mask (decoupled decay everywhere).

Matrices: an attention weight (d, 4d) holds [Wq, Wk, Wv, Wo], each (d, d) in (out, in) form and
orthogonalized on its own. With ``qk_head_pairs`` (record 80) Wq and Wk are instead cut into
num_heads/2 row blocks of 2*head_dim rows (the heads 2j, 2j+1), each orthogonalized on its own;
Wv and Wo stay whole. Every other param is one matrix.

Axis of the statistic: ``axis="stored"`` (record 45) takes it from the param's stored shape for all
its matrices: per column if rows < cols, else per row. ``axis="matrix"`` (record 48 on) takes it from
each orthogonalized matrix in (out, in) form: per row (output feature) if out >= in, else per column
(input feature) -- for a non-square matrix one statistic per index of its longer side, for a square
one per output feature. ``mlp_fc`` is stored (in, out), so its rows are the matrix's columns.

``bf16_weights`` (record 57): the block matrices are bf16 (an error otherwise) and for every bf16
param the optimizer keeps the low 16 bits of its fp32 master value in a uint16 ``mantissa`` buffer:
the update runs on the exact fp32 value (bits(p) << 16 | mantissa) and is written back truncating
(the high 16 bits to p, the low 16 bits to the mantissa), so the master copy is exact fp32 at 2 extra
bytes per value. Momentum and second moments are fp32; fp32 params (gates of an fp32 model) are
their own exact masters.

Sharding: params are bucketed by (shape, dtype, statistic size) -- so attention and MLP matrices of
the same shape share a bucket, sorted attention first -- and each bucket is cut into world_size chunks
of ceil(n/world_size) slots (zero-padded). A slot is a whole param; its matrices are cut out on the
rank that owns it. Gradients are stacked and reduce-scattered (AVG), each rank updates its chunk, and
the updated chunks are all-gathered back into every rank's params. All reduce-scatters are launched
first (small buckets first), then per bucket: wait, update, launch the gather; all gathers are
awaited at the end. World size 1 does no communication.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from speedrun.config import MuonAxis, choices
from speedrun.distributed import World, all_gather, reduce_scatter_avg
from speedrun.model.gpt import MATRIX_LABELS
from speedrun.optim.polar_express import polar_express

# Order inside a bucket: attention first, so chunks are runs of one kind (fewer, larger batches).
_LABEL_ORDER = {"attn": 0, "mlp_fc": 1, "mlp_proj": 2, "attn_gate": 3, "smear_gate": 4}
# Labels stored (in, out), i.e. as the transpose of the nn.Linear (out, in) matrix (model contract).
_IN_OUT_LABELS = frozenset({"mlp_fc"})


@dataclass(frozen=True)
class _Piece:
    """``count`` matrices of (rows, cols), stored one after another from element ``offset`` of a
    param, each orthogonalized on its own; the statistic is one per row (per_row) or per column."""
    offset: int
    count: int
    rows: int
    cols: int
    per_row: bool

    @property
    def numel(self) -> int:
        return self.count * self.rows * self.cols

    @property
    def stat_size(self) -> int:
        return self.count * (self.rows if self.per_row else self.cols)


def matrix_plan(p: Tensor, axis: str = "stored", qk_head_pairs: bool = False) -> tuple[_Piece, ...]:
    """How NorMuon cuts one 2-D param into the matrices it orthogonalizes, and each one's axis."""
    R, C = p.shape
    label = getattr(p, "label", None)
    if label == "attn":   # [Wq, Wk, Wv, Wo], each (R, C/4)
        c = C // 4
        if qk_head_pairs:
            heads = getattr(p, "num_heads", None)
            if not isinstance(heads, int) or heads % 2 or R % heads:
                raise ValueError(f"optim.muon.qk_head_pairs: the attention weight of shape {tuple(p.shape)} "
                                 f"has num_heads={heads!r}; head pairs need an even head count that "
                                 f"divides its {R} rows (the model sets param.num_heads)")
            mats = [(0, heads, 2 * R // heads, c), (2 * R * c, 2, R, c)]   # Q, K pair blocks; V, O
        else:
            mats = [(0, 4, R, c)]
    else:
        mats = [(0, 1, R, C)]
    pieces = []
    for offset, count, r, c in mats:
        if axis == "stored":
            per_row = R >= C                      # record 45: the param's stored shape decides
        elif label in _IN_OUT_LABELS:
            per_row = r > c                       # (in, out): the matrix is (c, r); its rows are our columns
        else:
            per_row = r >= c
        pieces.append(_Piece(offset, count, r, c, per_row))
    return tuple(pieces)


@dataclass
class _Bucket:
    params: list[Tensor]       # sorted by label order; slot i of the stacked buffers is params[i]
    groups: list[dict]         # the param group of each param (lr, weight_decay, lr_mul)
    plans: list[tuple]         # the matrix plan of each param (matrix_plan)
    chunk: int                 # slots per rank
    start: int                 # first slot owned by this rank
    real: int                  # slots of this rank that hold a param (the rest is padding)
    momentum: Tensor           # (real, R, C) param dtype (fp32 with bf16_weights)
    second_moment: Tensor      # (real, S) param dtype (fp32 with bf16_weights)
    mantissa: Tensor | None    # (real, R, C) uint16: low 16 bits of the fp32 masters (bf16_weights)

    @property
    def shape(self) -> torch.Size:
        return self.params[0].shape

    def runs(self) -> list[tuple[int, int, tuple]]:
        """Local slot ranges [s, e) whose params share one matrix plan, with that plan."""
        out: list[tuple[int, int, tuple]] = []
        for i in range(self.real):
            plan = self.plans[self.start + i]
            if out and out[-1][2] == plan:
                out[-1] = (out[-1][0], i + 1, plan)
            else:
                out.append((i, i + 1, plan))
        return out


def join_master(p: Tensor, mantissa: Tensor) -> Tensor:
    """The exact fp32 values bits(p) << 16 | mantissa of bf16 p and its uint16 low bits."""
    high = p.view(torch.int16).to(torch.int32) << 16
    return (high | mantissa.to(torch.int32)).view(torch.float32)


def split_master_(master: Tensor, p: Tensor, mantissa: Tensor) -> None:
    """Write fp32 ``master`` as bf16 ``p`` (its high 16 bits: truncation, not rounding) and
    ``mantissa`` (its low 16 bits), in place."""
    bits = master.view(torch.int32)
    p.view(torch.int16).copy_((bits >> 16).to(torch.int16))   # arithmetic shift: fits int16 exactly
    mantissa.copy_((bits & 0xFFFF).to(torch.uint16))


class NorMuon(torch.optim.Optimizer):
    """NorMuon with cautious weight decay. Param groups may set lr, weight_decay, lr_mul; beta2 is
    taken per bucket from its first param's group. Every param must be 2-D.
    axis, qk_head_pairs, bf16_weights: see the module docstring (their off values are record 45)."""

    def __init__(self, params, lr: float = 0.03, weight_decay: float = 1.2, momentum: float = 0.95,
                 beta2: float = 0.95, nesterov: bool = True, normalize: bool = True,
                 cautious_weight_decay: bool = True, kernel: str = "auto", world: World | None = None,
                 axis: str = "stored", qk_head_pairs: bool = False, bf16_weights: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, beta2=beta2, lr_mul=1.0)
        super().__init__(params, defaults)
        if axis not in choices(MuonAxis):
            raise ValueError(f"optim.muon.axis must be one of {choices(MuonAxis)}, got {axis!r}")
        self.nesterov, self.normalize, self.cautious = nesterov, normalize, cautious_weight_decay
        self.axis, self.qk_head_pairs, self.bf16_weights = axis, qk_head_pairs, bf16_weights
        self.kernel = kernel
        self.world = world or World()
        self.buckets = self._make_buckets()

    def _make_buckets(self) -> list[_Bucket]:
        entries = []
        for group in self.param_groups:
            for p in group["params"]:
                name = getattr(p, "label", "?")
                if p.dim() != 2:
                    raise ValueError(f"NorMuon: params must be 2-D, got {name} "
                                     f"of shape {tuple(p.shape)} (use Adam for it)")
                if name == "attn" and p.size(1) % 4:
                    raise ValueError(f"NorMuon: attention weight of shape {tuple(p.shape)} must have "
                                     f"4*d columns ([Wq, Wk, Wv, Wo])")
                if self.bf16_weights and name in MATRIX_LABELS and p.dtype != torch.bfloat16:
                    raise ValueError(f"optim.muon.bf16_weights: the block matrix {name} of shape "
                                     f"{tuple(p.shape)} is {p.dtype}; the model must create it in bfloat16 "
                                     f"(GPT(..., matrix_dtype=torch.bfloat16))")
                entries.append((p, group, matrix_plan(p, self.axis, self.qk_head_pairs)))
        by_key: dict[tuple, list] = {}
        for p, group, plan in entries:
            key = (tuple(p.shape), p.dtype, sum(piece.stat_size for piece in plan))
            by_key.setdefault(key, []).append((p, group, plan))
        W, rank = self.world.world_size, self.world.rank
        buckets = []
        for key in sorted(by_key, key=lambda k: math.prod(k[0]) * len(by_key[k])):  # small first
            members = sorted(by_key[key], key=lambda e: _LABEL_ORDER.get(getattr(e[0], "label", ""), 9))
            n = len(members)
            chunk = -(-n // W)
            start = rank * chunk
            real = max(0, min(chunk, n - start))
            p0 = members[0][0]
            state_dtype = torch.float32 if self.bf16_weights else p0.dtype
            mantissa = self.bf16_weights and p0.dtype == torch.bfloat16   # (fp32 params are exact)
            buckets.append(_Bucket(
                params=[p for p, _, _ in members], groups=[g for _, g, _ in members],
                plans=[plan for _, _, plan in members], chunk=chunk, start=start, real=real,
                momentum=torch.zeros(real, *p0.shape, dtype=state_dtype, device=p0.device),
                second_moment=torch.zeros(real, key[2], dtype=state_dtype, device=p0.device),
                mantissa=(torch.zeros(real, *p0.shape, dtype=torch.uint16, device=p0.device)
                          if mantissa else None)))
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
        grad = grad.to(m.dtype)   # bf16_weights: momentum in fp32 from the bf16 gradient
        m.lerp_(grad, 1 - mu)
        u = grad.lerp(m, mu) if self.nesterov else m

        update = torch.empty(params.shape, dtype=torch.float32, device=params.device)
        flat_u, flat_update = u.view(u.size(0), R * C), update.view(update.size(0), R * C)
        for s, e, plan in b.runs():
            stat_offset = 0
            for piece in plan:
                k, cut = e - s, slice(piece.offset, piece.offset + piece.numel)
                shape = (k, piece.count, piece.rows, piece.cols)
                O = polar_express(flat_u[s:e, cut].view(shape), kernel=self.kernel).float()
                if self.normalize:
                    stat = b.second_moment[s:e, stat_offset:stat_offset + piece.stat_size]
                    stat_offset += piece.stat_size
                    O = self._normalize(O, stat, per_row=piece.per_row, beta2=beta2)
                flat_update[s:e, cut].view(shape).copy_(O)

        eff_lr = self._slot_values(b, lambda g: g["lr"] * lr_mult * g["lr_mul"] * math.sqrt(max(1.0, R / C)))
        eff_wd = self._slot_values(b, lambda g: lr_mult * g["lr"] * g["weight_decay"])
        # bf16_weights: the exact fp32 master value; else the param itself (fp32) or its fp32 copy
        p32 = join_master(params, b.mantissa) if b.mantissa is not None else params.float()
        decay = eff_wd * p32
        if self.cautious:  # decay only where it pushes the same way as the update
            decay = decay * (update * p32 >= 0)
        p32.sub_(eff_lr * (update + decay))
        if b.mantissa is not None:
            split_master_(p32, params, b.mantissa)
        else:
            params.copy_(p32)

    @staticmethod
    def _normalize(O: Tensor, state: Tensor, per_row: bool, beta2: float) -> Tensor:
        """Second-moment normalization of O (k, n, r, c) fp32 with norm restore per matrix; state
        (k, n*r) if per_row else (k, n*c), a view into the bucket's second moments."""
        v = O.square().mean(dim=-1 if per_row else -2, keepdim=True)   # (k, n, r, 1) or (k, n, 1, c)
        s = state.view(v.shape)
        s.lerp_(v.to(s.dtype), 1 - beta2)
        normed = O * s.float().clamp_min(1e-10).rsqrt()
        scale = O.norm(dim=(-2, -1), keepdim=True) / normed.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
        return normed * scale

    # ---- state: this rank's shard only ---------------------------------------------------------

    def reset(self) -> None:
        """Zero momentum, second moments and mantissas (e.g. after an untimed compile warm-up, with
        the params restored: their fp32 masters are then the bf16 values themselves)."""
        for b in self.buckets:
            for t in self._state_tensors(b).values():
                t.zero_()

    @staticmethod
    def _state_tensors(b: _Bucket) -> dict[str, Tensor]:
        out = {"momentum": b.momentum, "second_moment": b.second_moment}
        if b.mantissa is not None:
            out["mantissa"] = b.mantissa
        return out

    def _layout(self) -> list[list]:
        return [[list(b.shape), len(b.params), b.chunk, b.start, b.real] for b in self.buckets]

    def _switches(self) -> dict:
        return {"axis": self.axis, "qk_head_pairs": self.qk_head_pairs, "bf16_weights": self.bf16_weights}

    def state_dict(self) -> dict:
        """{"world_size", "rank", "layout", "switches", "buckets": [{"momentum", "second_moment"
        [, "mantissa"]}]}: the slots this rank owns. Load it on the same rank of a run with the same
        world size, params and switches (axis, qk_head_pairs, bf16_weights)."""
        return {"world_size": self.world.world_size, "rank": self.world.rank, "layout": self._layout(),
                "switches": self._switches(),
                "buckets": [{k: t.clone() for k, t in self._state_tensors(b).items()} for b in self.buckets]}

    def load_state_dict(self, state: dict) -> None:
        # states saved before the switches existed are record 45's
        saved = state.get("switches", {"axis": "stored", "qk_head_pairs": False, "bf16_weights": False})
        if saved != self._switches():
            raise ValueError(f"NorMuon state was saved with optim.muon {saved}; this run has "
                             f"{self._switches()} (resume with the same NorMuon switches)")
        if state.get("layout") != self._layout() or state.get("world_size") != self.world.world_size \
                or state.get("rank") != self.world.rank:
            raise ValueError(f"NorMuon state was saved by rank {state.get('rank')} of world size "
                             f"{state.get('world_size')} with bucket layout {state.get('layout')}; this is "
                             f"rank {self.world.rank} of {self.world.world_size} with {self._layout()}")
        for i, (b, saved) in enumerate(zip(self.buckets, state["buckets"])):
            mine = self._state_tensors(b)
            got = {k: (tuple(t.shape), t.dtype) for k, t in saved.items()}
            want = {k: (tuple(t.shape), t.dtype) for k, t in mine.items()}
            if got != want:
                raise ValueError(f"NorMuon state of bucket {i} (params {list(b.shape)}) holds {got}; this "
                                 f"optimizer has {want} (the params' dtypes differ from the run that saved it)")
            for k, t in mine.items():
                t.copy_(saved[k])
