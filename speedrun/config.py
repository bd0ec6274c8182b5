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
from typing import Any

from speedrun.utils import atomic_write_text, human_bytes


class ConfigError(ValueError):
    """A config file, field or value is wrong; the message names the field and what was expected."""


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
    attention_backend: str = "auto"    # auto | flex | flash | sdpa
    fused_loss: bool = True            # training loss through the Triton softcapped cross-entropy on
    #                                    CUDA (no fp32 logits); with the FP8 head, head + loss are one
    #                                    op whose backward writes the e5m2 logit gradient and its
    #                                    transpose directly (kernels/fp8_head_ce.py); the plain
    #                                    softcap + F.cross_entropy else
    fused_mlp: bool = True             # MLP through the fused Triton kernels on CUDA (bf16 relu² only);
    #                                    the plain twin elsewhere

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
        if m.skip_connection:
            _check(0 <= m.skip_from_layer < m.skip_to_layer < m.num_layers, "model.skip_to_layer",
                   "0 <= skip_from_layer < skip_to_layer < num_layers")
        if m.backout:
            _check(0 <= m.backout_layer < m.num_layers, "model.backout_layer", f"in [0, {m.num_layers})")
        _check(m.attention_backend in ("auto", "flex", "flash", "sdpa"), "model.attention_backend",
               "one of auto, flex, flash, sdpa")
        _check(m.logit_softcap >= 0, "model.logit_softcap", ">= 0 (0 disables)")
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
    kernel: str = "auto"               # auto | triton | torch  (Polar Express implementation)


@dataclass
class AdamConfig:
    """Adam for embeddings, value embeddings, lm_head and scalars."""
    lr: float = 0.008
    beta1: float = 0.65
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    cautious_weight_decay: bool = False
    embed_lr_mul: float = 75.0
    value_embed_lr_mul: float = 75.0
    head_lr_mul: float = 1.0
    scalar_lr_mul: float = 5.0
    every_other_step: bool = True      # step on odd steps with the summed gradients of two steps
    state_dtype: str = "bfloat16"      # bfloat16 | float32
    kernel: str = "auto"               # auto | triton | torch  (the fused update or its twin)


@dataclass
class OptimConfig:
    muon: MuonConfig = field(default_factory=MuonConfig)
    adam: AdamConfig = field(default_factory=AdamConfig)


@dataclass
class ScheduleConfig:
    """Everything that is a pure function of the step (see speedrun/optim/schedules.py)."""
    num_scheduled_steps: int = 2185
    num_extension_steps: int = 40      # run at the final lr with the extension window
    cooldown_frac: float = 0.5         # lr decays linearly over the last cooldown_frac of the steps
    final_lr_frac: float = 0.1         # ... down to this fraction of the base lr
    window_stages: list[int] = field(default_factory=lambda: [3, 7, 11])  # long window (blocks) per stage
    extension_window: int = 13         # long window during the extension steps
    final_val_window: int = 20         # long window for the last validation only (no YaRN update)
    short_window_ratio: float = 0.5    # short window = long * ratio (rounded down, at least 1 block)

    @property
    def total_steps(self) -> int:
        return self.num_scheduled_steps + self.num_extension_steps


@dataclass
class DataConfig:
    train_path: str = ""               # glob of train .bin shards; "" = embedded corpus
    val_path: str = ""                 # glob of val .bin shards; "" = embedded corpus val split
    bos_id: int = 50256
    max_doc_len: int = 2048            # BOS-aligned segments are cut at this many tokens
    wrap: bool = False                 # restart at the first train shard when data runs out
    async_loading: bool = True         # index the next shard in a background thread


