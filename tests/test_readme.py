"""The README's Python example runs as written (against an export of a small model)."""
import os
import re

from test_eval import run_dir  # noqa: F401  (the fixture: a finished small run)

from speedrun.eval.export import export_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(run_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- readme-python:.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    export_model(run_dir, str(tmp_path / "exported"))
    monkeypatch.chdir(tmp_path)
    names = {}
    exec(compile(block, "README.md", "exec"), names)
    # the shapes the README states: (T,) ids in, (T, padded vocabulary) float32 logits out
    assert names["logits"].shape == (len(names["ids"]), 50304) and names["logits"].dtype.is_floating_point
    assert names["probs"].shape == (50257,)
    assert capsys.readouterr().out.count("\n") >= 2
