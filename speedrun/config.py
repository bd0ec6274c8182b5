"""Configuration tree: dataclasses for model / optimizer / schedule / data / train, JSON load/save,
dotted command-line overrides (``--optim.muon.lr 0.02``) and validation.

The dataclass defaults *are* the Nov-2025 record recipe (reference-spec section 1), so
``configs/record_124m.json`` only has to restate them; small recipes override fields.

Every recipe quantity is global (tokens per optimizer step, steps, schedules). World size and
gradient accumulation are derived from it at run time (``Config.grad_accum``), never stored.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from speedrun.utils import atomic_write_text, human_bytes


class ConfigError(ValueError):
    """A config file, field or value is wrong; the message names the field and what was expected."""


class Window(NamedTuple):
    """Attention windows in blocks of ``model.block_size`` tokens: ``short`` for the short-window
    layers, ``long`` for ``model.long_window_layers``. The one order in which windows travel
    (schedules -> trainer -> model -> export)."""
    short: int
    long: int


# The allowed values of each enum-like field, written once: loading, overrides and validate() check
# a field against its annotation, and the code that dispatches on a field reads the same list
# (``choices(AttentionBackend)``).
AttentionBackend = Literal["auto", "flex", "flash", "sdpa"]
KernelChoice = Literal["auto", "triton", "torch"]
StateDtype = Literal["bfloat16", "float32"]
ActivationDtype = Literal["auto", "bfloat16", "float32"]
DeviceChoice = Literal["auto", "cpu", "cuda"]
CudaGraphs = Literal["auto", "on", "off"]
MuonAxis = Literal["stored", "matrix"]
MaxNumDocsRule = Literal["spare", "tight"]
CompileDynamic = Literal["auto", "on", "off"]
AdamDecay = Literal["lr", "lr_squared"]
SparseComms = Literal["auto", "on", "off"]


class BatchShape(NamedTuple):
    """One optimizer step's batch: ``tokens_per_step`` global tokens in micro-batches of
    ``micro_batch_tokens`` (per rank per accumulation step), documents cut at ``max_doc_len``."""
    tokens_per_step: int
    micro_batch_tokens: int
    max_doc_len: int

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step over all ranks."""
        return self.tokens_per_step // self.micro_batch_tokens

    def grad_accum(self, world_size: int) -> int:
        """This shape's micro-batches per rank; a ConfigError unless world_size divides their number."""
        n = self.micro_batches
        if n % world_size:
            raise ConfigError(
                f"a batch of {self.tokens_per_step} tokens in micro-batches of {self.micro_batch_tokens} "
                f"is {n} micro-batches per step, not divisible by the world size {world_size}; choose a "
                f"world size that divides {n}")
        return n // world_size


OptimizerChoice = Literal["muon", "adam"]


def choices(literal) -> tuple[str, ...]:
    """The allowed values of an enum-like field type (a ``Literal``)."""
    return typing.get_args(literal)


