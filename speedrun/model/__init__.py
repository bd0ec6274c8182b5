"""speedrun.model: the speedrun GPT (gpt.py), its attention layer and backends (attention.py),
rotary + YaRN (rotary.py) and the FP8 lm_head op (fp8.py)."""
from speedrun.model.gpt import GPT

__all__ = ["GPT"]