@dataclass
class TrainConfig:
    tokens_per_step: int = 262144      # global tokens per optimizer step (the recipe's batch)
    sequence_tokens: int = 32768       # tokens per micro-batch (per rank per accumulation step)
    val_tokens: int = 10485760
    val_sequence_tokens: int = 262144  # tokens per validation forward (per rank)
    val_every: int = 250               # validate every N steps (and at step 0 and the end); 0 = only at the end
    seed: int = 0
    compile: bool = True               # torch.compile (regional: one block at a time) on CUDA
    warmup_compile: bool = True        # untimed warm-up (compiles every graph), then state restored
    parallel_warmup: bool = True       # CUDA: a helper process compiles the eval graphs meanwhile
    save_every: int = 0                # checkpoint every N steps (0 = only at the end)
    save_path: str = ""                # run directory ("" = runs/<timestamp>)
    log_every: int = 1
    device: str = "auto"               # auto | cpu | cuda
    dtype: str = "auto"                # activation dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    memory_pool: bool = False          # expandable-segments CUDA allocator (less fragmentation)
    cuda_graphs: str = "auto"          # replay forward/backward micro-steps as a CUDA graph: auto | on | off
    nan_guard: bool = True
    max_steps: int = 0                 # stop after this many steps (0 = the whole schedule); the
    #                                    schedules stay the full recipe's, so a short run is its prefix


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def micro_batches_per_step(self) -> int:
        """Number of sequence_tokens-sized micro-batches in one optimizer step, over all ranks."""
        return self.train.tokens_per_step // self.train.sequence_tokens

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps per rank so that world_size ranks together cover one recipe step."""
        n = self.micro_batches_per_step
        if n % world_size:
            raise ConfigError(
                f"train.tokens_per_step/train.sequence_tokens = {n} micro-batches per step is not "
                f"divisible by the world size {world_size}; choose a world size that divides {n}")
        return n // world_size

    def validate(self) -> "Config":
        m, t, s, d = self.model, self.train, self.schedule, self.data
        m.validate()
        _check(self.optim.muon.kernel in ("auto", "triton", "torch"), "optim.muon.kernel",
               "one of auto, triton, torch")
        _check(self.optim.adam.kernel in ("auto", "triton", "torch"), "optim.adam.kernel",
               "one of auto, triton, torch")
        _check(self.optim.adam.state_dtype in ("bfloat16", "float32"), "optim.adam.state_dtype",
               "bfloat16 or float32")
        _check(t.tokens_per_step > 0 and t.sequence_tokens > 0, "train.tokens_per_step", "> 0")
        _check(t.tokens_per_step % t.sequence_tokens == 0, "train.sequence_tokens",
               f"a divisor of train.tokens_per_step ({t.tokens_per_step})")
        _check(t.sequence_tokens % 16 == 0, "train.sequence_tokens", "a multiple of 16")
        _check(t.val_sequence_tokens > 0 and t.val_sequence_tokens % 16 == 0, "train.val_sequence_tokens",
               "a positive multiple of 16")
        _check(t.val_tokens > 0 and t.val_tokens % t.val_sequence_tokens == 0, "train.val_tokens",
               f"a positive multiple of train.val_sequence_tokens ({t.val_sequence_tokens})")
        _check(t.dtype in ("auto", "bfloat16", "float32"), "train.dtype", "one of auto, bfloat16, float32")
        _check(t.sequence_tokens <= m.rope_max_positions, "train.sequence_tokens",
               f"at most model.rope_max_positions ({m.rope_max_positions})")
        _check(d.max_doc_len >= 2, "data.max_doc_len", ">= 2")
        _check(0 <= d.bos_id < m.vocab_size, "data.bos_id", f"a token id below model.vocab_size ({m.vocab_size})")
        _check(s.num_scheduled_steps > 0, "schedule.num_scheduled_steps", "> 0")
        _check(s.num_extension_steps >= 0, "schedule.num_extension_steps", ">= 0")
        _check(0 <= s.cooldown_frac <= 1, "schedule.cooldown_frac", "in [0, 1]")
        _check(len(s.window_stages) > 0 and all(w > 0 for w in s.window_stages),
               "schedule.window_stages", "a non-empty list of positive window sizes (blocks)")
        _check(t.device in ("auto", "cpu", "cuda"), "train.device", "one of auto, cpu, cuda")
        _check(t.cuda_graphs in ("auto", "on", "off"), "train.cuda_graphs", "one of auto, on, off")
        _check(t.max_steps >= 0, "train.max_steps", ">= 0 (0 = the whole schedule)")
        _check(t.val_every >= 0, "train.val_every", ">= 0 (0 = only at the start and the end)")
        _check(t.save_every >= 0, "train.save_every", ">= 0 (0 = only at the end)")
        _check(t.log_every >= 1, "train.log_every", ">= 1")
        return self

    # ---- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "Config":
        return _build(cls, data, source, prefix="")

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


def _check(ok: bool, field_name: str, expected: str) -> None:
    _check_field(ok, field_name, expected)


def _check_field(ok: bool, field_name: str, expected: str, source: str | None = None) -> None:
    if not ok:
        raise ConfigError(f"{source + ': ' if source else ''}config field '{field_name}': expected {expected}")


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
    if origin in (list, tuple):
        (elem,) = typing.get_args(ftype)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: config field '{name}': expected a list, got {value!r}")
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
    if ftype is bool and raw.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        return raw.lower() in ("true", "1", "yes", "on")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"config field '{name}': cannot parse {raw!r} as "
                          f"{getattr(ftype, '__name__', ftype)}") from None
    return _coerce(value, ftype, name)