@dataclass
class ModelConfig:
    """The GPT. Layers are numbered 0..num_layers-1 (the reference's empty slot 0 is dropped, so the
    reference's layer i is our layer i-1)."""
    vocab_size: int = 50257            # real vocabulary; the embedding is padded (see padded_vocab_size)
    vocab_multiple: int = 128          # pad the vocabulary up to a multiple of this
    num_layers: int = 11
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_ratio: int = 4                 # hidden = mlp_ratio * model_dim
    no_attention_layers: list[int] = field(default_factory=lambda: [6])   # layers that have only an MLP
    long_window_layers: list[int] = field(default_factory=lambda: [3, 10])
    # value embeddings: entry i = index of the value-embedding table layer i uses, -1 = none.
    # The number of tables is max(entry)+1 (record: 3 tables, ve1 ve2 on layers 0,1; ve0 ve1 ve2 on 8,9,10).
    value_embed_layers: list[int] = field(default_factory=lambda: [1, 2, -1, -1, -1, -1, -1, -1, 0, 1, 2])
    skip_from_layer: int = 3           # U-net skip: output of this layer ...
    skip_to_layer: int = 6             # ... is added (sigmoid-gated) before this layer
    backout_layer: int = 7             # output of this layer is subtracted (scaled) before the head
    gate_dim: int = 12                 # smear / attention gates read the first gate_dim dims
    attn_scale: float = 0.1            # softmax scale (not 1/sqrt(head_dim)); YaRN rescales it
    rope_base: float = 1024.0          # rotary frequencies span 1 ... 1/rope_base rad/token
    rope_max_positions: int = 262144   # rotary table length (positions are packed-buffer offsets)
    block_size: int = 128              # window sizes are counted in blocks of this many tokens
    logit_softcap: float = 30.0        # logits <- cap * sigmoid(z / (cap/4)); 0 disables
    block_lambda_init: float = 1.1
    skip_gate_init: float = -1.5
    value_lambda_init: float = 0.5
    backout_lambda_init: float = 0.5
    # technique switches (the record switches all on)
    rotary: bool = True
    yarn: bool = True
    qk_norm: bool = True
    relu_squared: bool = True          # False: GELU MLP
    value_embeds: bool = True
    smear: bool = True
    attn_gate: bool = True
    skip_connection: bool = True
    block_lambdas: bool = True
    backout: bool = True
    zero_init_outputs: bool = True     # zero-init attention/MLP output projections and lm_head
    fp8_head: bool = True              # FP8 lm_head matmul in training on GPUs that support it
    fp8_head_scales: list[float] = field(default_factory=list)   # its fixed [x_s, w_s, grad_s]; [] =
    #                                    record 45's (sqrt(dim)/448, 2^-9, 1/448: |w| <= 0.875); record
    #                                    89: [100/448, 1.6/448, 0.75/448] (a tied embedding grows past 0.875)
    attention_backend: AttentionBackend = "auto"
    fused_loss: bool = True            # training loss through the Triton softcapped cross-entropy on
    #                                    CUDA (no fp32 logits); with the FP8 head, head + loss are one
    #                                    op whose backward writes the e5m2 logit gradient and its
    #                                    transpose directly (kernels/fp8_head_ce.py); the plain
    #                                    softcap + F.cross_entropy else
    fused_mlp: bool = True             # MLP through the fused Triton kernels on CUDA (bf16 relu² only);
    #                                    the plain twin elsewhere
    # record 89: attention (head-spec.md; all off = record 45's attention). Record 89's values:
    # paired [0,2,5,9], key_offset on, xsa [1,3,4,7], dc [10] (window 112), out gates [3,10], lambdas on
    paired_head_layers: list[int] = field(default_factory=list)  # heads h and h+H/2 share one softmax
    #                                    over a 2T-row stream (model/attention.py: to_stream)
    key_offset: bool = False           # long-window layers: the stationary half of k shifted one token
    xsa_layers: list[int] = field(default_factory=list)  # y -= tanh(a) (y.v / |v|^2) v per head
    dc_layers: list[int] = field(default_factory=list)   # lightweight DC-MHA (kernels/dc_mha.py)
    dc_window: int = 112               # DC's own softmax sees this many keys (the query included)
    attn_out_gate_layers: list[int] = field(default_factory=list)  # y_h *= g_h (linear, init 0.25)
    attn_lambdas: bool = False         # learned scalars scaling [Wq;Wk;Wv] (init 0.5) and Wo (1.0)
    fused_dc: bool = True              # DC-MHA through its Triton kernels on CUDA (kernels/dc_mha.py);
    #                                    the plain twin elsewhere and with it off

    # record 89: embeddings and residual stream (head-spec.md; docs/architecture.md lists each switch
    # with its record-89 value). Every default is the record-45 behaviour (the technique is off).
    # Per-token coefficients: with mudd_gates on, the x0 gates, bigram gates, the skip gate and the
    # attention coefficients (XSA alphas, output gates, DC weights) come from the two MUDD gate MLPs;
    # with mudd_gates off, a technique that is on gets a learned per-layer constant (label
    # "gate_constants") starting at the gate MLP's initial output, so each switch ablates alone (the
    # skip gate alone has no constant: sigmoid(skip logit) already is one). The attention
    # coefficients are produced for the layers in xsa_layers / attn_out_gate_layers / dc_layers and
    # the attention lambdas (the scalars vector) with attn_lambdas (the attention block above).
    bigram_embed: bool = False         # hashed bigram embedding added to the residual (record 62/68):
    #                                    row (36313 cur ^ 27191 prev) mod (bigram_vocab_size - 1),
    #                                    the last row at a sequence's first position; zero init; a
    #                                    gate before layer 0 and after every later attention
    bigram_vocab_size: int = 377280    # table rows (record 89: 50304 * 15 // 2)
    bigram_sign_rows: int = 8192       # sign trick (record 83): rows of a fixed +-1 table indexed by
    #                                    (prev ^ cur) mod rows; 0 = no signs
    value_embed_gates: bool = False    # record 55/70: v += 2 sigmoid(W [u[:k], ve[:k]]) * ve per head
    #                                    (u the normed attention input, k value_embed_gate_dim),
    #                                    in place of the value lambdas (l0, l1)
    value_embed_gate_dim: int = 6
    value_embed_init_std: float = 1.0  # record 89: 0.01
    residual_lambdas: bool = False     # x <- r x + p sublayer(norm x) for attention and MLP apart,
    #                                    r init sqrt(block_lambda_init), p init 1 (record 89)
    x0_gates: bool = False             # x += g x0 after each attention (record 89; init 0)
    attn_input_layer: int = -1         # record 77: attention of the layers after this one reads
    #                                    norm(output of this layer) instead of norm(x); -1 = off
    mudd: bool = False                 # MUDD connections (records 81/85): per-token coefficients from
    #                                    a small MLP at mudd_layer mix cached layer outputs into its v
    #                                    and residual (and give its lambdas / gates), a second one mixes
    #                                    them into the final residual; the backout is its coefficient
    mudd_layer: int = 10
    mudd_value_sources: list[int] = field(default_factory=lambda: [-1, 7, 9])   # layer outputs
    #                                    (-1 = the stack input) added to mudd_layer's v
    mudd_residual_sources: list[int] = field(default_factory=lambda: [-1, 7])
    mudd_final_sources: list[int] = field(default_factory=lambda: [-1, 7, 9, 3])
    mudd_final_value_embed: int = 0    # value-embedding table added to the final residual; -1 = none
    mudd_gates: bool = False           # the per-token coefficients from two gate MLPs (record 85):
    #                                    one on x0, one on the residual entering mudd_gate_layer
    mudd_gate_layer: int = 4
    mudd_hidden: int = 64              # hidden width of the MUDD and MUDD-gate MLPs
    mudd_scale: float = 0.1            # MUDD outputs are scale * (W2 gelu(W1 x) + b); the gate MLPs'
    #                                    scale is learned from this value
    logit_softcap_offset: float = 0.0  # logits <- cap * sigmoid((z + offset) / temperature):
    logit_softcap_temperature: float = 0.0   # record 89 (54): cap 23, offset 5, temperature 7.5;
    #                                    temperature 0 = cap / 4 (the symmetric softcap)
    tie_embed: bool = False            # the input embedding reads the lm_head weight (record 51) ...
    untie_after_step: int = -1         # ... until this step's update, then it is its own parameter
    #                                    (record 53/61; record 89: 847); -1 = tied to the end
    untie_at_stage: int = -1           # ... or until the update of the first odd step of this stage
    #                                    of schedule.stages (record 89: 2, i.e. step 847 of its 1270,
    #                                    81 of a 120-step run): follows a compressed schedule; -1 = off
    head_init_std: float = 0.0         # lm_head ~ N(0, std) (record 89: 0.005); 0 = zero_init_outputs
    attn_out_init_nonzero: bool = False   # record 64: Wo initialized like Wq/Wk/Wv, not zero
    fp8_mlp: bool = False              # training MLP forward in FP8 (record 89; kernels/fp8_mlp.py): up
    #                                    projection with the current amax of its input, down projection
    #                                    with delayed scales; backward bf16; eval bf16
    fp8_mlp_act_headroom: float = 1.80     # delayed activation scale = last amax(post) * this / 448
    fp8_mlp_weight_headroom: float = 1.12  # delayed W_proj scale = last refresh's amax * this / 448
    fp8_mlp_exact_steps: int = 16      # refreshes after steps < this use the exact W_proj scale

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.model_dim

    @property
    def num_value_embeds(self) -> int:
        return max([-1] + list(self.value_embed_layers)) + 1 if self.value_embeds else 0

    def has_attention(self, layer: int) -> bool:
        return layer not in self.no_attention_layers

    @property
    def logit_softcap_tau(self) -> float:
        """The softcap's temperature: logit_softcap_temperature, or cap / 4 when that is 0."""
        return self.logit_softcap_temperature or self.logit_softcap / 4

    def validate(self, source: str | None = None) -> "ModelConfig":
        """The model section's own checks (Config.validate adds those that involve other sections);
        ``source`` prefixes the messages (an export's config.json)."""
        m = self

        def _check(ok: bool, field_name: str, expected: str) -> None:
            _check_field(ok, field_name, expected, source)

        for name in ("vocab_size", "vocab_multiple", "num_layers", "model_dim", "num_heads", "head_dim",
                     "mlp_ratio", "gate_dim", "block_size", "rope_max_positions"):
            _check(getattr(m, name) >= 1, f"model.{name}", ">= 1")
        _check(all(i >= -1 for i in m.value_embed_layers), "model.value_embed_layers",
               "table indices >= 0, or -1 for none")
        _check(m.num_heads * m.head_dim == m.model_dim, "model.head_dim",
               f"num_heads*head_dim ({m.num_heads}*{m.head_dim}) must equal model_dim ({m.model_dim})")
        _check(m.head_dim % 4 == 0, "model.head_dim", "a multiple of 4 (rotary pairs)")
        _check(m.gate_dim <= m.model_dim, "model.gate_dim", f"at most model_dim ({m.model_dim})")
        _check(len(m.value_embed_layers) == m.num_layers, "model.value_embed_layers",
               f"a list of num_layers ({m.num_layers}) table indices (-1 = none)")
        for name in ("no_attention_layers", "long_window_layers"):
            for i in getattr(m, name):
                _check(0 <= i < m.num_layers, f"model.{name}", f"layer indices in [0, {m.num_layers})")
        _check_attention_layers(m, _check)
        if m.skip_connection:
            _check(0 <= m.skip_from_layer < m.skip_to_layer < m.num_layers, "model.skip_to_layer",
                   "0 <= skip_from_layer < skip_to_layer < num_layers")
        if m.backout:
            _check(0 <= m.backout_layer < m.num_layers, "model.backout_layer", f"in [0, {m.num_layers})")
        _check(m.logit_softcap >= 0, "model.logit_softcap", ">= 0 (0 disables)")
        _validate_record89(m, _check)
        _check(not m.fp8_head_scales or (len(m.fp8_head_scales) == 3 and all(v > 0 for v in m.fp8_head_scales)),
               "model.fp8_head_scales", "[] (record 45's) or three positive scales [x_s, w_s, grad_s]")
        if m.fp8_mlp:
            _check(m.relu_squared, "model.fp8_mlp", "false unless model.relu_squared is on (the FP8 MLP is relu²)")
            _check(m.fp8_mlp_act_headroom >= 1, "model.fp8_mlp_act_headroom", ">= 1 (a margin over the last amax)")
            _check(m.fp8_mlp_weight_headroom >= 1, "model.fp8_mlp_weight_headroom",
                   ">= 1 (a margin over the last amax)")
            _check(m.fp8_mlp_exact_steps >= 0, "model.fp8_mlp_exact_steps", ">= 0")
        return self

    def parameter_count(self) -> int:
        """Parameters of the GPT this config builds, from the shapes alone (the scalars, a few per
        layer, left out): lets a caller refuse an absurd size before allocating anything."""
        V, d = self.padded_vocab_size, self.model_dim
        attention_layers = sum(self.has_attention(i) for i in range(self.num_layers))
        count = V * d * (2 + self.num_value_embeds)          # embedding, lm_head, value embeddings
        count += attention_layers * 4 * d * d                # q, k, v, o
        count += attention_layers * self.gate_dim * self.num_heads if self.attn_gate else 0
        count += self.num_layers * 2 * d * self.mlp_dim      # MLP up and down
        count += self.bigram_vocab_size * d if self.bigram_embed else 0   # record 89's bigram table
        return count + (self.gate_dim if self.smear else 0)

    def check_fits(self, available_bytes: int | None, bytes_per_param: float, where: str,
                   source: str | None = None) -> None:
        """Refuse a model whose weights (times ``bytes_per_param``: 4 for fp32 weights, more with
        gradients and optimizer state) exceed ``available_bytes`` of ``where``, naming the size fields.
        ``None``: the available memory is unknown, nothing is checked."""
        if available_bytes is None:
            return
        count = self.parameter_count()
        need = count * bytes_per_param
        if need > available_bytes:
            raise ConfigError(
                f"{source + ': ' if source else ''}model.num_layers {self.num_layers}, model.model_dim {self.model_dim}, "
                f"model.mlp_ratio {self.mlp_ratio} and model.vocab_size {self.vocab_size} make a model of "
                f"{count:,} parameters needing at least {human_bytes(need)}, more than the "
                f"{human_bytes(available_bytes)} of memory available on {where}; check these fields")


