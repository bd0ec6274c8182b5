"""The command line's bytecode cache (speedrun/pycache.py): when it turns on, where it writes, that
its child processes inherit it, and that a named folder it cannot use is an error."""
import importlib.util
import os
import py_compile
import subprocess
import sys

import pytest

from speedrun import pycache


@pytest.fixture
def python_flags(monkeypatch):
    """Restore sys.pycache_prefix / sys.dont_write_bytecode after a test changed them."""
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", sys.dont_write_bytecode)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package from source with no cached bytecode; its __init__.py path."""
    pkg = tmp_path / "src" / "fakepkg_pycache"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    importlib.invalidate_caches()
    return str(pkg / "__init__.py")


def test_bytecode_missing_follows_python_rules(fake_package, python_flags):
    sys.dont_write_bytecode = True
    assert pycache.bytecode_missing("fakepkg_pycache")          # not cached, and Python won't write it
    sys.dont_write_bytecode = False
    assert not pycache.bytecode_missing("fakepkg_pycache")      # Python caches it itself on import
    sys.dont_write_bytecode = True
    py_compile.compile(fake_package, cfile=importlib.util.cache_from_source(fake_package))
    assert not pycache.bytecode_missing("fakepkg_pycache")      # already cached next to the source
    assert not pycache.bytecode_missing("no_such_package_xyz")  # nothing to cache


def test_auto_turns_on_only_where_bytecode_is_missing(tmp_path, monkeypatch, python_flags):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONDONTWRITEBYTECODE": "1"}
    monkeypatch.setattr(pycache, "bytecode_missing", lambda package="torch": False)
    assert pycache.cache_bytecode(env) is None and sys.pycache_prefix is None
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"

    monkeypatch.setattr(pycache, "bytecode_missing", lambda package="torch": True)
    sys.dont_write_bytecode = True
    env[pycache.ENV] = " "   # set but empty is the default, not a folder named ""
    folder = pycache.cache_bytecode(env)
    assert folder == str(tmp_path / "xdg" / "speedrun" / "pycache") and os.path.isdir(folder)
    assert sys.pycache_prefix == folder and sys.dont_write_bytecode is False
    assert env["PYTHONPYCACHEPREFIX"] == folder and "PYTHONDONTWRITEBYTECODE" not in env


def test_off_and_a_users_own_prefix_are_left_alone(tmp_path, monkeypatch, python_flags):
    monkeypatch.setattr(pycache, "bytecode_missing", lambda package="torch": True)
    env = {pycache.ENV: "off", "XDG_CACHE_HOME": str(tmp_path)}
    assert pycache.cache_bytecode(env) is None and sys.pycache_prefix is None
    sys.pycache_prefix = str(tmp_path / "mine")
    assert pycache.cache_bytecode({"XDG_CACHE_HOME": str(tmp_path)}) is None
    assert sys.pycache_prefix == str(tmp_path / "mine")


def test_named_folder_is_used_or_is_an_error(tmp_path, monkeypatch, python_flags):
    monkeypatch.setattr(pycache, "bytecode_missing", lambda package="torch": False)
    env = {pycache.ENV: str(tmp_path / "named")}
    assert pycache.cache_bytecode(env) == str(tmp_path / "named")   # used even where not missing
    sys.pycache_prefix = None
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"SPEEDRUN_PYCACHE=.*a_file/sub: cannot create"):
        pycache.cache_bytecode({pycache.ENV: str(tmp_path / "a_file" / "sub")})


def test_process_and_its_children_write_bytecode_to_the_cache_only(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "parent_mod.py").write_text("X = 1\n")
    (src / "child_mod.py").write_text("Y = 2\n")
    cache = tmp_path / "cache"
    script = ("from speedrun.pycache import cache_bytecode; cache_bytecode(); import parent_mod, subprocess, sys; "
              "subprocess.run([sys.executable, '-c', 'import child_mod'], check=True)")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", pycache.ENV: str(cache),
           "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONPYCACHEPREFIX", None)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, cwd=tmp_path)
    cached = sorted(p.name.split(".")[0] for p in cache.rglob("*.pyc") if p.parent.name == "src")
    assert cached == ["child_mod", "parent_mod"]
    assert not (src / "__pycache__").exists()   # nothing written next to the sources


def test_command_line_reports_an_unusable_named_folder(tmp_path):
    (tmp_path / "a_file").write_text("")
    env = {**os.environ, pycache.ENV: str(tmp_path / "a_file" / "sub")}
    env.pop("PYTHONPYCACHEPREFIX", None)
    proc = subprocess.run([sys.executable, "-m", "speedrun", "--version"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("speedrun: error: SPEEDRUN_PYCACHE=")
