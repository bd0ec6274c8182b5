"""speedrun.model: the speedrun GPT (gpt.py), its attention layer and backends (attention.py),
rotary + YaRN (rotary.py), FlashAttention (flash.py) and KV-cache decoding state (kv_cache.py)."""
from speedrun.model.gpt import GPT, LossWeights

__all__ = ["GPT", "LossWeights"]