@dataclass
class MuonConfig:
    """NorMuon (Polar Express orthogonalization + second-moment normalization) for block matrices."""
    lr: float = 0.03
    weight_decay: float = 1.2
    momentum: float = 0.95
    momentum_min: float = 0.85         # momentum warms up from this ... and cools down to it
    momentum_warmup_steps: int = 300
    momentum_cooldown_steps: int = 50
    beta2: float = 0.95                # NorMuon second-moment EMA
    normalize: bool = True             # False: plain Muon (no second-moment normalization)
    cautious_weight_decay: bool = True # False: decoupled decay everywhere
    nesterov: bool = True
    c_fc_lr_mul: float = 2.0           # lr multiplier of the MLP up-projection (transposed layout)
    c_proj_lr_mul: float = 1.0         # lr multiplier of the MLP down-projection (record 89: 4.0 =
    #                                    its tall storage's shape factor 2 times its c_proj factor 2)
    axis: MuonAxis = "stored"          # NorMuon statistic axis: from the param's stored shape (record
    #                                    45) or from each orthogonalized matrix's own (out, in) shape
    #                                    (record 48 on: "matrix")
    qk_head_pairs: bool = False        # orthogonalize Wq, Wk per pair of heads (record 80 on)
    bf16_weights: bool = False         # block matrices stored bf16, their fp32 masters kept exactly
    #                                    through a 16-bit mantissa buffer; momentum fp32 (record 57 on)
    kernel: KernelChoice = "auto"      # Polar Express implementation


