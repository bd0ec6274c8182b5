"""speedrun.eval: use a trained model. Loading checkpoints / exports with the validation windows
(loading.py), generation on a KV cache (generate.py; the cache is speedrun/model/kv_cache.py),
HellaSwag accuracy (hellaswag.py), validation loss on any shards (val.py), export to a
self-contained directory and ``speedrun.load`` (export.py), and their commands (cli.py)."""
