"""Run one function of a benchmark module in a fresh Python process and return its JSON-encodable
result: for measurements that need a first call to really be the first (JIT compiles, dynamo's
state), which one process cannot repeat."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def call(module: str, function: str, *args, env: dict | None = None):
    """``module.function(*args)`` (module: a file in benchmarks/; args: Python literals) in a child
    process with the repository on its path and ``env`` added to the environment; its result, sent
    back as the last line of its stdout."""
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); from {module} import {function}; "
            f"print(json.dumps({function}(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
