"""docs/architecture.md's techniques table stays complete and true: every field of the model,
optimizer and schedule configs has a row, and every ``file:function`` a row names exists."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import typing

from speedrun.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "architecture.md")
PACKAGE = os.path.join(ROOT, "speedrun")


def table_rows() -> list[tuple[str, str, str]]:
    """(technique, switches cell, file:function cell) of every row of the techniques tables: tables
    whose header starts with "technique" and has "config switch" and "file:function" columns."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    rows, columns = [], None
    for line in text.splitlines():
        # cells split at unescaped pipes (a formula may hold an escaped one)
        cells = ([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
                 if line.startswith("|") else None)
        if cells and cells[0] == "technique" and "config switch" in cells and "file:function" in cells:
            columns = (cells.index("config switch"), cells.index("file:function"))
        elif cells and columns and not line.startswith("|---"):
            rows.append((cells[0], cells[columns[0]], cells[columns[1]]))
        elif not cells:
            columns = None
    return rows


def config_fields(obj, prefix: str) -> list[str]:
    """Dotted names of every field; a list of sections (schedule.stages) also gives its entries'
    fields as ``schedule.stages.<field>``."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += config_fields(value, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
            elem = (typing.get_args(hints[f.name]) or [None])[0]
            if dataclasses.is_dataclass(elem):
                out += config_fields(elem(), f"{prefix}{f.name}.")
    return out


def defined_names(path: str) -> set[str]:
    """Functions, classes and Class.method names defined in a module."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_every_model_optimizer_and_schedule_field_has_a_row():
    cfg = Config()
    documented = set()
    for _, switches, _ in table_rows():
        documented |= set(re.findall(r"`([a-z0-9_.]+)`", switches))
    wanted = config_fields(cfg.model, "model.") + config_fields(cfg.optim, "optim.") \
        + config_fields(cfg.schedule, "schedule.")
    # a documented section (e.g. one Adam label's group) covers its fields
    missing = [f for f in wanted if f not in documented and not any(f.startswith(d + ".") for d in documented)]
    assert not missing, f"docs/architecture.md: no techniques row for {missing}"
    known = set(config_fields(cfg, ""))
    unknown = sorted(d for d in documented if d not in known and not any(k.startswith(d + ".") for k in known))
    assert not unknown, f"docs/architecture.md names config fields that do not exist: {unknown}"


def test_every_named_function_exists():
    for technique, _, where in table_rows():
        for ref in re.findall(r"`([\w/]+\.py):([\w.]+)`", where):
            path, name = ref
            full = os.path.join(PACKAGE, path)
            assert os.path.isfile(full), f"{technique}: {path} does not exist"
            assert name in defined_names(full), f"{technique}: {path} defines no {name}"
