"""The speedrun GPT (reference-spec 1.1-1.7, head-spec.md): token embedding, smear, value embeddings,
a stack of blocks with block lambdas, a U-net skip and backout, final norm, (FP8) lm_head, logit
softcap and the cross-entropy loss; and record 89's embedding / residual-stream techniques: the
hashed bigram embedding, gated value-embedding banks, residual/post lambdas, x0 and bigram gates,
the cached attention input, MUDD connections and MUDD gates, the asymmetric logit rescale, the
embedding tied to the lm_head until a step, nonzero attention-output init.

Owns the model's parameters and their labels, initialization, the window/YaRN state
(``set_window`` / ``reset_window``), the tie state of the embedding (``embed_tied``,
``untie_embed``), regional compilation (``compile_regions``) and the forward: which per-layer inputs
each layer gets. A layer's algebra is block.py's; the scalars vector layout scalars.py's; the
value-embedding banks and the bigram hash embeddings.py's; the MUDD lanes and MLPs mudd.py's;
attention attention.py's, rotary/YaRN rotary.py's, the FP8 head matmul kernels/fp8.py's.

Every technique is switched by a ``ModelConfig`` field; switched off, the math is the plain
transformer's (no extra parameter is used and no extra op is run). All record-89 switches off is
record 45, bit for bit (tests/test_regression_r45.py).

Layers are 0-based: the reference's empty slot 0 is dropped, so reference layer i is layer i-1
(record 89 numbers its layers the same way as this package).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.experimental import _config as fx_config

from speedrun.config import ModelConfig, Window
from speedrun.data.prefix import prefix_table
from speedrun.kernels.fp8 import fp8_active, head_matmul, linear_head
from speedrun.kernels.fp8_head_ce import fp8_head_softcap_ce_fused
from speedrun.kernels.softcap_ce import multi_token_losses, softcapped_cross_entropy
from speedrun.model.attention import (
    FLEX_BLOCK_SIZE,
    UNBOUNDED_WINDOW,
    AttnWindow,
    DocInfo,
    LayerInputs,
    build_doc_info,
    build_window,
    resolve_backend,
    rms_norm,
    stream_doc_info,
)
from speedrun.model.block import MLP, Block, StreamInputs  # noqa: F401  (MLP: part of this module's API)
from speedrun.model.embeddings import BigramEmbedding, ValueEmbeddings
from speedrun.model.flash import flash_attn_impl
from speedrun.model.kv_cache import KVCache
from speedrun.model.mudd import (
    CoefficientMLPs,
    Coefficients,
    GateConstants,
    gate_groups,
    gate_lanes,
    has_gated_value_embed,
    mudd_lanes,
)
from speedrun.model.rotary import Rotary
from speedrun.model.scalars import ScalarLayout, upgrade_legacy_state

EVAL_CHUNK_TOKENS = 16384   # eval logits are made this many tokens at a time (16K x 50304 fp32 = 3.3 GB)
REDUCTIONS = ("sum", "mean", "none")
STACK_INPUT = -1            # "layer" index of the stack input (x0, plus the bigram injection) in caches
# the block matrices: fp32 parameters cast at use, or bf16 ones (GPT's matrix_dtype)
MATRIX_LABELS = ("attn", "mlp_fc", "mlp_proj")


class LossWeights(NamedTuple):
    """The training loss's weights of one step (records 53 and 88; the trainer's, from the stage
    table): ``mtp`` (K,) fp32, the weight of the target k positions ahead (k = 0 the next token);
    ``prefix`` 0-d fp32, the weight of the next token's prefix token (None: no prefix term, the model
    was built without ``prefix_loss``). Device tensors, so new values each step compile nothing."""
    mtp: Tensor
    prefix: Tensor | None = None


def softcap(logits: Tensor, cap: float, tau: float, offset: float = 0.0) -> Tensor:
    """cap * sigmoid((z + offset) / tau): squashes logits into (0, cap) (tau: ModelConfig's
    logit_softcap_tau). Record 45: cap 30, tau 7.5 (= 15 (tanh(z / 15) + 1)); record 89: cap 23,
    offset 5, tau 7.5."""
    if cap <= 0:
        return logits
    z = logits + offset if offset else logits
    return cap * torch.sigmoid(z / tau)


def cached_layers(cfg: ModelConfig) -> set[int]:
    """The layers whose outputs the forward keeps (STACK_INPUT: the stack input): the U-net skip's
    source, the backout's, record 77's attention input and the MUDD sources (the public code's ``cache_layers``)."""
    out = set()
    if cfg.skip_connection:
        out.add(cfg.skip_from_layer)
    if cfg.backout and not cfg.mudd:
        out.add(cfg.backout_layer)
    if cfg.attn_input_layer >= 0:
        out.add(cfg.attn_input_layer)
    if cfg.mudd:
        out.update(cfg.mudd_value_sources, cfg.mudd_residual_sources, cfg.mudd_final_sources)
    return out


class GPT(nn.Module):
    """See the module docstring and docs/architecture.md (model contract)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, *,
                 max_doc_len: int | None = None, flex_block_size: int = FLEX_BLOCK_SIZE,
                 eval_chunk_tokens: int = EVAL_CHUNK_TOKENS, matrix_dtype: torch.dtype = torch.float32,
                 micro_steps: int = 1, prefix_loss: bool = False):
        """``max_doc_len``: the bound on training documents (the loader cuts them there; flash uses
        it as its launch bound, None = the batch length); ``flex_block_size``: FlexAttention's tile;
        ``eval_chunk_tokens``: eval logits are made this many tokens at a time; ``matrix_dtype``:
        storage of the block matrices (labels in MATRIX_LABELS): fp32 (record 45) or bf16 with
        NorMuon's mantissa master (optim.muon.bf16_weights, record 57); ``micro_steps``: this rank's
        most micro-steps per optimizer step (the trainer's grad_accum), the FP8 MLP's slots of
        delayed activation scales (kernels/fp8_mlp.py); ``prefix_loss``: the training loss can have
        the prefix-token term (record 88; the trainer sets it when a stage gives it a weight): the
        vocabulary's prefix table (data/prefix.py) becomes the buffer ``prefix_table``."""
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        assert cfg.num_heads * cfg.head_dim == cfg.model_dim, "num_heads * head_dim != model_dim"
        assert len(cfg.value_embed_layers) == cfg.num_layers, "value_embed_layers: one per layer"
        V, d, L = cfg.padded_vocab_size, cfg.model_dim, cfg.num_layers
        self.layout = ScalarLayout(cfg)

        # record 45's modules, in its order (their construction draws from the global RNG)
        self.embed = nn.Embedding(V, d)
        self.value_embeds = ValueEmbeddings(cfg.num_value_embeds, V, d) if cfg.num_value_embeds else None
        self.smear_gate = nn.Linear(cfg.gate_dim, 1, bias=False) if cfg.smear else None
        self.blocks = nn.ModuleList(Block(cfg, i, dtype, micro_steps) for i in range(L))
        self.lm_head = nn.Linear(d, V, bias=False)
        self.scalars = nn.Parameter(self.layout.initial(cfg))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base, cfg.attn_scale, cfg.block_size)
        # record 89's, each only when its technique is on
        self.bigram = BigramEmbedding(cfg.bigram_vocab_size, d, cfg.bigram_sign_rows) if cfg.bigram_embed else None
        self.gated_ve_layers = [i for i in range(L) if has_gated_value_embed(cfg, i)
                                and self.blocks[i].attn is not None and not (cfg.mudd and i == cfg.mudd_layer)]
        self.ve_gates = (nn.Parameter(torch.zeros(len(self.gated_ve_layers), cfg.num_heads,
                                                  2 * cfg.value_embed_gate_dim))
                         if self.gated_ve_layers else None)
        self.resid_lambdas = nn.Parameter(torch.empty(L, 2)) if cfg.residual_lambdas else None
        self.post_lambdas = nn.Parameter(torch.empty(L, 2)) if cfg.residual_lambdas else None
        self.mudd = (CoefficientMLPs(mudd_lanes(cfg), d, cfg.mudd_hidden, cfg.mudd_scale, False, "mudd")
                     if cfg.mudd else None)
        groups = [gate_lanes(cfg, layers) for layers in gate_groups(cfg)]
        self.gate_mlps = self.gate_constants = None
        if cfg.mudd_gates:
            self.gate_mlps = CoefficientMLPs(groups, d, cfg.mudd_hidden, cfg.mudd_scale, True, "mudd_gate")
        elif groups[0]:
            self.gate_constants = GateConstants(groups[0])
        self.cached = cached_layers(cfg)

        # window state: Python ints for bookkeeping, 0-d int32 buffers for the kernels
        self.register_buffer("window_long", torch.tensor(UNBOUNDED_WINDOW, dtype=torch.int32),
                             persistent=False)
        self.register_buffer("window_short", torch.tensor(UNBOUNDED_WINDOW, dtype=torch.int32),
                             persistent=False)
        # token id -> id of its longest proper byte prefix that is a token (-1: none); a constant of
        # the vocabulary, so not saved (non-persistent) and rebuilt with the model
        # (from_numpy ignores a torch.device context: placed beside the window buffers explicitly)
        table = torch.as_tensor(prefix_table(V), device=self.window_long.device) if prefix_loss else None
        self.register_buffer("prefix_table", table, persistent=False)
        self.window: Window | None = None        # None: no window (full causal within documents)
        self.yarn_blocks: int | None = None      # the long window the current YaRN state was made for
        # the input embedding reads the lm_head weight until untie_embed() (model.tie_embed)
        self.embed_tied = cfg.tie_embed

        self.max_doc_len = max_doc_len
        self.flex_block_size = flex_block_size
        self.eval_chunk_tokens = eval_chunk_tokens
        self._label_parameters()
        self.reset_parameters()
        for m in (self.embed, self.value_embeds, self.smear_gate, self.lm_head, self.bigram):
            if m is not None:
                m.to(dtype)
        for m in (self.mudd, self.gate_mlps):   # weights and biases; the gates' learned scale stays fp32
            if m is not None:
                m.cast_weights_(dtype)
        if self.ve_gates is not None:
            self.ve_gates.data = self.ve_gates.data.to(dtype)
        if matrix_dtype != torch.float32:   # initialized in fp32 above, rounded once (as record 89)
            for p in self.parameters():
                if p.label in MATRIX_LABELS:
                    p.data = p.data.to(matrix_dtype)
            for block in self.blocks:       # the FP8 MLP's weight copies of the rounded weights
                block.mlp.reset_fp8()
        # weights saved with the earlier scalars / value-embedding layout load into this one
        self.register_load_state_dict_pre_hook(self._upgrade_legacy_state)
        # the regions; compile_regions() swaps in compiled versions
        self._embed_fn = self._embed
        self._gates_fn = self._gates
        self._mudd_fn = self._mudd_enter
        self._train_loss_fn = self._train_loss
        self._final_fn = self._final
        self._token_losses_fn = self._token_losses
        self._logits_fn = self._logits
        self._compiled = False

    # ---- parameters ----------------------------------------------------------------------------
    def _label_parameters(self) -> None:
        self.embed.weight.label = "embed"
        if self.smear_gate is not None:
            self.smear_gate.weight.label = "smear_gate"
        self.lm_head.weight.label = "lm_head"
        self.scalars.label = "scalars"
        if self.ve_gates is not None:
            self.ve_gates.label = "ve_gate"
        if self.resid_lambdas is not None:
            self.resid_lambdas.label, self.post_lambdas.label = "resid_lambdas", "post_lambdas"
        missing = [n for n, p in self.named_parameters() if not isinstance(getattr(p, "label", None), str)]
        assert not missing, f"unlabelled parameters: {missing}"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Spec 1.7: embeddings N(0,1); Wq, Wk, Wv, c_fc uniform(+-sqrt(3)*0.5*dim^-0.5);
        Wo, c_proj, lm_head zero (zero_init_outputs; otherwise the same uniform rule with their own
        fan-in); gates zero; scalars per ScalarLayout. Record 89's switches: Wo uniform like Wv
        (attn_out_init_nonzero), lm_head N(0, head_init_std), the tied embedding a copy of the
        lm_head, value embeddings N(0, value_embed_init_std), bigram table and value-embedding gates
        zero, resid lambdas sqrt(block_lambda_init), post lambdas 1, MUDD per mudd.py."""
        cfg, d = self.cfg, self.cfg.model_dim

        def uniform_(t: Tensor, fan_in: int) -> None:
            bound = math.sqrt(3) * 0.5 * fan_in ** -0.5
            t.uniform_(-bound, bound)

        def output_(t: Tensor, fan_in: int) -> None:
            t.zero_() if cfg.zero_init_outputs else uniform_(t, fan_in)

        self.embed.weight.normal_()
        if self.value_embeds is not None:
            self.value_embeds.reset_parameters(cfg.value_embed_init_std)
        for block in self.blocks:
            if block.attn is not None:
                w = block.attn.qkvo.view(4, d, d)
                uniform_(w[:3], d)
                uniform_(w[3], d) if cfg.attn_out_init_nonzero else output_(w[3], d)
                if block.attn.gate is not None:
                    block.attn.gate.weight.zero_()
            uniform_(block.mlp.c_fc, d)
            output_(block.mlp.c_proj, cfg.mlp_dim)
            block.mlp.reset_fp8()
        if self.smear_gate is not None:
            self.smear_gate.weight.zero_()
        if cfg.head_init_std > 0:
            self.lm_head.weight.normal_(0.0, cfg.head_init_std)
        else:
            output_(self.lm_head.weight, d)
        if cfg.tie_embed:
            self.embed.weight.copy_(self.lm_head.weight)
        self.scalars.copy_(self.layout.initial(cfg))
        if self.bigram is not None:
            self.bigram.weight.zero_()
        if self.ve_gates is not None:
            self.ve_gates.zero_()
        if self.resid_lambdas is not None:
            self.resid_lambdas.fill_(math.sqrt(cfg.block_lambda_init))
            self.post_lambdas.fill_(1.0)
        for m in (self.mudd, self.gate_mlps, self.gate_constants):
            if m is not None:
                m.reset_parameters()

    def _upgrade_legacy_state(self, module, state_dict, prefix, *args) -> None:
        upgrade_legacy_state(state_dict, prefix, self.cfg, self.layout)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        skip = {"embed", "value_embed", "bigram_embed"} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if p.label not in skip)

    def inventory(self) -> list[tuple[str, tuple[int, ...], str, str, int]]:
        """(name, shape, dtype, label, count) of every parameter, in registration order."""
        return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.label, p.numel())
                for n, p in self.named_parameters()]

    def format_inventory(self) -> str:
        rows = self.inventory()
        w = max(len(r[0]) for r in rows)
        lines = [f"{'name':<{w}}  {'shape':<14} {'dtype':<9} {'label':<14} {'count':>12}"]
        lines += [f"{n:<{w}}  {str(list(s)):<14} {dt:<9} {lb:<14} {c:>12,}" for n, s, dt, lb, c in rows]
        by_label: dict[str, int] = {}
        for *_, lb, c in rows:
            by_label[lb] = by_label.get(lb, 0) + c
        lines.append("by label: " + ", ".join(f"{k} {v:,}" for k, v in by_label.items()))
        lines.append(f"total {self.num_params():,} ({self.num_params() / 1e6:.1f}M); without "
                     f"embeddings/value embeddings/bigram table {self.num_params(True):,}")
        return "\n".join(lines)

    # ---- the tied embedding (record 51/53/61) --------------------------------------------------
    def embedding_table(self) -> Tensor:
        """The (V, dim) table the input embedding reads: the lm_head weight while tied."""
        return self.lm_head.weight if self.embed_tied else self.embed.weight

    @torch.no_grad()
    def untie_embed(self) -> None:
        """From now on the embedding is its own parameter, starting as the lm_head's values (the
        trainer also hands it the lm_head's optimizer state). Also how a tied model is made
        self-contained for evaluation and export."""
        if self.embed_tied:
            self.embed.weight.copy_(self.lm_head.weight)
            self.embed_tied = False

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
    def compile_regions(self, dynamic: bool = False, **compile_kwargs) -> "GPT":
        """Compile each block and the embedding / gate / MUDD / head / loss regions separately.

        Why regions and not one monolith: the 11 blocks share one code object (``Block.forward``),
        and parameters are graph inputs (dynamo inlines nn.Module parameters), so a block is traced
        and compiled once per variant (which of its inputs are present) and the cached graph is
        reused by every other layer of the same variant (record 45: forward() gives attention layers
        without a value embedding a zero one, so they share the attention graph; record 89's
        heterogeneous layers make more variants). Cold compile time is then a few block-sized
        graphs instead of one 11-layer graph (the reference's 7-8 minutes).
        Window sizes, the YaRN frequencies and attn_scale, the block masks, every gate and lambda
        and the embedding table (tied or not) enter as tensors, so changing windows or untying the
        embedding changes inputs, not graphs: no recompilation.
        The Python loop over blocks, the cache/skip/backout bookkeeping and mask building stay
        eager (a few dozen tiny launches per forward).

        ``dynamic``: trace every input size as a symbol (``torch.compile(dynamic=True)``). The model
        width, heads and vocabulary still specialise, because each meets a parameter's static shape
        (parameters stay static), so only the token count (and the per-batch document and block
        counts) stays symbolic: one set of graphs serves every micro-batch length of a stage table
        (record 89: 16K, 32K and 48K tokens) instead of compiling everything again per length
        (H200: the 32K and 48K warm-ups took 1.3 s and 0.9 s instead of > 50 s each).

        Process-wide side effects (torch keeps these settings globally, so other code compiled in
        the same process inherits them): dynamo's recompile limit raised to at least 64, Python
        floats specialised, duck shaping off (the comments below say why)."""
        kw = {"dynamic": bool(dynamic), "fullgraph": True}
        # Block.forward legitimately has several graphs: each variant x (train, no-grad eval) x each
        # sequence length used (train, val, HellaSwag...). Room for them (the reference used 64).
        limit = 64
        if self.cfg.attention_backend == "flash" and flash_attn_impl() == "fa3":
            # FlashAttention-3 runs eagerly behind a graph break (model/flash.py); FA4 is traced
            kw["fullgraph"] = False
        dyn = torch._dynamo.config
        name = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, name, max(getattr(dyn, name), limit))
        # Python floats reaching the regions are constants of the config (softcap, its offset and
        # temperature, the MUDD scale; per-step values come as tensors). Unspecialised (torch's
        # default), dynamic=True turned each into a graph input read back with .item(): a symbolic
        # float in the graph and a restarted trace per region that holds one (4 restarts per
        # record-89 forward; dynamo + AOT tracing 35.2 -> 31.9 s on the CPU without them)
        dyn.specialize_float = True
        # No duck shaping: by default dynamo gives every input size of equal value one symbol, so a
        # token-dependent size that happens to equal a constant one shares its fate: at 4,096
        # tokens a paired layer's block-mask tensors (8,192 / 128 = 64 blocks) took the symbol of
        # the rotary table's 64 columns, which the graph specialises, and the next length
        # recompiled that block. Sizes that are equal by construction still get one symbol through
        # the guards of the operations that combine them.
        fx_config.use_duck_shape = False
        kw.update(compile_kwargs)
        for block in self.blocks:
            block.compile(**kw)
        self._embed_fn = torch.compile(self._embed, **kw)
        self._gates_fn = torch.compile(self._gates, **kw)
        self._mudd_fn = torch.compile(self._mudd_enter, **kw)
        self._train_loss_fn = torch.compile(self._train_loss, **kw)
        self._final_fn = torch.compile(self._final, **kw)
        self._token_losses_fn = torch.compile(self._token_losses, **kw)
        self._logits_fn = torch.compile(self._logits, **kw)
        self._compiled = True
        return self

    # ---- regions -------------------------------------------------------------------------------
    def _embed(self, ids: Tensor, table: Tensor, previous: Tensor | None = None,
               previous_id: Tensor | None = None, start: int = 0):
        """Embedding (from ``table``) -> smear -> rmsnorm = x0; value embeddings; rotary tables
        (cos, sin) for positions start..; the bigram vector beta; the first gate block's
        coefficients (on x0); the stack input x = x0 [+ gate beta].
        ``previous`` / ``previous_id``: the raw embedding and the id of the token before ids[0]
        (decoding with a KV cache); None: ids[0] has no predecessor.
        Returns (x0, x, ves, rope, beta, gate_rows)."""
        cfg = self.cfg
        x = F.embedding(ids, table)
        if self.smear_gate is not None:
            # one-token look-back: x_t += lambda * sigmoid(w . x_t[:gate_dim]) * x_{t-1}
            # (crosses document boundaries, as the reference does)
            first = 1 if previous is None else 0
            before = x[:-1] if previous is None else torch.cat([previous, x[:-1]])
            gate = self.scalars[self.layout.smear] * torch.sigmoid(self.smear_gate(x[first:, :cfg.gate_dim]))
            x = torch.cat([x[:first], x[first:] + gate * before])
        x0 = rms_norm(x)
        ves = self.value_embeds(ids) if self.value_embeds is not None else []
        rope = self.rotary.cos_sin(ids.numel(), x0.dtype, start=start) if cfg.rotary else None
        beta = rows = None
        # layer 0 sees x == x0; a separate tensor object (a view) keeps the compiled block from
        # specializing on "x is x0" (an aliasing guard = one more graph to compile)
        x = x0.view_as(x0)
        if self.gate_mlps is not None:
            rows = self.gate_mlps(x0, 0)
        if self.bigram is not None:
            beta = self.bigram(ids, previous_id).to(x0.dtype)
            gate = self._coefficients(0, rows, ids.numel()).take("bigram", 0)
            x = x0 + gate * beta     # record 89's injection before layer 0 (the stack input)
        return x0, x, ves, rope, beta, rows

    def _gates(self, x: Tensor, block: int) -> Tensor:
        """A gate block's coefficients (n, T) from the residual x (the post gate)."""
        return self.gate_mlps(x, block)

    def _coefficients(self, group: int, rows: Tensor | None, num_tokens: int) -> Coefficients:
        """Gate group ``group``'s coefficients: the gate MLP's rows, or the learned constants."""
        if self.gate_mlps is not None:
            return Coefficients(self.gate_mlps.blocks[group], rows, num_tokens)
        if self.gate_constants is not None:
            return Coefficients(self.gate_constants.lanes, self.gate_constants.values, num_tokens)
        return Coefficients([], None, num_tokens)

    def _mudd_enter(self, x: Tensor, value_sources: list[Tensor], residual_sources: list[Tensor]):
        """MUDD block 0 at mudd_layer (r89-model.md 4.3 steps 2-5) on the residual x entering it.
        Returns (new x, the value sources' sum for v, the per-head value-embedding gate, the layer's
        (r_attn, p_attn, r_mlp, p_mlp), x0 gate, bigram gate); None where off."""
        cfg, T = self.cfg, x.shape[0]
        c = Coefficients(self.mudd.blocks[0], self.mudd(x, 0), T)
        v_extra = None
        for j, src in zip(cfg.mudd_value_sources, value_sources):
            term = c.take("value_source", j) * src
            v_extra = term if v_extra is None else v_extra + term
        new_x = (1 + c.take("self", cfg.mudd_layer)) * x
        for j, src in zip(cfg.mudd_residual_sources, residual_sources):
            new_x = new_x + c.take("residual_source", j) * src
        ve_gate = c.take("ve_gate", cfg.mudd_layer)
        if ve_gate is not None:   # one coefficient per half of the heads
            ve_gate = ve_gate.repeat_interleave(cfg.num_heads // 2, dim=-1)
        lambdas = None
        if cfg.residual_lambdas:
            lambdas = tuple(c.take(k, cfg.mudd_layer) for k in ("resid_attn", "post_attn", "resid_mlp", "post_mlp"))
        return (new_x, v_extra, ve_gate, lambdas, c.take("x0", cfg.mudd_layer),
                c.take("bigram", cfg.mudd_layer))

    def _final(self, x: Tensor, backout: Tensor | None, sources: list[Tensor] | None = None) -> Tensor:
        """Backout (subtract the scaled output of backout_layer) or the final MUDD block (add the
        coefficient-weighted ``sources``), then the final rmsnorm."""
        if backout is not None:
            x = x - self.scalars[self.layout.backout] * backout
        if sources is not None:
            lanes = self.mudd.blocks[1]
            c = self.mudd(x, 1)
            update = None
            for lane, src in zip(lanes, sources):
                term = c[lane.start].unsqueeze(-1) * src
                update = term if update is None else update + term
            x = x + update
        return rms_norm(x)

    def _train_loss(self, x: Tensor, backout: Tensor | None, sources: list[Tensor] | None, targets: Tensor,
                    use_fp8: bool, weights: LossWeights | None = None) -> Tensor:
        """Training loss: summed cross-entropy on softcapped logits kept in the activation dtype
        (bf16 on GPU, as the record), FP8 head matmul when use_fp8. Per-token losses are summed in
        fp32 so the returned value is precise (gradients are those of the plain sum).

        ``weights`` (records 53, 88): each row's logits are also scored against the targets k = 1..
        positions ahead and against its next token's prefix token (``prefix_table[targets]``), with
        the step's weights: kernels/softcap_ce.py's ``multi_token_losses``, summed over rows."""
        cfg = self.cfg
        xn = self._final(x, backout, sources)
        rescale = dict(offset=cfg.logit_softcap_offset, temperature=cfg.logit_softcap_tau)
        terms = {}
        if weights is not None:
            prefix = None
            if weights.prefix is not None:
                prefix = self.prefix_table[targets]
            terms = dict(mtp_weights=weights.mtp, prefix_targets=prefix, prefix_weight=weights.prefix)
        scales = self.fp8_head_scales()
        if use_fp8 and cfg.fused_loss and cfg.logit_softcap and xn.is_cuda:
            # FP8 head + softcapped CE as one op pair: the backward writes the logit gradient straight
            # to e5m2 (and its transpose), no bf16 gradient, no quantize/transpose pass
            return fp8_head_softcap_ce_fused(xn, self.lm_head.weight, targets, cfg.logit_softcap, scales=scales,
                                             **rescale, **terms)
        logits = head_matmul(xn, self.lm_head.weight, use_fp8, scales)
        if cfg.fused_loss and cfg.logit_softcap and logits.is_cuda:
            # one pass over the bf16 logits forward, one backward; softcap computed in fp32 inside
            return softcapped_cross_entropy(logits, targets, cfg.logit_softcap, "sum", kernel="triton", **rescale,
                                            **terms)
        if terms:   # the readable twin: the weighted terms on fp32 (float64 stays) rescaled logits
            s = self._softcap(logits if logits.dtype == torch.float64 else logits.float())
            return multi_token_losses(s, targets, **terms).float().sum()
        logits = self._softcap(logits)
        return F.cross_entropy(logits, targets, reduction="none").float().sum()

    def fp8_head_scales(self) -> tuple[float, float, float] | None:
        """The FP8 head's fixed (x_s, w_s, grad_s): ``model.fp8_head_scales`` (record 89's), or None
        for kernels/fp8.py's head_scales (record 45's)."""
        scales = self.cfg.fp8_head_scales
        return tuple(scales) if scales else None

    def _softcap(self, logits: Tensor) -> Tensor:
        cfg = self.cfg
        return softcap(logits, cfg.logit_softcap, cfg.logit_softcap_tau, cfg.logit_softcap_offset)

    def _token_losses(self, xn: Tensor, targets: Tensor) -> Tensor:
        """Per-token fp32 losses of a chunk of normed hidden states (eval path, bf16/fp32 head)."""
        logits = self._softcap(linear_head(xn, self.lm_head.weight).float())
        return F.cross_entropy(logits, targets, reduction="none")

    def _logits(self, xn: Tensor) -> Tensor:
        return self._softcap(linear_head(xn, self.lm_head.weight).float())

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, inputs: Tensor, targets: Tensor | None = None, cu_seqlens: Tensor | None = None,
                *, reduction: str = "sum", kv_cache: KVCache | None = None,
                loss_weights: LossWeights | None = None) -> Tensor:
        """inputs (T,) token ids; cu_seqlens int32 document starts + T padded with T (None: one
        document). targets None -> fp32 softcapped logits (T, padded_vocab). Otherwise the loss:
        "sum" (training), "mean" (eval, fp32, chunked), "none" (per-token (T,) fp32).
        ``loss_weights`` (training, "sum" only): the multi-token / prefix-token terms and their
        weights (``LossWeights``); None = next-token cross-entropy (evaluation always is).

        ``kv_cache`` (decoding, kv_cache.py): ``inputs`` continue the one sequence held in the cache;
        their keys and values are appended to it and each layer attends to the cached positions in
        its window. Returns their logits, equal to the full forward's rows for them."""
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
        if loss_weights is not None:
            if reduction != "sum" or targets is None:
                raise ValueError("GPT.forward: loss_weights are the training loss's (reduction 'sum' with "
                                 "targets); evaluation is next-token only")
            if loss_weights.prefix is not None and self.prefix_table is None:
                raise ValueError("GPT.forward: a prefix-token weight needs the model built with prefix_loss=True")
        cfg, lay = self.cfg, self.layout
        ids = inputs.reshape(-1)
        T, device = ids.numel(), ids.device
        table = self.embedding_table()
        decoding = kv_cache is not None
        if decoding:
            if targets is not None or cu_seqlens is not None:
                raise ValueError("GPT.forward with a kv_cache decodes one sequence: no targets, no cu_seqlens")
            start = kv_cache.claim(T)
            doc, masks = None, [None] * cfg.num_layers
            # decoding runs the eager modules: compiled regions would specialize on the cache
            x0, x, ves, rope, beta, rows = self._embed(ids, table, kv_cache.last_embedding,
                                                       kv_cache.last_token, start)
            kv_cache.last_embedding = F.embedding(ids[-1:], table)
            kv_cache.last_token = ids[-1:]
        else:
            backend = self.attention_backend(device)
            # training batches cap documents at max_doc_len (flash's launch bound); eval batches do not
            doc = build_doc_info(cu_seqlens, T, device, backend, self.max_doc_len if self.training else None)
            masks = self._masks(doc)
            x0, x, ves, rope, beta, rows = self._embed_fn(ids, table)
        paired_rope = None
        if cfg.rotary and cfg.paired_head_layers:   # record 89: head h of token t at 2t + (h mod 2)
            paired_rope = self.rotary.paired_cos_sin(T, cfg.num_heads, x0.dtype, start if decoding else 0)
        # compiled: attention layers without a value embedding get a zero one, so every attention
        # layer runs one compiled graph (v = l0 v + l1 * 0 = l0 v exactly; l1 gets a zero gradient,
        # as an unused entry of the scalars vector does); one variant fewer to compile, train and eval.
        # It requires grad exactly when the real ones do (else dynamo guards tell them apart); its
        # own gradient (a few pointwise ops per layer) is thrown away with it.
        no_ve = None
        if self._compiled and lay.value is not None and not decoding:
            no_ve = x0.new_zeros(x0.shape).requires_grad_(bool(ves) and ves[0].requires_grad)
        # one unbind (a single autograd node) instead of a slice per use
        s = self.scalars.unbind()
        lambdas = None
        if self.resid_lambdas is not None:   # per layer (r_attn, p_attn, r_mlp, p_mlp)
            r_attn, r_mlp = (column.unbind() for column in self.resid_lambdas.unbind(1))
            p_attn, p_mlp = (column.unbind() for column in self.post_lambdas.unbind(1))
            lambdas = list(zip(r_attn, p_attn, r_mlp, p_mlp))
        ve_gates = self.ve_gates.unbind() if self.ve_gates is not None else ()
        gates = self._coefficients(0, rows, T)
        # decoding: the eager regions (compiled ones would specialize on each chunk's length)
        gates_fn, mudd_fn = (self._gates, self._mudd_enter) if decoding else (self._gates_fn, self._mudd_fn)
        states = {STACK_INPUT: x}
        for i, block in enumerate(self.blocks):
            if cfg.mudd_gates and i == cfg.mudd_gate_layer:     # the post gate, on the residual here
                gates = self._coefficients(1, gates_fn(x, 1), T)
            attn = block.attn is not None
            has_skip = cfg.skip_connection and i == cfg.skip_to_layer
            ve_index = cfg.value_embed_layers[i] if cfg.value_embeds else -1
            gated_ve = has_gated_value_embed(cfg, i)
            layer_doc, window = masks[i] or (doc, None)   # a paired layer's: its stream's
            inp = LayerInputs(
                x0=x0,
                lambdas=(s[lay.block + 2 * i], s[lay.block + 2 * i + 1]) if lay.block is not None else None,
                skip=states[cfg.skip_from_layer] if has_skip else None,
                skip_gate=s[lay.skip] if has_skip else None,
                ve=(ves[ve_index] if ve_index >= 0 else no_ve) if attn and not gated_ve else None,
                value_lambdas=(s[lay.value + 2 * i], s[lay.value + 2 * i + 1])
                if lay.value is not None and attn else None,
                rope=paired_rope if i in cfg.paired_head_layers else rope, attn_scale=self.rotary.attn_scale,
                doc=layer_doc, window=window,
                kv=kv_cache.layer(i, self.window_tokens(i)) if decoding and attn else None,
                attn_lambdas=(s[lay.attn + 2 * i], s[lay.attn + 2 * i + 1]) if lay.attn is not None and attn
                else None,
                xsa_alpha=gates.take("xsa", i),
                out_gate=gates.take("out_gate", i),
                dc_weights=(gates.take("dc_w1", i), gates.take("dc_w2", i)) if gates.has("dc_w1", i) else None)
            res = StreamInputs(
                lambdas=lambdas[i] if lambdas is not None else None,
                x0_gate=gates.take("x0", i), x0_source=x0,
                bigram=beta, bigram_gate=gates.take("bigram", i) if i > 0 else None,
                skip_gate=gates.take("skip", i),
                attn_source=states[cfg.attn_input_layer] if 0 <= cfg.attn_input_layer < i else None,
                value_embed=ves[ve_index] if attn and gated_ve else None,
                ve_gate=ve_gates[self.gated_ve_layers.index(i)] if i in self.gated_ve_layers else None)
            if cfg.mudd and i == cfg.mudd_layer:
                x, res = self._mudd_layer(x, res, states, mudd_fn)
            if res.bigram_gate is None:
                res = res._replace(bigram=None)
            if res.x0_gate is None:
                res = res._replace(x0_source=None)
            x = block.forward(x, inp, res) if decoding else block(x, inp, res)
            if i in self.cached:
                states[i] = x

        backout = states[cfg.backout_layer] if lay.backout is not None else None
        sources = None
        if self.mudd is not None:
            sources = [states[j] for j in cfg.mudd_final_sources]
            if cfg.mudd_final_value_embed >= 0:
                sources.append(ves[cfg.mudd_final_value_embed].to(x.dtype))
        if decoding:
            return self._logits(self._final(x, backout, sources))
        if targets is None:
            return self._logits_fn(self._final_fn(x, backout, sources))
        targets = targets.reshape(-1).long()
        if reduction == "sum":
            use_fp8 = self.training and self.fp8_head_active(device)
            return self._train_loss_fn(x, backout, sources, targets, use_fp8, loss_weights)
        # eval: fp32 logits, chunk by chunk, so a 262,144-token forward never holds them all
        xn = self._final_fn(x, backout, sources)
        chunk = self.eval_chunk_tokens
        losses = torch.cat([self._token_losses_fn(xn[i:i + chunk], targets[i:i + chunk])
                            for i in range(0, T, chunk)])
        if reduction == "none":
            return losses
        counted = (targets != -100).sum()   # cross_entropy's ignore_index: mean over real targets
        return losses.sum() / counted.clamp_min(1)

    def _mudd_layer(self, x: Tensor, res: StreamInputs, states: dict[int, Tensor], mudd_fn
                    ) -> tuple[Tensor, StreamInputs]:
        """The residual and StreamInputs of mudd_layer: MUDD block 0 rewrites the residual and gives
        the layer its value sources, value-embedding gate, lambdas and x0 / bigram gates (the x0
        gate's source there is the stack input, as the record's). Attention reads the residual from
        before the rewrite (or record 77's cached activation)."""
        cfg = self.cfg
        new_x, v_extra, ve_gate, lambdas, x0_gate, bigram_gate = mudd_fn(
            x, [states[j] for j in cfg.mudd_value_sources], [states[j] for j in cfg.mudd_residual_sources])
        res = res._replace(attn_source=x if res.attn_source is None else res.attn_source,
                           v_extra=v_extra, ve_gate=None, ve_head_gate=ve_gate,
                           lambdas=lambdas, x0_gate=x0_gate, x0_source=states[STACK_INPUT],
                           bigram_gate=bigram_gate)
        return new_x, res

    def window_tokens(self, layer: int) -> int:
        """The attention window of ``layer`` in tokens under the current window config."""
        if self.window is None:
            return UNBOUNDED_WINDOW
        blocks = self.window.long if layer in self.cfg.long_window_layers else self.window.short
        return blocks * self.cfg.block_size

    def _masks(self, doc: DocInfo) -> list[tuple[DocInfo, AttnWindow] | None]:
        """Per attention layer: its documents and its window's mask data, built once per (window
        size, layout) for this batch; a paired-head layer's describe its 2T-row stream."""
        cfg, built = self.cfg, {}
        stream_doc = stream_doc_info(doc) if cfg.paired_head_layers else None
        out: list[tuple[DocInfo, AttnWindow] | None] = []
        for i, block in enumerate(self.blocks):
            if block.attn is None:
                out.append(None)
                continue
            key = (i in cfg.long_window_layers, i in cfg.paired_head_layers)
            if key not in built:
                layer_doc = stream_doc if key[1] else doc
                window = self.window_long if key[0] else self.window_short
                built[key] = (layer_doc, build_window(layer_doc, window, self.window_tokens(i),
                                                      self.flex_block_size))
            out.append(built[key])
        return out
