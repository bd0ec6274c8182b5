"""The speedrun GPT (reference-spec 1.1-1.7): token embedding, smear, value embeddings, a stack of
blocks with block lambdas, a U-net skip and backout, final norm, (FP8) lm_head, logit softcap and
the cross-entropy loss.

Owns the model's parameters and their labels, the ``scalars`` vector layout, initialization, the
window/YaRN state (``set_window`` / ``reset_window``) and regional compilation
(``compile_regions``). Attention lives in attention.py, rotary/YaRN in rotary.py, the FP8 head
matmul in kernels/fp8.py.

Every technique is switched by a ``ModelConfig`` field; switched off, the math is the plain
transformer's (no extra parameter is used and no extra op is run).

Layers are 0-based: the reference's empty slot 0 is dropped, so reference layer i is layer i-1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig, Window
from speedrun.kernels.fp8 import fp8_active, head_matmul, linear_head
from speedrun.kernels.fp8_head_ce import fp8_head_softcap_ce_fused
from speedrun.kernels.fp8_mlp import FP8MLPState, fp8_mlp_runs_on, fp8_relu2_mlp
from speedrun.kernels.relu2_mlp import relu2_mlp
from speedrun.kernels.softcap_ce import softcapped_cross_entropy
from speedrun.model.attention import (
    FLEX_BLOCK_SIZE,
    UNBOUNDED_WINDOW,
    AttnWindow,
    CausalSelfAttention,
    DocInfo,
    LayerInputs,
    build_doc_info,
    build_window,
    resolve_backend,
    rms_norm,
)
from speedrun.model.flash import flash_attn_impl
from speedrun.model.kv_cache import KVCache
from speedrun.model.rotary import Rotary

EVAL_CHUNK_TOKENS = 16384   # eval logits are made this many tokens at a time (16K x 50304 fp32 = 3.3 GB)
REDUCTIONS = ("sum", "mean", "none")


class ScalarLayout:
    """Offsets in the one fp32 ``scalars`` vector (label "scalars"); L = num_layers:

    [0, L)     skip-gate logits, entry i gates the skip added before layer i (only skip_to_layer
               is used; init skip_gate_init, sigmoid(-1.5) ~ 0.18)
    [L, 3L)    block lambdas (a_i, b_i): x <- a_i x + b_i x0             init (1.1, 0)
    [3L, 5L)   value lambdas (l0_i, l1_i): v <- l0_i v + l1_i ve         init (0.5, 0.5)
    5L         smear lambda                                              init 0
    5L+1       backout lambda                                            init 0.5
    then ones up to a multiple of 8, so the vector shards evenly over 1/2/4/8 ranks.
    Record (L=11): 57 values padded to 64, the reference's length."""

    def __init__(self, num_layers: int):
        L = num_layers
        self.skip, self.block, self.value = 0, L, 3 * L
        self.smear, self.backout = 5 * L, 5 * L + 1
        self.used = 5 * L + 2
        self.size = -(-self.used // 8) * 8

    def initial(self, cfg: ModelConfig) -> Tensor:
        L = cfg.num_layers
        s = torch.ones(self.size)
        s[self.skip:self.skip + L] = cfg.skip_gate_init
        s[self.block:self.block + 2 * L] = torch.tensor([cfg.block_lambda_init, 0.0]).repeat(L)
        s[self.value:self.value + 2 * L] = cfg.value_lambda_init
        s[self.smear] = 0.0
        s[self.backout] = cfg.backout_lambda_init
        return s


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap * sigmoid(z / (cap/4)) = cap/2 * (tanh(z/(cap/2)) + 1): squashes logits into (0, cap)."""
    return cap * torch.sigmoid(logits / (cap / 4)) if cap > 0 else logits


class MLP(nn.Module):
    """relu(x W_fc)^2 W_proj^T (GELU when relu_squared is off). Both weights are fp32 (dim, hidden):
    ``c_fc`` is used as x @ c_fc (stored (in, out)), ``c_proj`` as an nn.Linear weight (out, in).
    With ``fused_mlp`` the relu² MLP on bf16/fp16 CUDA activations runs as one fused op
    (kernels/relu2_mlp.py: relu² and its derivative in Triton matmul epilogues); same parameters.
    With an ``fp8`` state (model.fp8_mlp) the training forward runs both matmuls in FP8 on FP8 GPUs
    (kernels/fp8_mlp.py; its emulating twin on the CPU); evaluation stays bf16/fp32."""

    def __init__(self, dim: int, hidden: int, relu_squared: bool, fused_mlp: bool = False,
                 fp8: FP8MLPState | None = None):
        super().__init__()
        self.relu_squared = relu_squared
        self.fused_mlp = fused_mlp
        self.c_fc = nn.Parameter(torch.empty(dim, hidden))
        self.c_proj = nn.Parameter(torch.empty(dim, hidden))
        self.c_fc.label, self.c_proj.label = "mlp_fc", "mlp_proj"
        self.fp8 = fp8
        if fp8 is not None:
            # the fp8 weight copies are not saved: rebuilt with the loaded scales after any load
            self.register_load_state_dict_post_hook(MLP._requantize_after_load)

    @staticmethod
    def _requantize_after_load(module: "MLP", incompatible_keys) -> None:
        module.fp8.refresh(module.c_fc, module.c_proj, "keep")

    def reset_fp8(self) -> None:
        """The FP8 state of freshly initialised weights (exact scales, activation scales 1.0)."""
        if self.fp8 is not None:
            self.fp8.reset(self.c_fc, self.c_proj)

    def after_optimizer_step(self, step: int) -> None:
        """Re-quantise the FP8 weight copies from the weights optimizer step ``step`` wrote."""
        if self.fp8 is not None:
            self.fp8.after_optimizer_step(self.c_fc, self.c_proj, step)

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8 is not None and self.training and fp8_mlp_runs_on(x):
            return fp8_relu2_mlp(x, self.c_fc, self.c_proj, self.fp8)
        if self.fused_mlp and self.relu_squared and x.is_cuda:
            # the fused op for 16-bit activations, its twin (this method's math) otherwise
            return relu2_mlp(x, self.c_fc, self.c_proj, kernel="auto")
        h = x @ self.c_fc.to(x.dtype)
        h = F.relu(h).square() if self.relu_squared else F.gelu(h)
        return F.linear(h, self.c_proj.to(x.dtype))


class Block(nn.Module):
    """One layer: [skip add] -> x <- a x + b x0 -> x + attn(norm x) -> x + mlp(norm x).

    One class for all layers; everything layer-specific (lambdas, value embedding, window, skip)
    comes in through ``LayerInputs`` as *tensors*, never as Python numbers read from the module.
    That keeps the compiled code identical across layers, so regional compilation compiles it once
    per variant (with/without attention, value embedding, skip) and reuses it for every layer."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, micro_steps: int = 1):
        super().__init__()
        self.attn = None
        if cfg.has_attention(layer):
            self.attn = CausalSelfAttention(cfg.model_dim, cfg.num_heads, cfg.head_dim,
                                            qk_norm=cfg.qk_norm, rotary=cfg.rotary,
                                            attn_gate=cfg.attn_gate, gate_dim=cfg.gate_dim,
                                            dtype=dtype)
        fp8 = FP8MLPState(cfg.model_dim, cfg.mlp_dim, micro_steps, cfg.fp8_mlp_act_headroom,
                          cfg.fp8_mlp_weight_headroom, cfg.fp8_mlp_exact_steps) if cfg.fp8_mlp else None
        self.mlp = MLP(cfg.model_dim, cfg.mlp_dim, cfg.relu_squared, cfg.fused_mlp, fp8)

    def forward(self, x: Tensor, inp: LayerInputs) -> Tensor:
        if inp.skip is not None:
            x = x + torch.sigmoid(inp.skip_gate) * inp.skip
        if inp.lambdas is not None:
            x = inp.lambdas[0] * x + inp.lambdas[1] * inp.x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), inp)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """See the module docstring and docs/architecture.md (model contract)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, *,
                 max_doc_len: int | None = None, flex_block_size: int = FLEX_BLOCK_SIZE,
                 eval_chunk_tokens: int = EVAL_CHUNK_TOKENS, micro_steps: int = 1):
        """``max_doc_len``: the bound on training documents (the loader cuts them there; flash uses
        it as its launch bound, None = the batch length); ``flex_block_size``: FlexAttention's tile;
        ``eval_chunk_tokens``: eval logits are made this many tokens at a time; ``micro_steps``: this
        rank's micro-steps per optimizer step (the trainer's grad_accum), the FP8 MLP's slots of
        delayed activation scales (kernels/fp8_mlp.py)."""
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        assert cfg.num_heads * cfg.head_dim == cfg.model_dim, "num_heads * head_dim != model_dim"
        assert len(cfg.value_embed_layers) == cfg.num_layers, "value_embed_layers: one per layer"
        V, d = cfg.padded_vocab_size, cfg.model_dim
        self.layout = ScalarLayout(cfg.num_layers)

        self.embed = nn.Embedding(V, d)
        self.value_embeds = nn.ModuleList(nn.Embedding(V, d) for _ in range(cfg.num_value_embeds))
        self.smear_gate = nn.Linear(cfg.gate_dim, 1, bias=False) if cfg.smear else None
        self.blocks = nn.ModuleList(Block(cfg, i, dtype, micro_steps) for i in range(cfg.num_layers))
        self.lm_head = nn.Linear(d, V, bias=False)
        self.scalars = nn.Parameter(self.layout.initial(cfg))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale, cfg.block_size)
        # window state: Python ints for bookkeeping, 0-d int32 buffers for the kernels
        self.register_buffer("window_long", torch.tensor(UNBOUNDED_WINDOW, dtype=torch.int32),
                             persistent=False)
        self.register_buffer("window_short", torch.tensor(UNBOUNDED_WINDOW, dtype=torch.int32),
                             persistent=False)
        self.window: Window | None = None        # None: no window (full causal within documents)
        self.yarn_blocks: int | None = None      # the long window the current YaRN state was made for

        self.max_doc_len = max_doc_len
        self.flex_block_size = flex_block_size
        self.eval_chunk_tokens = eval_chunk_tokens
        self._label_parameters()
        self.reset_parameters()
        for m in (self.embed, *self.value_embeds, self.smear_gate, self.lm_head):
            if m is not None:
                m.to(dtype)
        # the regions; compile_regions() swaps in compiled versions
        self._embed_fn = self._embed
        self._train_loss_fn = self._train_loss
        self._final_fn = self._final
        self._token_losses_fn = self._token_losses
        self._logits_fn = self._logits
        self._compiled = False

    # ---- parameters ----------------------------------------------------------------------------
    def _label_parameters(self) -> None:
        self.embed.weight.label = "embed"
        for ve in self.value_embeds:
            ve.weight.label = "value_embed"
        if self.smear_gate is not None:
            self.smear_gate.weight.label = "smear_gate"
        self.lm_head.weight.label = "lm_head"
        self.scalars.label = "scalars"
        missing = [n for n, p in self.named_parameters() if not isinstance(getattr(p, "label", None), str)]
        assert not missing, f"unlabelled parameters: {missing}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spec 1.7: embeddings N(0,1); Wq, Wk, Wv, c_fc uniform(+-sqrt(3)*0.5*dim^-0.5);
        Wo, c_proj, lm_head zero (zero_init_outputs; otherwise the same uniform rule with their own
        fan-in); gates zero; scalars per ScalarLayout."""
        cfg, d = self.cfg, self.cfg.model_dim

        def uniform_(t: Tensor, fan_in: int) -> None:
            bound = math.sqrt(3) * 0.5 * fan_in ** -0.5
            t.uniform_(-bound, bound)

        def output_(t: Tensor, fan_in: int) -> None:
            t.zero_() if cfg.zero_init_outputs else uniform_(t, fan_in)

        self.embed.weight.normal_()
        for ve in self.value_embeds:
            ve.weight.normal_()
        for block in self.blocks:
            if block.attn is not None:
                w = block.attn.qkvo.view(4, d, d)
                uniform_(w[:3], d)
                output_(w[3], d)
                if block.attn.gate is not None:
                    block.attn.gate.weight.zero_()
            uniform_(block.mlp.c_fc, d)
            output_(block.mlp.c_proj, cfg.mlp_dim)
            block.mlp.reset_fp8()
        if self.smear_gate is not None:
            self.smear_gate.weight.zero_()
        output_(self.lm_head.weight, d)
        self.scalars.copy_(self.layout.initial(cfg))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        skip = {"embed", "value_embed"} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if p.label not in skip)

    def inventory(self) -> list[tuple[str, tuple[int, ...], str, str, int]]:
        """(name, shape, dtype, label, count) of every parameter, in registration order."""
        return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.label, p.numel())
                for n, p in self.named_parameters()]

    def format_inventory(self) -> str:
        rows = self.inventory()
        w = max(len(r[0]) for r in rows)
        lines = [f"{'name':<{w}}  {'shape':<14} {'dtype':<9} {'label':<12} {'count':>12}"]
        lines += [f"{n:<{w}}  {str(list(s)):<14} {dt:<9} {lb:<12} {c:>12,}" for n, s, dt, lb, c in rows]
        by_label: dict[str, int] = {}
        for *_, lb, c in rows:
            by_label[lb] = by_label.get(lb, 0) + c
        lines.append("by label: " + ", ".join(f"{k} {v:,}" for k, v in by_label.items()))
        lines.append(f"total {self.num_params():,} ({self.num_params() / 1e6:.1f}M); without "
                     f"embeddings/value embeddings {self.num_params(True):,}")
        return "\n".join(lines)

    # ---- windows -------------------------------------------------------------------------------
    def set_window(self, window: Window, update_yarn: bool = True) -> None:
        """Attention windows (in blocks of cfg.block_size tokens) for short- and long-window layers.

        With update_yarn (and rotary + yarn on) a change of the long window rescales rotary
        frequencies and attn_scale from the window the YaRN state was made for (spec 1.5); the
        first call after construction / reset_window only records it. update_yarn=False (the final
        validation's 13 -> 20) changes the windows but not the YaRN state. Host-side only: the
        device buffers are filled in place (no sync, no recompilation)."""
        window = Window(*window)
        if window.long < 1 or window.short < 1:
            raise ValueError(f"window sizes must be >= 1 block, got {window}")
        if update_yarn and self.yarn_blocks is not None and self.cfg.rotary and self.cfg.yarn:
            self.rotary.yarn_update(self.yarn_blocks, window.long)
        if update_yarn or self.yarn_blocks is None:
            self.yarn_blocks = window.long
        self.window = window
        with torch.no_grad():
            self.window_long.fill_(window.long * self.cfg.block_size)
            self.window_short.fill_(window.short * self.cfg.block_size)

    def reset_window(self) -> None:
        """Base rotary frequencies and attn_scale; no window until the next set_window."""
        self.rotary.reset()
        self.yarn_blocks = self.window = None
        with torch.no_grad():
            self.window_long.fill_(UNBOUNDED_WINDOW)
            self.window_short.fill_(UNBOUNDED_WINDOW)

    def after_optimizer_step(self, step: int) -> None:
        """What follows the weights after optimizer step ``step`` (the trainer calls it): the FP8 MLP's
        weight copies and scales (model.fp8_mlp; nothing otherwise)."""
        if self.cfg.fp8_mlp:
            for block in self.blocks:
                block.mlp.after_optimizer_step(step)

    def fp8_head_active(self, device: torch.device) -> bool:
        """Whether the training head runs in FP8 on ``device`` (model.fp8_head and FP8 hardware)."""
        return fp8_active(self.cfg.fp8_head, device)

    def attention_backend(self, device: torch.device) -> str:
        """The attention backend this model runs on ``device`` (``model.attention_backend`` resolved)."""
        return resolve_backend(self.cfg.attention_backend, device, self.cfg.head_dim, self.dtype)

    # ---- compilation ---------------------------------------------------------------------------
    def compile_regions(self, **compile_kwargs) -> "GPT":
        """Compile each block and the embedding / head / loss regions separately.

        Why regions and not one monolith: the 11 blocks share one code object (``Block.forward``),
        and parameters are graph inputs (dynamo inlines nn.Module parameters), so a block is traced
        and compiled once per variant (attention, MLP+skip) and the cached graph is reused by every
        other layer of the same variant (forward() gives attention layers without a value embedding
        a zero one, so they share the attention graph). Cold compile time is then a few block-sized
        graphs instead of one 11-layer graph (the reference's 7-8 minutes).
        Window sizes, the YaRN frequencies and attn_scale, and the block masks all enter as
        tensors, so changing windows changes inputs, not graphs: no recompilation.
        The Python loop over blocks, the skip/backout bookkeeping and mask building stay eager
        (a few dozen tiny launches per forward)."""
        kw = {"dynamic": False, "fullgraph": True}
        # Block.forward legitimately has several graphs: 2 variants x (train, no-grad eval) x each
        # sequence length used (train, val, HellaSwag...). Room for them (the reference used 64).
        limit = 32
        if self.cfg.attention_backend == "flash" and flash_attn_impl() == "fa3":
            # FlashAttention-3 runs eagerly behind a graph break (model/flash.py); FA4 is traced
            kw["fullgraph"] = False
        dyn = torch._dynamo.config
        name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, name, max(getattr(dyn, name), limit))
        kw.update(compile_kwargs)
        for block in self.blocks:
            block.compile(**kw)
        self._embed_fn = torch.compile(self._embed, **kw)
        self._train_loss_fn = torch.compile(self._train_loss, **kw)
        self._final_fn = torch.compile(self._final, **kw)
        self._token_losses_fn = torch.compile(self._token_losses, **kw)
        self._logits_fn = torch.compile(self._logits, **kw)
        self._compiled = True
        return self

    # ---- regions -------------------------------------------------------------------------------
    def _embed(self, ids: Tensor, previous: Tensor | None = None, start: int = 0
               ) -> tuple[Tensor, list[Tensor], tuple[Tensor, Tensor] | None]:
        """Embedding -> smear -> rmsnorm = x0; value embeddings; rotary tables (cos, sin) for
        positions start.. . ``previous``: the raw embedding of the token before ids[0] (decoding
        with a KV cache); None: ids[0] has no predecessor."""
        cfg = self.cfg
        x = self.embed(ids)
        if self.smear_gate is not None:
            # one-token look-back: x_t += lambda * sigmoid(w . x_t[:gate_dim]) * x_{t-1}
            # (crosses document boundaries, as the reference does)
            first = 1 if previous is None else 0
            before = x[:-1] if previous is None else torch.cat([previous, x[:-1]])
            gate = self.scalars[self.layout.smear] * torch.sigmoid(self.smear_gate(x[first:, :cfg.gate_dim]))
            x = torch.cat([x[:first], x[first:] + gate * before])
        x0 = rms_norm(x)
        ves = [ve(ids) for ve in self.value_embeds]
        rope = self.rotary.cos_sin(ids.numel(), x0.dtype, start=start) if cfg.rotary else None
        return x0, ves, rope

    def _final(self, x: Tensor, backout: Tensor | None) -> Tensor:
        """Backout (subtract the scaled output of backout_layer), then the final rmsnorm."""
        if backout is not None:
            x = x - self.scalars[self.layout.backout] * backout
        return rms_norm(x)

    def _train_loss(self, x: Tensor, backout: Tensor | None, targets: Tensor, use_fp8: bool) -> Tensor:
        """Training loss: summed cross-entropy on softcapped logits kept in the activation dtype
        (bf16 on GPU, as the record), FP8 head matmul when use_fp8. Per-token losses are summed in
        fp32 so the returned value is precise (gradients are those of the plain sum)."""
        xn = self._final(x, backout)
        if use_fp8 and self.cfg.fused_loss and self.cfg.logit_softcap and xn.is_cuda:
            # FP8 head + softcapped CE as one op pair: the backward writes the logit gradient straight
            # to e5m2 (and its transpose), no bf16 gradient, no quantize/transpose pass
            return fp8_head_softcap_ce_fused(xn, self.lm_head.weight, targets, self.cfg.logit_softcap)
        logits = head_matmul(xn, self.lm_head.weight, use_fp8)
        if self.cfg.fused_loss and self.cfg.logit_softcap and logits.is_cuda:
            # one pass over the bf16 logits forward, one backward; softcap computed in fp32 inside
            return softcapped_cross_entropy(logits, targets, self.cfg.logit_softcap, "sum", kernel="triton")
        logits = softcap(logits, self.cfg.logit_softcap)
        return F.cross_entropy(logits, targets, reduction="none").float().sum()

    def _token_losses(self, xn: Tensor, targets: Tensor) -> Tensor:
        """Per-token fp32 losses of a chunk of normed hidden states (eval path, bf16/fp32 head)."""
        logits = softcap(linear_head(xn, self.lm_head.weight).float(), self.cfg.logit_softcap)
        return F.cross_entropy(logits, targets, reduction="none")

    def _logits(self, xn: Tensor) -> Tensor:
        return softcap(linear_head(xn, self.lm_head.weight).float(), self.cfg.logit_softcap)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, inputs: Tensor, targets: Tensor | None = None, cu_seqlens: Tensor | None = None,
                *, reduction: str = "sum", kv_cache: KVCache | None = None) -> Tensor:
        """inputs (T,) token ids; cu_seqlens int32 document starts + T padded with T (None: one
        document). targets None -> fp32 softcapped logits (T, padded_vocab). Otherwise the loss:
        "sum" (training), "mean" (eval, fp32, chunked), "none" (per-token (T,) fp32).

        ``kv_cache`` (decoding, kv_cache.py): ``inputs`` continue the one sequence held in the cache;
        their keys and values are appended to it and each layer attends to the cached positions in
        its window. Returns their logits, equal to the full forward's rows for them."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
        cfg, lay = self.cfg, self.layout
        ids = inputs.reshape(-1)
        T, device = ids.numel(), ids.device
        decoding = kv_cache is not None
        if decoding:
            if targets is not None or cu_seqlens is not None:
                raise ValueError("GPT.forward with a kv_cache decodes one sequence: no targets, no cu_seqlens")
            start = kv_cache.claim(T)
            doc, windows = None, [None] * cfg.num_layers
            # decoding runs the eager modules: compiled regions would specialize on the cache
            x0, ves, rope = self._embed(ids, kv_cache.last_embedding, start)
            kv_cache.last_embedding = self.embed(ids[-1:])
        else:
            backend = self.attention_backend(device)
            # training batches cap documents at max_doc_len (flash's launch bound); eval batches do not
            doc = build_doc_info(cu_seqlens, T, device, backend, self.max_doc_len if self.training else None)
            windows = self._windows(doc)
            x0, ves, rope = self._embed_fn(ids)
        # compiled: attention layers without a value embedding get a zero one, so every attention
        # layer runs one compiled graph (v = l0 v + l1 * 0 = l0 v exactly; l1 gets a zero gradient,
        # as an unused entry of the scalars vector does); one variant fewer to compile, train and eval.
        # It requires grad exactly when the real ones do (else dynamo guards tell them apart); its
        # own gradient (a few pointwise ops per layer) is thrown away with it.
        no_ve = None
        if self._compiled and cfg.value_embeds and not decoding:
            no_ve = x0.new_zeros(x0.shape).requires_grad_(bool(ves) and ves[0].requires_grad)
        # one unbind (a single autograd node) instead of a slice per use
        s = self.scalars.unbind()
        # layer 0 sees x == x0; a separate tensor object (a view) keeps the compiled block from
        # specializing on "x is x0" (an aliasing guard = one more graph to compile)
        x, skip, backout = x0.view_as(x0), None, None
        for i, block in enumerate(self.blocks):
            has_skip = cfg.skip_connection and i == cfg.skip_to_layer
            attn = block.attn is not None
            ve_index = cfg.value_embed_layers[i] if cfg.value_embeds else -1
            inp = LayerInputs(
                x0=x0,
                lambdas=(s[lay.block + 2 * i], s[lay.block + 2 * i + 1]) if cfg.block_lambdas else None,
                skip=skip if has_skip else None,
                skip_gate=s[lay.skip + i] if has_skip else None,
                ve=(ves[ve_index] if ve_index >= 0 else no_ve) if attn else None,
                value_lambdas=(s[lay.value + 2 * i], s[lay.value + 2 * i + 1])
                if cfg.value_embeds and attn else None,
                rope=rope, attn_scale=self.rotary.attn_scale, doc=doc, window=windows[i],
                kv=kv_cache.layer(i, self.window_tokens(i)) if decoding and attn else None)
            x = block.forward(x, inp) if decoding else block(x, inp)
            if cfg.skip_connection and i == cfg.skip_from_layer:
                skip = x
            if cfg.backout and i == cfg.backout_layer:
                backout = x

        if decoding:
            return self._logits(self._final(x, backout))
        if targets is None:
            return self._logits_fn(self._final_fn(x, backout))
        targets = targets.reshape(-1).long()
        if reduction == "sum":
            use_fp8 = self.training and self.fp8_head_active(device)
            return self._train_loss_fn(x, backout, targets, use_fp8)
        # eval: fp32 logits, chunk by chunk, so a 262,144-token forward never holds them all
        xn = self._final_fn(x, backout)
        chunk = self.eval_chunk_tokens
        losses = torch.cat([self._token_losses_fn(xn[i:i + chunk], targets[i:i + chunk])
                            for i in range(0, T, chunk)])
        if reduction == "none":
            return losses
        counted = (targets != -100).sum()   # cross_entropy's ignore_index: mean over real targets
        return losses.sum() / counted.clamp_min(1)

    def window_tokens(self, layer: int) -> int:
        """The attention window of ``layer`` in tokens under the current window config."""
        if self.window is None:
            return UNBOUNDED_WINDOW
        blocks = self.window.long if layer in self.cfg.long_window_layers else self.window.short
        return blocks * self.cfg.block_size

    def _windows(self, doc: DocInfo) -> list[AttnWindow | None]:
        """Per layer: its window's mask data, built once per window size for this batch."""
        cfg, built = self.cfg, {}
        out: list[AttnWindow | None] = []
        for i, block in enumerate(self.blocks):
            if block.attn is None:
                out.append(None)
                continue
            long = i in cfg.long_window_layers
            if long not in built:
                built[long] = build_window(doc, self.window_long if long else self.window_short,
                                           self.window_tokens(i), self.flex_block_size)
            out.append(built[long])
        return out
