"""Causal self-attention over packed documents with a sliding window (reference-spec 1.4), and the
attention backends behind one function, ``attend``.

Owns:
- ``DocInfo`` / ``AttnWindow``: what a batch's documents and a window size mean for the kernels,
  built once per batch (and per window size) on the device, shared by every layer;
- ``attend(q, k, v, doc, window, scale, backend)`` with three backends:
  ``flex``  FlexAttention with a block mask computed from document boundaries + causal + window
            (block-level math on (T/128)^2 entries, never a T x T dense mask);
  ``flash`` FlashAttention-3 or -4 varlen kernels with a left window, when one is importable
            (flash.py: the FA4 custom ops, the FA3 call);
  ``sdpa``  the plain twin: an explicit dense boolean mask and ``scaled_dot_product_attention``;
            for CPU and for tests only (O(T^2) memory).
- ``CausalSelfAttention``: q/k/v projection, QK RMS-norm, rotary, value-embedding mixing,
  attention, per-head sigmoid gate, output projection; and record 89's techniques, each switched
  per layer by the config (structure) or by its ``LayerInputs`` field being given (coefficients):
  paired heads (``to_stream``, ``stream_doc_info``), the partial key offset (``offset_keys``), XSA
  (``xsa``), lightweight DC-MHA (kernels/dc_mha.py), the linear output gate, attention lambdas.

Mask semantics (same for all backends): query i sees key j iff doc(i) == doc(j), j <= i and
i - j <= window_tokens (FlashAttention's window_size=(window_tokens, 0): window_tokens keys back plus
the query itself).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from speedrun.config import AttentionBackend, choices
from speedrun.kernels.dc_mha import dc_mha
from speedrun.model.flash import flash_attn_impl, flash_varlen
from speedrun.model.kv_cache import LayerKV
from speedrun.model.rotary import apply_rotary

FLEX_BLOCK_SIZE = 128     # FlexAttention tile (tokens); the kernels on the GPU are tuned for 128
UNBOUNDED_WINDOW = 1 << 30  # "no window" (int32-safe)
BACKENDS = choices(AttentionBackend)
# FlexAttention kernel options (tile sizes, ...); None = torch's defaults. benchmarks/bench_flex.py
# sweeps candidates.
FLEX_KERNEL_OPTIONS: dict | None = None


# ------------------------------------------------------------------------------------------------
# per-batch / per-window mask data
# ------------------------------------------------------------------------------------------------
class DocInfo(NamedTuple):
    """Documents of one packed batch (tensors live on the batch's device).

    doc_ids: (T,) int32, non-decreasing document index of each token. Tokens before the first
    document start (a validation segment that begins mid-document) form their own document (-1).
    cu_seqlens: (n+1,) int32 starting with 0 and ending with T (repeats allowed), for flash.
    max_seqlen: bound on the longest document, for flash's launch grid (Python int).
    flash_impl: "fa3" | "fa4" for the flash backend (looked up here, outside compiled code)."""
    doc_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    backend: str
    flash_impl: str | None = None


class AttnWindow(NamedTuple):
    """One window size for one batch, shared by every layer that uses it.

    window: () int32 tensor (window in tokens) read by the flex mask_mod and the sdpa mask. It is a
    tensor so that compiled code does not specialize on its value (no recompile on window change).
    host_window: the same as a 0-d CPU tensor, only for flash (its kernels take a host int; a tensor
    keeps compiled code from specializing on the value); None otherwise.
    kv_num_blocks ... full_kv_indices: FlexAttention block-sparsity (flex only; None otherwise)."""
    window: Tensor
    host_window: Tensor | None
    block_size: int
    kv_num_blocks: Tensor | None = None
    kv_indices: Tensor | None = None
    full_kv_num_blocks: Tensor | None = None
    full_kv_indices: Tensor | None = None


class LayerInputs(NamedTuple):
    """Everything one layer's block reads besides the residual stream x, built per layer by
    ``GPT.forward`` (tensors only, so one compiled block serves every layer of its variant):

    x0: the normed embedding; lambdas: (a, b) of x <- a x + b x0 or None; skip / skip_gate: the
    U-net skip activation and its gate logit (the skip's target layer only); ve / value_lambdas:
    the value embedding mixed into v and (l0, l1) of v <- l0 v + l1 ve (attention layers);
    rope: rotary (cos, sin) or None; attn_scale: the 0-d softmax scale; doc / window: the batch's
    documents and this layer's window (None when decoding); kv: this layer's slice of a KV cache
    (decoding only, model/kv_cache.py).

    Record-89 inputs, None where the layer's technique is off (produced by the model's residual
    side, consumed by attention): attn_lambdas: (qkv, o) scalars multiplying [Wq;Wk;Wv] and Wo
    (record 47); with value_lambdas None, ``ve`` is the whole value injection (T, dim) added to v
    (gated value embedding, MUDD value sources); xsa_alpha: (T, H) pre-tanh XSA strengths;
    out_gate: (T, H) linear per-head output gate; dc_weights: (w1, w2), each (T, H), of the
    lightweight DC-MHA (w1 before its RMS norm over heads). The model produces them from the MUDD
    gates or, without those, from learned per-layer constants (model/mudd.py: GateConstants).
    In a paired-head layer ``rope`` holds per-head tables (T, H, D/2) and ``doc`` / ``window``
    describe the 2T-row stream (``stream_doc_info``)."""
    x0: Tensor
    lambdas: tuple[Tensor, Tensor] | None = None
    skip: Tensor | None = None
    skip_gate: Tensor | None = None
    ve: Tensor | None = None
    value_lambdas: tuple[Tensor, Tensor] | None = None
    rope: tuple[Tensor, Tensor] | None = None
    attn_scale: Tensor | float = 1.0
    doc: DocInfo | None = None
    window: AttnWindow | None = None
    kv: LayerKV | None = None
    attn_lambdas: tuple[Tensor, Tensor] | None = None
    xsa_alpha: Tensor | None = None
    out_gate: Tensor | None = None
    dc_weights: tuple[Tensor, Tensor] | None = None


class BackendUnavailable(RuntimeError):
    """An explicitly requested attention backend cannot run here (a user error, printed in one line)."""
    user_error = True


def resolve_backend(name: str, device: torch.device, head_dim: int | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """'auto' -> flash on an H100/H200 (compute capability 9.0) where FlashAttention-4 is importable
    and takes the model's head size and dtype (its kernels are the faster there, docs/benchmarks.md),
    flex on other CUDA devices, sdpa elsewhere (``GPT.attention_backend`` passes head_dim and dtype;
    without them auto never picks flash). An explicit 'flash' without the package is an error
    (never a silent fallback when the user asked for it)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type != "cuda":
            return "sdpa"
        fits = (head_dim is not None and 8 <= head_dim <= 256 and head_dim % 8 == 0
                and dtype in (torch.bfloat16, torch.float16))   # FA4's SM90 limits
        return "flash" if fits and _fa4_on_hopper(device.index) else "flex"
    if name == "flash":
        if device.type != "cuda":
            raise BackendUnavailable("model.attention_backend 'flash' (--use-flash-attn) needs a CUDA "
                                     "device; this run is on the CPU")
        if flash_attn_impl() is None:
            raise BackendUnavailable(
                "attention backend 'flash' requested but no FlashAttention package is importable: "
                "install FlashAttention-3 (module 'flash_attn_interface', built from the "
                "flash-attention repo's hopper/ folder) or FlashAttention-4 (pip package "
                "'flash-attn-4', module 'flash_attn.cute'), or use model.attention_backend=flex")
    return name


@functools.cache
def _fa4_on_hopper(index: int | None) -> bool:
    # FA3 is left to an explicit request: it runs eager behind a graph break, without CUDA graphs,
    # and was never measured faster than flex here; FA4 was measured on SM90 only
    return torch.cuda.get_device_capability(index) == (9, 0) and flash_attn_impl() == "fa4"


def build_doc_info(cu_seqlens: Tensor | None, num_tokens: int, device: torch.device, backend: str,
                   max_seqlen: int | None = None) -> DocInfo:
    """Document ids from cu_seqlens (document starts, then T, padded with T) without host syncs:
    doc(t) = (number of starts <= t) - 1, a searchsorted on the device."""
    if cu_seqlens is None:
        doc_ids = torch.zeros(num_tokens, dtype=torch.int32, device=device)
        # [0, T] made by a kernel, not copied from the host (a host copy can stall the stream)
        cu = torch.arange(2, dtype=torch.int32, device=device) * num_tokens
    else:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        positions = torch.arange(num_tokens, dtype=torch.int32, device=device)
        doc_ids = (torch.searchsorted(cu_seqlens, positions, right=True) - 1).to(torch.int32)
        # a leading 0 makes cu_seqlens valid for flash even when the first start is not 0
        # (an extra empty document when it is)
        cu = F.pad(cu_seqlens, (1, 0)) if backend == "flash" else cu_seqlens
    # the bound holds only for batches whose documents were cut there (one whole-batch document
    # is num_tokens long whatever max_seqlen says)
    if cu_seqlens is None:
        max_seqlen = None
    return DocInfo(doc_ids, cu, num_tokens if max_seqlen is None else min(max_seqlen, num_tokens),
                   backend, flash_attn_impl() if backend == "flash" else None)


def stream_doc_info(doc: DocInfo) -> DocInfo:
    """The documents of a paired-head layer's stream (``to_stream``: row 2t + j belongs to token
    t): doc ids repeated twice, cu_seqlens and max_seqlen doubled (padding entries T become 2T).
    Windows are NOT doubled (the public code's choice): counted in stream rows, a paired layer's
    window reaches about half as many tokens back."""
    doc_ids = doc.doc_ids[:, None].expand(-1, 2).reshape(-1)   # each id twice, no host sync
    return doc._replace(doc_ids=doc_ids, cu_seqlens=doc.cu_seqlens * 2, max_seqlen=2 * doc.max_seqlen)


def flex_block_tensors(doc_ids: Tensor, window: Tensor, block_size: int
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FlexAttention block sparsity for doc & causal & window, from block-level math only.

    For query block a and key block b (tokens [aB, aB+B) and [bB, bB+B)):
      some pair allowed  <=> b <= a, (a-b)B - (B-1) <= W, lo(a) <= hi(b)   (documents overlap)
      every pair allowed <=> b <  a, (a-b)B + (B-1) <= W, lo(a) == hi(a) == lo(b) == hi(b)
    where lo/hi are the first/last document id in a block (doc ids are non-decreasing). Partial
    blocks are evaluated by the mask_mod; full blocks skip it. Costs O((T/B)^2) small int ops."""
    T = doc_ids.numel()
    n = -(-T // block_size)
    # pad with a document id larger than any real one: padded keys never match a real query
    padded = F.pad(doc_ids, (0, n * block_size - T), value=UNBOUNDED_WINDOW).view(n, block_size)
    lo, hi = padded[:, 0], padded[:, -1]
    idx = torch.arange(n, device=doc_ids.device, dtype=torch.int32)
    dist = (idx[:, None] - idx[None, :]) * block_size          # (a - b) * B
    causal = dist >= 0
    any_ok = causal & (dist - (block_size - 1) <= window) & (lo[:, None] <= hi[None, :])
    single = lo == hi
    full = (dist > 0) & (dist + (block_size - 1) <= window) & \
        single[:, None] & single[None, :] & (lo[:, None] == lo[None, :])
    partial = any_ok & ~full

    def to_kv(m: Tensor) -> tuple[Tensor, Tensor]:
        num = m.sum(dim=-1, dtype=torch.int32)
        # listed blocks first (stable: ascending block order among them)
        order = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
        return num[None, None].contiguous(), order.to(torch.int32)[None, None].contiguous()

    kv_num, kv_idx = to_kv(partial)
    full_num, full_idx = to_kv(full)
    return kv_num, kv_idx, full_num, full_idx


def build_window(doc: DocInfo, window: Tensor, window_tokens: int,
                 block_size: int = FLEX_BLOCK_SIZE) -> AttnWindow:
    """The AttnWindow of one window size for one batch (flex block sparsity computed here, once)."""
    if doc.backend == "flex":
        return AttnWindow(window, None, block_size, *flex_block_tensors(doc.doc_ids, window, block_size))
    host = torch.tensor(window_tokens, device="cpu") if doc.backend == "flash" else None
    return AttnWindow(window, host, block_size)


def dense_mask(doc_ids: Tensor, window: Tensor | int) -> Tensor:
    """(T, T) boolean mask: same document, causal, within the window. O(T^2): twin/tests only."""
    pos = torch.arange(doc_ids.numel(), device=doc_ids.device)
    delta = pos[:, None] - pos[None, :]
    return (doc_ids[:, None] == doc_ids[None, :]) & (delta >= 0) & (delta <= window)


# ------------------------------------------------------------------------------------------------
# the one attention function
# ------------------------------------------------------------------------------------------------
def _flex_attend(q: Tensor, k: Tensor, v: Tensor, doc_ids: Tensor, window: AttnWindow) -> Tensor:
    """FlexAttention on (T, H, D) inputs; the BlockMask is assembled here from tensors only.

    Assembling it inside the (compiled) caller rather than passing a BlockMask object in keeps the
    compiled regions' inputs plain tensors: a mask_mod closure created per batch outside would be
    a new Python object each time, which compiled code may guard on (= recompiles)."""
    T = q.shape[0]
    win = window.window

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx <= win)

    block_mask = BlockMask.from_kv_blocks(
        window.kv_num_blocks, window.kv_indices, window.full_kv_num_blocks, window.full_kv_indices,
        BLOCK_SIZE=window.block_size, mask_mod=mask_mod, seq_lengths=(T, T))
    # (1, H, T, D) contiguous: each head's tile is one contiguous slab for the kernel; in a
    # compiled region the copy fuses into the producers (norm / rotary / value mixing)
    qh, kh, vh = (t.unsqueeze(0).transpose(1, 2).contiguous() for t in (q, k, v))
    out = flex_attention(qh, kh, vh, block_mask=block_mask, scale=1.0, kernel_options=FLEX_KERNEL_OPTIONS)
    return out.squeeze(0).transpose(0, 1)


@functools.cache
def _compiled_flex():
    # Outside a compiled region, FlexAttention must still run through its fused kernel: the eager
    # fallback materializes H x T x T scores (25 GB at T=32K). Tensors-only inputs: no recompiles.
    return torch.compile(_flex_attend, dynamic=False, fullgraph=True)


def attend(q: Tensor, k: Tensor, v: Tensor, doc: DocInfo, window: AttnWindow,
           scale: Tensor | float, backend: str) -> Tensor:
    """softmax(scale * q k^T + mask) v for q, k, v of shape (T, H, D); returns (T, H, D).

    ``scale`` may be a 0-d tensor (the YaRN-rescaled attn_scale): it is then folded into q, and the
    kernels run with scale 1, so a changing scale never reaches a kernel argument (no recompile)."""
    if isinstance(scale, Tensor):
        q = q * scale
        scale = 1.0
    elif scale != 1.0:
        q = q * scale
    if backend == "flex":
        fn = _flex_attend
        if q.is_cuda and not torch.compiler.is_compiling():
            fn = _compiled_flex()
        return fn(q, k, v, doc.doc_ids, window)
    if backend == "flash":
        if doc.flash_impl is None:
            resolve_backend("flash", q.device)   # raises the explanatory error
        return flash_varlen(q, k, v, doc.cu_seqlens, doc.max_seqlen, window.host_window, doc.flash_impl)
    if backend == "sdpa":
        mask = dense_mask(doc.doc_ids, window.window)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=mask, scale=1.0)
        return out.transpose(0, 1)
    raise ValueError(f"unknown attention backend {backend!r}")


# ------------------------------------------------------------------------------------------------
# the layer
# ------------------------------------------------------------------------------------------------
def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def to_stream(x: Tensor) -> Tensor:
    """(T, H, D) -> (2T, H/2, D), a row-major reinterpretation (record 89's paired heads): stream
    row 2t holds heads 0..H/2-1 of token t, row 2t+1 heads H/2..H-1, so slot p of the stream holds
    heads p and p+H/2, which share one softmax over both heads' keys. The public code's comments
    say "adjacent heads"; its reshape pairs (h, h+H/2) = (0,3), (1,4), (2,5), replicated here
    (r89-attention.md 2.2). The inverse is ``y.reshape(T, H, D)``."""
    T, H, D = x.shape
    return x.reshape(2 * T, H // 2, D)


def offset_keys(k: Tensor, previous: Tensor | None = None) -> Tensor:
    """Partial key offset (record 49, kept in 89): the stationary dims of key t take key t-1's
    values, so a query matching token t-1's content finds position t (one-layer induction).

    Stationary = the zero-frequency rotary dims: [D/4, D/2) and [3D/4, D) in our split-halves
    rotary (rotary.py), where record 89's interleaved layout has [D/2, D); the two models are the
    same up to a fixed permutation of head dims. A clean one-step shift of the un-shifted keys
    (what the public in-place copy computes under torch.compile), across document boundaries as
    there. Key 0 takes ``previous`` (H, D), the key before it when decoding, or keeps its own."""
    D = k.shape[-1]
    before = torch.cat([k[:1] if previous is None else previous[None], k[:-1]])
    stationary = (torch.arange(D, device=k.device) // (D // 4)) % 2 == 1
    return torch.where(stationary, before, k)


def xsa(y: Tensor, v: Tensor, alpha: Tensor) -> Tensor:
    """Exclusive self attention in record 86's algebraic form: per token and head remove the
    fraction tanh(alpha) of y along the token's own value v,
        y <- y - tanh(alpha) (y . v / max(|v|^2, 1e-8)) v,
    y, v (T, H, D), alpha (T, H) or (1, H) pre-tanh (0 = off)."""
    dot = (y * v).sum(-1, keepdim=True)
    norm2 = v.square().sum(-1, keepdim=True).clamp_min(1e-8)
    strength = torch.tanh(alpha.to(torch.promote_types(alpha.dtype, torch.float32))).to(y.dtype)
    return y - strength[..., None] * (dot / norm2) * v


def dc_mixing_weights(w1: Tensor, w2: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """DC's weights as the public code's ``dc_gate`` makes them: w1 RMS-normed over the heads in
    fp32 (float64 stays float64; eps 1e-6), both in the activation dtype."""
    w1 = F.rms_norm(w1.to(torch.promote_types(w1.dtype, torch.float32)), (w1.shape[-1],), eps=1e-6)
    return w1.to(dtype), w2.to(dtype)


class CausalSelfAttention(nn.Module):
    """q, k, v = rmsnorm(x) W{q,k,v}^T; QK-norm; rotary; v <- l0 v + l1 ve; attention (over the
    batch, or over a KV cache when decoding); per-head sigmoid gate read from the first gate_dim
    dims of the (normed) input; output projection. Record 89 (each off unless its config switch
    or LayerInputs field is given): lambdas on the weights, paired heads, key offset, the whole
    value injection, DC-MHA after attention, XSA, the linear output gate (forward's docstring).

    ``qkvo`` (label "attn") is ONE fp32 parameter of shape (dim, 4*dim) whose memory is four
    stacked dim x dim matrices [Wq, Wk, Wv, Wo] in nn.Linear (out, in) form (``view(4, dim, dim)``),
    so the optimizer can stack it with the MLP matrices of the same shape."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, qk_norm: bool, rotary: bool,
                 attn_gate: bool, gate_dim: int, dtype: torch.dtype, paired: bool = False,
                 key_offset: bool = False, dc_window: int = 112, dc_kernel: str = "auto"):
        """paired / key_offset: this layer's record-89 structure (config lists); dc_window: keys
        of DC's softmax, used where ``LayerInputs.dc_weights`` is given; dc_kernel: dc_mha's
        kernel choice ("auto": Triton on CUDA, "torch": the twin)."""
        super().__init__()
        assert num_heads * head_dim == dim, "num_heads * head_dim must equal model_dim"
        assert not paired or num_heads % 2 == 0, "paired heads need an even head count"
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.qk_norm, self.rotary, self.gate_dim = qk_norm, rotary, gate_dim
        self.paired, self.key_offset = paired, key_offset
        self.dc_window, self.dc_kernel = dc_window, dc_kernel
        self.qkvo = nn.Parameter(torch.empty(dim, 4 * dim))
        self.qkvo.label = "attn"
        self.qkvo.num_heads = num_heads   # NorMuon cuts Wq, Wk per head pair (optim.muon.qk_head_pairs)
        self.gate = None
        if attn_gate:
            self.gate = nn.Linear(gate_dim, num_heads, bias=False, dtype=dtype)
            self.gate.weight.label = "attn_gate"

    def forward(self, x: Tensor, inp: LayerInputs) -> Tensor:
        """x: the normed layer input (T, dim); ``inp`` carries the rest (see LayerInputs).
        Order (r89-attention.md 11): projection, QK-norm, rotary, key offset, value injection,
        attention [+ DC], XSA, gates, output projection."""
        T, H, D = x.shape[0], self.num_heads, self.head_dim
        w = self.qkvo.to(x.dtype).view(4, self.dim, self.dim)   # [Wq, Wk, Wv, Wo]: one cast
        w_qkv, w_o = w[:3].flatten(0, 1), w[3]
        if inp.attn_lambdas is not None:   # record 47: scalars on the weights (a 0-d fp32 keeps bf16)
            w_qkv, w_o = inp.attn_lambdas[0] * w_qkv, inp.attn_lambdas[1] * w_o
        q, k, v = F.linear(x, w_qkv).view(T, 3 * H, D).chunk(3, dim=1)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if self.rotary:
            q, k = apply_rotary(q, *inp.rope), apply_rotary(k, *inp.rope)
        if self.key_offset:
            k = offset_keys(k, inp.kv.previous_key(k) if inp.kv is not None else None)
        if inp.value_lambdas is not None:
            v = inp.value_lambdas[0] * v
            if inp.ve is not None:
                v = v + inp.value_lambdas[1] * inp.ve.view(T, H, D)
        elif inp.ve is not None:           # record 89: the whole value injection, made outside
            v = v + inp.ve.view(T, H, D)
        if self.paired:
            y = self._attend(to_stream(q), to_stream(k), to_stream(v), inp).reshape(T, H, D)
        elif inp.dc_weights is not None:
            q = q * inp.attn_scale         # one scaled q for attention and DC's own softmax
            y = self._attend(q, k, v, inp, scale=1.0)
            w1, w2 = dc_mixing_weights(*inp.dc_weights, q.dtype)
            if inp.kv is not None:
                y = inp.kv.dc(y, q, w1, w2, self.dc_window)
            else:
                y = dc_mha(y, q, k, v, w1, w2, inp.doc.doc_ids, self.dc_window, kernel=self.dc_kernel)
        else:
            y = self._attend(q, k, v, inp)
        if inp.xsa_alpha is not None:
            y = xsa(y, v, inp.xsa_alpha)
        if self.gate is not None:
            # per-head sigmoid gate read from the first gate_dim dims of the (normed) input
            y = y * torch.sigmoid(self.gate(x[:, :self.gate_dim])).unsqueeze(-1)
        if inp.out_gate is not None:       # record 89: linear per-head gate
            y = y * inp.out_gate.to(y.dtype)[..., None]
        return F.linear(y.reshape(T, self.dim), w_o)

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor, inp: LayerInputs, scale: Tensor | float | None = None
                ) -> Tensor:
        """Attention over the batch (inp.doc / inp.window) or, decoding, over the KV cache."""
        scale = inp.attn_scale if scale is None else scale
        if inp.kv is not None:   # decoding: keys and values of earlier tokens come from the cache
            return inp.kv.attend(q, k, v, scale)
        return attend(q, k, v, inp.doc, inp.window, scale, inp.doc.backend)