@dataclass
class AdamGroup:
    """The Adam hyperparameters of one parameter label: lr multiplier, betas ([] = optim.adam's
    beta1, beta2) and weight-decay multiplier (decay = lr * weight_decay * wd_mul)."""
    lr_mul: float = 1.0
    betas: list[float] = field(default_factory=list)
    wd_mul: float = 1.0


def _group(lr_mul: float = 1.0, betas: tuple[float, ...] = (), wd_mul: float = 1.0):
    return field(default_factory=lambda: AdamGroup(lr_mul, list(betas), wd_mul))


@dataclass
class AdamConfig:
    """Adam for embeddings, value embeddings, lm_head, scalars and the record-89 small parameters;
    one AdamGroup per parameter label (speedrun/optim/build.py reads them by label)."""
    lr: float = 0.008
    beta1: float = 0.65
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    cautious_weight_decay: bool = False
    decay_form: AdamDecay = "lr"       # lr: p -= lr_eff * weight_decay * wd_mul * [u p >= 0] * p, then the
    #                                    step (record 45's form); lr_squared (record 89, records 50+):
    #                                    p -= step + lr_eff^2 * weight_decay * wd_mul * [u p > 0] * p
    every_other_step: bool = True      # step on odd steps with the summed gradients of two steps
    state_dtype: StateDtype = "bfloat16"
    kernel: KernelChoice = "auto"      # the fused update or its twin
    sparse_bigram_comms: SparseComms = "auto"   # the bigram table's gradient reduced as its nonzero rows
    #                                    only (distributed.py:sparse_reduce_scatter_avg); auto = on with
    #                                    8 or more ranks (as the record: there a rank's batch touches a
    #                                    small share of the rows), off below
    # record 45's labels (defaults: record 45)
    embed: AdamGroup = _group(75.0)
    value_embed: AdamGroup = _group(75.0)
    lm_head: AdamGroup = _group(1.0)
    scalars: AdamGroup = _group(5.0)
    # labels that exist only with a record-89 technique on (defaults: record 89, r89-model.md 10)
    bigram_embed: AdamGroup = _group(75.0, (0.75, 0.95), 5.0)
    ve_gate: AdamGroup = _group(1.0, (0.9, 0.99), 1.0)
    resid_lambdas: AdamGroup = _group(5.0, (0.9, 0.95), 0.0)
    post_lambdas: AdamGroup = _group(1.0, (0.9, 0.95), 0.0)
    mudd: AdamGroup = _group(0.25, (0.9, 0.99), 1.0)            # the MUDD MLPs' weights
    mudd_bias: AdamGroup = _group(0.25, (0.9, 0.99), 0.0)       # ... and output biases
    mudd_gate: AdamGroup = _group(0.1, (0.9, 0.99), 1.0)        # the gate MLPs' weights
    mudd_gate_bias: AdamGroup = _group(0.1, (0.9, 0.99), 0.0)   # ... output biases and scale
    gate_constants: AdamGroup = _group(1.0, (0.9, 0.99), 0.0)   # the gates without mudd_gates
    smear_gate: AdamGroup = _group(0.01, (0.9, 0.99), 0.0)      # with optim.smear_gate_optimizer adam


@dataclass
class OptimConfig:
    muon: MuonConfig = field(default_factory=MuonConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)
    smear_gate_optimizer: OptimizerChoice = "muon"   # record 89: adam


@dataclass
class StageConfig:
    """One stage of the training schedule (``schedule.stages``): what holds from its first step to
    its last. The loss weights are interpolated linearly inside the stage (start at its first step;
    the end value is approached, never reached: t = (step - first) / steps_of_the_stage)."""
    share: float = 0.0                 # fraction of the scheduled steps; 0 = the extension stage
    tokens_per_step: int = 0           # global batch in tokens; 0 = train.tokens_per_step
    max_doc_len: int = 0               # training documents are cut here; 0 = data.max_doc_len
    windows: list[int] = field(default_factory=lambda: [1, 3])   # attention windows [short, long], blocks
    lr_mul: float = 1.0                # multiplier of every base lr (before the cooldown blends it to the floor)
    mtp_weights_start: list[float] = field(default_factory=lambda: [1.0])   # loss weight of the k-th next token
    mtp_weights_end: list[float] = field(default_factory=lambda: [1.0])
    prefix_weight_start: float = 0.0   # loss weight of the next token's prefix token
    prefix_weight_end: float = 0.0


