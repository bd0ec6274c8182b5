"""speedrun: the NanoGPT speedrun record recipe as an installable, configurable, tested trainer."""
__version__ = "0.1.0"

from speedrun.config import Config, ConfigError  # noqa: E402,F401


def load(path, device="cpu"):
    """Load an exported model directory (``speedrun export``) and return a ready ``GPT`` in eval mode."""
    from speedrun.eval.loading import load_exported
    return load_exported(path, device=device)