@dataclass
class ScheduleConfig:
    """Everything that is a pure function of the step (see speedrun/optim/schedules.py).

    Two ways to write it. ``stages`` (a table, record 89): each scheduled stage's share of the steps,
    global batch, document cap, windows, lr multiplier and loss weights, then one extension stage
    (share 0). Without ``stages`` (record 45's shorthand): one batch (train.tokens_per_step), one
    document cap (data.max_doc_len), the windows of ``window_stages`` over equal shares and
    ``extension_window``, and record 45's lr formula."""
    num_scheduled_steps: int = 2185
    num_extension_steps: int = 40      # run at the final lr with the extension window
    cooldown_frac: float = 0.5         # lr decays linearly over the last cooldown_frac of the steps
    final_lr_frac: float = 0.1         # ... down to this fraction of the base lr (the floor)
    window_stages: list[int] = field(default_factory=lambda: [3, 7, 11])  # long window (blocks) per stage
    extension_window: int = 13         # long window during the extension steps
    final_val_window: int = 20         # long window for the last validation only (no YaRN update)
    short_window_ratio: float = 0.5    # short window = long * ratio (rounded down, at least 1 block)
    stages: list[StageConfig] = field(default_factory=list)   # the stage table; [] = the shorthand above

    @property
    def total_steps(self) -> int:
        return self.num_scheduled_steps + self.num_extension_steps

    def stage_bounds(self) -> list[int]:
        """First step of every stage, then total_steps: stage i runs steps [b[i], b[i+1]).

        Table: the scheduled stages end at round(cumulative share * num_scheduled_steps) (shares
        summed in order, Python's round), the last one at num_scheduled_steps; the extension stage
        follows (record 89: [0, 423, 847, 1270, 1285]). Shorthand: len(window_stages) equal stages,
        stage k from ceil(k * num_scheduled_steps / len) (integer arithmetic; record 45:
        [0, 729, 1457, 2185, 2225])."""
        n, bounds = self.num_scheduled_steps, [0]
        if self.stages:
            cumulative = 0.0
            for stage in self.stages[:-2]:
                cumulative += stage.share
                bounds.append(round(cumulative * n))
        else:
            k = len(self.window_stages)
            bounds += [-(-i * n // k) for i in range(1, k)]
        return bounds + [n, self.total_steps]


# the shorthand's fields: a table (schedule.stages) says the same per stage, so these must stay unset
SHORTHAND_FIELDS = ("window_stages", "extension_window", "short_window_ratio")


@dataclass
class DataConfig:
    train_path: str = ""               # glob of train .bin shards; "" = embedded corpus
    val_path: str = ""                 # glob of val .bin shards; "" = embedded corpus val split
    bos_id: int = 50256
    max_doc_len: int = 2048            # BOS-aligned segments are cut at this many tokens
    wrap: bool = False                 # restart at the first train shard when data runs out
    async_loading: bool = True         # index the next shard in a background thread
    max_num_docs_rule: MaxNumDocsRule = "spare"   # cu_seqlens length per micro-batch size
    #                                    (data/loader.py:max_num_docs_for): spare = room for documents
    #                                    averaging 300 tokens + 128; tight = record 89's table


@dataclass
class TrainConfig:
    tokens_per_step: int = 262144      # global tokens per optimizer step (the recipe's batch)
    sequence_tokens: int = 32768       # tokens per micro-batch (per rank per accumulation step)
    micro_batches_per_step: int = 0    # 0: every micro-batch has sequence_tokens tokens (record 45);
    #                                    N: every step is N micro-batches over all ranks, each of
    #                                    batch / N tokens, growing with the stage's batch (record 89: 8)
    val_tokens: int = 10485760
    val_sequence_tokens: int = 262144  # tokens per validation forward (per rank)
    val_every: int = 250               # validate every N steps (and at step 0 and the end); 0 = only at the end
    seed: int = 0
    compile: bool = True               # torch.compile (regional: one block at a time) on CUDA
    warmup_compile: bool = True        # untimed warm-up (compiles every graph), then state restored
    parallel_warmup: bool = True       # CUDA: a helper process compiles the eval graphs meanwhile
    compile_dynamic: CompileDynamic = "auto"  # compile the regions with a symbolic token count, so
    #                                    every micro-batch length shares one set of graphs; auto = on
    #                                    when the stage table's micro-batch length changes (record 89)
    save_every: int = 0                # checkpoint every N steps (0 = only at the end)
    save_path: str = ""                # run directory ("" = runs/<timestamp>)
    log_every: int = 1
    device: DeviceChoice = "auto"
    dtype: ActivationDtype = "auto"    # activations: auto = bf16 on CUDA, fp32 on CPU
    memory_pool: bool = False          # expandable-segments CUDA allocator (less fragmentation)
    cuda_graphs: CudaGraphs = "auto"   # replay forward/backward micro-steps as a CUDA graph
    nan_guard: bool = True
    max_steps: int = 0                 # stop after this many steps (0 = the whole schedule); the
    #                                    schedules stay the full recipe's, so a short run is its prefix
    collective_timeout_s: float = 600.0  # multi-process runs: a collective (or the start-up
    #                                    rendezvous) waiting longer ends the rank (gloo: a one-line
    #                                    error; NCCL: PyTorch's watchdog, ~25 s later), so a dead or
    #                                    hung peer cannot hold the others for ever; keep it above the
    #                                    longest wait between ranks (compile skew, checkpoint writes)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived quantities -------------------------------------------------------------------
    def batch_shape(self, stage: StageConfig | None = None) -> BatchShape:
        """The batch of a stage (None: the shorthand's one batch): global tokens, tokens per
        micro-batch, document cap. 0 in a stage means the train/data field."""
        t = self.train
        batch = (stage.tokens_per_step if stage else 0) or t.tokens_per_step
        cap = (stage.max_doc_len if stage else 0) or self.data.max_doc_len
        n = t.micro_batches_per_step
        return BatchShape(batch, batch // n if n else t.sequence_tokens, cap)

    def batch_shapes(self) -> list[BatchShape]:
        """The batch of every stage in table order (extension last); one for the shorthand."""
        return [self.batch_shape(s) for s in self.schedule.stages] or [self.batch_shape()]

    def _batch_fields(self) -> list[str]:
        """The field that sets each entry of batch_shapes(), for error messages."""
        if not self.schedule.stages:
            return ["train.tokens_per_step"]
        return [f"schedule.stages[{i}].tokens_per_step" for i in range(len(self.schedule.stages))]

    def compile_dynamic(self) -> bool:
        """Whether the compiled regions take the token count as a symbol (train.compile_dynamic;
        auto: when the stage table uses more than one micro-batch length, whose graphs would each
        be compiled again with static shapes)."""
        mode = self.train.compile_dynamic
        if mode == "auto":
            return len({shape.micro_batch_tokens for shape in self.batch_shapes()}) > 1
        return mode == "on"

    def untie_step(self) -> int:
        """The step after whose update the embedding is untied from the lm_head (model.untie_after_step,
        or the first odd step of stage model.untie_at_stage); -1: never (or not tied at all)."""
        m = self.model
        if not m.tie_embed:
            return -1
        if m.untie_at_stage >= 0:
            return self.schedule.stage_bounds()[m.untie_at_stage] | 1
        return m.untie_after_step

    def embed_tied_at(self, step: int) -> bool:
        """Whether the input embedding reads the lm_head weight when optimizer step ``step`` runs."""
        untie = self.untie_step()
        return self.model.tie_embed and (untie < 0 or step <= untie)

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps per rank in the first stage so that world_size ranks together cover
        one recipe step; a ConfigError unless world_size divides every stage's micro-batch count."""
        shapes = self.batch_shapes()
        for name, shape in zip(self._batch_fields(), shapes):
            try:
                shape.grad_accum(world_size)
            except ConfigError as e:
                raise ConfigError(f"config field '{name}': {e}") from None
        return shapes[0].grad_accum(world_size)

    def validate(self) -> "Config":
        m, t, s, d = self.model, self.train, self.schedule, self.data
        _check_choices(self, "")
        m.validate()
        if self.optim.muon.qk_head_pairs:
            _check(m.num_heads % 2 == 0, "optim.muon.qk_head_pairs",
                   f"an even model.num_heads to orthogonalize Wq, Wk per head pair (got {m.num_heads})")
        if m.tie_embed and m.untie_after_step >= 0 and self.optim.adam.every_other_step:
            _check(m.untie_after_step % 2 == 1, "model.untie_after_step",
                   "an odd step (an Adam step with optim.adam.every_other_step: the tied gradient "
                   "of the step before is still pending on an even one)")
        for name, group in _adam_groups(self.optim.adam):
            _check(len(group.betas) in (0, 2) and all(0 <= b < 1 for b in group.betas),
                   f"optim.adam.{name}.betas", "[] (optim.adam's beta1, beta2) or two values in [0, 1)")
            _check(group.lr_mul >= 0 and group.wd_mul >= 0, f"optim.adam.{name}.lr_mul",
                   "lr_mul >= 0 and wd_mul >= 0")
        _check(t.tokens_per_step > 0 and t.sequence_tokens > 0, "train.tokens_per_step", "> 0")
        _check(t.micro_batches_per_step >= 0, "train.micro_batches_per_step",
               ">= 0 (0 = micro-batches of train.sequence_tokens)")
        if not t.micro_batches_per_step:
            _check(t.tokens_per_step % t.sequence_tokens == 0, "train.sequence_tokens",
                   f"a divisor of train.tokens_per_step ({t.tokens_per_step})")
            _check(t.sequence_tokens % 16 == 0, "train.sequence_tokens", "a multiple of 16")
        _check(t.val_sequence_tokens > 0 and t.val_sequence_tokens % 16 == 0, "train.val_sequence_tokens",
               "a positive multiple of 16")
        _check(t.val_tokens > 0 and t.val_tokens % t.val_sequence_tokens == 0, "train.val_tokens",
               f"a positive multiple of train.val_sequence_tokens ({t.val_sequence_tokens})")
        _check(d.max_doc_len >= 2, "data.max_doc_len", ">= 2")
        _check(0 <= d.bos_id < m.vocab_size, "data.bos_id", f"a token id below model.vocab_size ({m.vocab_size})")
        _check(s.num_scheduled_steps > 0, "schedule.num_scheduled_steps", "> 0")
        _check(s.num_extension_steps >= 0, "schedule.num_extension_steps", ">= 0")
        _check(0 <= s.cooldown_frac <= 1, "schedule.cooldown_frac", "in [0, 1]")
        if s.stages:
            self._validate_stages()
        else:
            _check(len(s.window_stages) > 0 and all(w > 0 for w in s.window_stages),
                   "schedule.window_stages", "a non-empty list of positive window sizes (blocks)")
        for name, shape in zip(self._batch_fields(), self.batch_shapes()):
            self._validate_batch(name, shape)
        _check(m.untie_at_stage >= -1, "model.untie_at_stage", ">= -1 (-1 = off)")
        if m.untie_at_stage >= 0:
            _check(m.untie_after_step == -1, "model.untie_at_stage",
                   "-1 when model.untie_after_step is set (one untie point)")
            _check(bool(s.stages) and m.untie_at_stage < len(s.stages) - 1, "model.untie_at_stage",
                   f"a scheduled stage of schedule.stages (0..{len(s.stages) - 2}), or -1")
            _check(self.untie_step() < s.total_steps, "model.untie_at_stage",
                   f"a stage whose first odd step is a training step (< {s.total_steps})")
        _check(t.max_steps >= 0, "train.max_steps", ">= 0 (0 = the whole schedule)")
        _check(t.collective_timeout_s > 0, "train.collective_timeout_s", "> 0 seconds")
        _check(t.val_every >= 0, "train.val_every", ">= 0 (0 = only at the start and the end)")
        _check(t.save_every >= 0, "train.save_every", ">= 0 (0 = only at the end)")
        _check(t.log_every >= 1, "train.log_every", ">= 1")
        return self

    def _validate_stages(self) -> None:
        """The stage table: scheduled stages (share > 0) summing to 1, then one extension stage."""
        s = self.schedule
        default = ScheduleConfig()
        for name in SHORTHAND_FIELDS:
            _check(getattr(s, name) == getattr(default, name), f"schedule.{name}",
                   f"unset ({getattr(default, name)}) with a stage table: schedule.stages[i].windows "
                   "sets the windows of each stage")
        *scheduled, extension = s.stages
        _check(extension.share == 0 and scheduled and all(st.share > 0 for st in scheduled),
               "schedule.stages", "scheduled stages (share > 0) followed by one extension stage (share 0)")
        total = 0.0
        for st in scheduled:
            total += st.share
        _check(abs(total - 1) < 1e-6, "schedule.stages",
               f"shares of the scheduled stages summing to 1 (they sum to {total})")
        for i, st in enumerate(s.stages):
            f = f"schedule.stages[{i}]"
            _check(len(st.windows) == 2 and all(w >= 1 for w in st.windows), f"{f}.windows",
                   "[short, long] window sizes in blocks, each >= 1")
            _check(st.tokens_per_step >= 0, f"{f}.tokens_per_step", ">= 0 (0 = train.tokens_per_step)")
            _check(st.max_doc_len == 0 or st.max_doc_len >= 2, f"{f}.max_doc_len",
                   ">= 2 (0 = data.max_doc_len)")
            _check(st.lr_mul >= 0, f"{f}.lr_mul", ">= 0")
            _check(len(st.mtp_weights_start) >= 1 and len(st.mtp_weights_start) == len(st.mtp_weights_end),
                   f"{f}.mtp_weights_end", f"as many weights as mtp_weights_start ({len(st.mtp_weights_start)}), "
                   "at least one (the next token's)")
        bounds = s.stage_bounds()
        for i in range(len(scheduled)):
            _check(bounds[i + 1] > bounds[i], f"schedule.stages[{i}].share",
                   f"a share that gives the stage at least one of the {s.num_scheduled_steps} scheduled steps")

    def _validate_batch(self, name: str, shape: BatchShape) -> None:
        t, m, n = self.train, self.model, self.train.micro_batches_per_step
        _check(shape.tokens_per_step > 0, name, "> 0")
        if n:
            _check(shape.tokens_per_step % (16 * n) == 0, name,
                   f"a multiple of 16 * train.micro_batches_per_step ({16 * n}): {n} micro-batches "
                   "of a multiple of 16 tokens")
        else:
            _check(shape.tokens_per_step % t.sequence_tokens == 0, name,
                   f"a multiple of train.sequence_tokens ({t.sequence_tokens}), the micro-batch")
        _check(shape.micro_batch_tokens <= m.rope_max_positions, name if n else "train.sequence_tokens",
               f"micro-batches of at most model.rope_max_positions ({m.rope_max_positions}) tokens "
               f"(here {shape.micro_batch_tokens})")

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Config":
        return _build(cls, _renamed(data), source, prefix="")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def override(self, dotted: dict[str, Any]) -> "Config":
        """Apply ``{"optim.muon.lr": "0.02", ...}``; string values are parsed as the field's type."""
        for key, raw in dotted.items():
            key = RENAMED_FIELDS.get(key, key)
            obj, parts = self, key.split(".")
            for part in parts[:-1]:
                if not dataclasses.is_dataclass(obj) or part not in _field_names(obj):
                    raise ConfigError(f"unknown config field '{key}'")
                obj = getattr(obj, part)
            name = parts[-1]
            if not dataclasses.is_dataclass(obj) or name not in _field_names(obj):
                raise ConfigError(f"unknown config field '{key}'")
            ftype = _field_types(type(obj))[name]
            if dataclasses.is_dataclass(ftype):
                raise ConfigError(f"config field '{key}' is a section; set one of its fields")
            value = _parse_value(raw, ftype, key) if isinstance(raw, str) else _coerce(raw, ftype, key)
            setattr(obj, name, value)
        return self


# Fields that moved: old dotted name -> new one. Configs saved before the move (a run's config.json,
# a checkpoint's meta.json, an export) and old command lines keep working.
RENAMED_FIELDS = {
    "optim.adam.embed_lr_mul": "optim.adam.embed.lr_mul",
    "optim.adam.value_embed_lr_mul": "optim.adam.value_embed.lr_mul",
    "optim.adam.head_lr_mul": "optim.adam.lm_head.lr_mul",
    "optim.adam.scalar_lr_mul": "optim.adam.scalars.lr_mul",
}


def _renamed(data: dict) -> dict:
    """``data`` with the fields of RENAMED_FIELDS under their new names (a copy where one moved)."""
    for old, new in RENAMED_FIELDS.items():
        *path, leaf = old.split(".")
        parent = data
        for part in path:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or leaf not in parent:
            continue
        data = json.loads(json.dumps(data))   # a deep copy of JSON data: the caller's stays as it was
        parent = data
        for part in path:
            parent = parent[part]
        value = parent.pop(leaf)
        *new_path, new_leaf = new.split(".")[len(path):]
        for part in new_path:
            parent = parent.setdefault(part, {})
        parent.setdefault(new_leaf, value)
    return data


def _adam_groups(adam: AdamConfig) -> list[tuple[str, AdamGroup]]:
    return [(f.name, getattr(adam, f.name)) for f in dataclasses.fields(adam)
            if isinstance(getattr(adam, f.name), AdamGroup)]


def _validate_record89(m: ModelConfig, check=None) -> None:
    """The record-89 switches of the residual side (each only when it is on)."""
    check = check or _check   # ModelConfig.validate passes its own, which names the file
    L = m.num_layers
    if m.bigram_embed:
        check(m.bigram_vocab_size >= 2, "model.bigram_vocab_size", ">= 2 (hash rows + the first position's)")
        check(m.bigram_sign_rows >= 0, "model.bigram_sign_rows", ">= 0 (0 = no sign trick)")
    if m.value_embeds and m.value_embed_gates:
        check(1 <= m.value_embed_gate_dim <= m.model_dim, "model.value_embed_gate_dim",
               f"in [1, model_dim ({m.model_dim})]")
    check(m.value_embed_init_std > 0, "model.value_embed_init_std", "> 0")
    check(-1 <= m.attn_input_layer < L, "model.attn_input_layer", f"-1 (off) or a layer in [0, {L})")
    if m.mudd:
        check(0 <= m.mudd_layer < L and m.has_attention(m.mudd_layer), "model.mudd_layer",
               f"an attention layer in [0, {L})")
        check(all(-1 <= j < m.mudd_layer for j in m.mudd_value_sources), "model.mudd_value_sources",
               f"layers in [-1, mudd_layer) (-1 = the stack input, {m.mudd_layer - 1} = the residual itself)")
        check(all(-1 <= j < m.mudd_layer - 1 for j in m.mudd_residual_sources), "model.mudd_residual_sources",
               "layers in [-1, mudd_layer - 1) (the residual itself has its own coefficient)")
        check(all(-1 <= j < L - 1 for j in m.mudd_final_sources), "model.mudd_final_sources",
               f"layers in [-1, {L - 1}) (the last layer's output is the residual itself)")
        check(m.mudd_final_value_embed == -1 or 0 <= m.mudd_final_value_embed < m.num_value_embeds,
               "model.mudd_final_value_embed", f"-1 or a value-embedding table in [0, {m.num_value_embeds})")
        check(not m.value_embeds or m.value_embed_gates, "model.value_embed_gates",
               "true with model.mudd and model.value_embeds (MUDD adds to v the way the gated value "
               "embeddings do, not through the value lambdas)")
        check(m.num_heads % 2 == 0, "model.num_heads", "even with model.mudd (its value gate has one "
               "coefficient per half of the heads)")
        if m.backout:
            check(m.backout_layer in m.mudd_final_sources, "model.mudd_final_sources",
                   f"to hold backout_layer ({m.backout_layer}): with model.mudd the backout is the final "
                   "MUDD coefficient of that output (or set model.backout false)")
    for name in ("mudd_value_sources", "mudd_residual_sources", "mudd_final_sources"):
        check(len(set(getattr(m, name))) == len(getattr(m, name)), f"model.{name}", "no layer twice")
    if m.mudd_gates:
        check(1 <= m.mudd_gate_layer < L, "model.mudd_gate_layer", f"in [1, {L})")
    if m.mudd or m.mudd_gates:
        check(m.mudd_hidden >= 1 and m.mudd_scale > 0, "model.mudd_hidden", "mudd_hidden >= 1, mudd_scale > 0")
    check(m.logit_softcap_temperature >= 0, "model.logit_softcap_temperature", ">= 0 (0 = cap / 4)")
    if m.logit_softcap_offset or m.logit_softcap_temperature:
        check(m.logit_softcap > 0, "model.logit_softcap", "> 0 with a softcap offset or temperature")
    check(m.head_init_std >= 0, "model.head_init_std", ">= 0 (0 = the zero_init_outputs rule)")
    check(m.untie_after_step >= -1, "model.untie_after_step", ">= -1 (-1 = tied to the end)")
    if m.tie_embed:
        check(m.head_init_std > 0 or not m.zero_init_outputs, "model.head_init_std",
               "> 0 with model.tie_embed (the tied embedding starts as the lm_head, which would be zero)")


def _check(ok: bool, field_name: str, expected: str) -> None:
    _check_field(ok, field_name, expected)


def _check_field(ok: bool, field_name: str, expected: str, source: str | None = None) -> None:
    if not ok:
        raise ConfigError(f"{source + ': ' if source else ''}config field '{field_name}': expected {expected}")


def _check_attention_layers(m: ModelConfig, check=None) -> None:
    """Record 89's per-layer attention lists: attention layers only, no repeats, and the public
    code's exclusions (a paired layer's stream has no per-token v to project against (XSA), no
    token-level 112-key window (DC) and no token order to shift keys along (key offset))."""
    check = check or _check   # ModelConfig.validate passes its own, which names the file
    for name in ("paired_head_layers", "xsa_layers", "dc_layers", "attn_out_gate_layers"):
        layers = getattr(m, name)
        for i in layers:
            check(0 <= i < m.num_layers and m.has_attention(i), f"model.{name}",
                   f"indices of attention layers (in [0, {m.num_layers}), not in no_attention_layers)")
        check(len(set(layers)) == len(layers), f"model.{name}", "no repeated layer")
    paired = set(m.paired_head_layers)
    if paired:
        check(m.num_heads % 2 == 0, "model.paired_head_layers", f"an even num_heads (got {m.num_heads})")
    for name in ("xsa_layers", "dc_layers"):
        both = sorted(paired & set(getattr(m, name)))
        check(not both, f"model.{name}", f"no paired-head layer (both lists hold {both})")
    if m.key_offset:
        both = sorted(paired & set(m.long_window_layers))
        check(not both, "model.key_offset",
               f"no paired-head layer among the long-window layers it shifts (both hold {both})")
    check(1 <= m.dc_window <= 128, "model.dc_window", "in [1, 128] (keys, the query included)")


def _check_choices(obj, prefix: str) -> None:
    """Every enum-like (Literal) field of the tree holds one of its values (fields may have been
    assigned in code, past the checks of loading and overrides)."""
    for f in dataclasses.fields(obj):
        value, ftype = getattr(obj, f.name), _field_types(type(obj))[f.name]
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_choices(item, f"{prefix}{f.name}[{i}].")
        elif typing.get_origin(ftype) is Literal:
            _check(value in choices(ftype), f"{prefix}{f.name}", "one of " + ", ".join(choices(ftype)))


def _field_names(obj) -> set[str]:
    return {f.name for f in dataclasses.fields(obj)}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls, data: dict, source: str, prefix: str):
    types = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in types:
            raise ConfigError(f"{source}: unknown config field '{name}'")
        ftype = types[key]
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config field '{name}' must be an object")
            kwargs[key] = _build(ftype, value, source, prefix=f"{name}.")
        else:
            kwargs[key] = _coerce(value, ftype, name, source)
    return cls(**kwargs)


def _coerce(value, ftype, name: str, source: str = "override"):
    """Check a JSON value against the annotated type (int accepted for float; nothing else implicit)."""
    origin = typing.get_origin(ftype)
    if origin is Literal:
        if value in choices(ftype):
            return value
        raise ConfigError(f"{source}: config field '{name}': expected one of {', '.join(choices(ftype))}, "
                          f"got {value!r}")
    if origin in (list, tuple):
        (elem,) = typing.get_args(ftype)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: config field '{name}': expected a list, got {value!r}")
        if dataclasses.is_dataclass(elem):   # a list of sections (schedule.stages): objects
            out = []
            for i, v in enumerate(value):
                if isinstance(v, elem):
                    out.append(v)
                elif isinstance(v, dict):
                    out.append(_build(elem, v, source, prefix=f"{name}[{i}]."))
                else:
                    raise ConfigError(f"{source}: config field '{name}[{i}]' must be an object")
            return out
        return [_coerce(v, elem, name, source) for v in value]
    if ftype is bool:
        if isinstance(value, bool):
            return value
    elif ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ftype is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif ftype is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{source}: config field '{name}': expected {getattr(ftype, '__name__', ftype)}, "
                      f"got {value!r}")


def _parse_value(raw: str, ftype, name: str):
    """Parse a command-line string as the field's type: JSON for numbers/lists/bools, raw for str."""
    if ftype is str:
        return raw
    if typing.get_origin(ftype) is Literal:
        return _coerce(raw, ftype, name)
    if ftype is bool and raw.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return raw.lower() in ("true", "1", "yes", "on")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"config field '{name}': cannot parse {raw!r} as "
                          f"{getattr(ftype, '__name__', ftype)}") from None
    return _coerce(value, ftype, name)
