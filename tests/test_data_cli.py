"""``speedrun data text | info | embedded | fineweb`` through the real command line."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

from speedrun.cli import main
from speedrun.data.cli import parse_count, shard_stats
from speedrun.data.shards import read_shard, shard_paths, write_shard
from speedrun.data.tokenizer import EOT_ID, decode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def corpus_text() -> str:
    """~1 MB of varied text: verse, prose, unicode, CRLF, whitespace runs, numbers."""
    rng = np.random.default_rng(0)
    words = ("thou art the sun and moon, 'tis true; I'm here — naïve café 東京 🤖 12,345 3.14 "
             "O Romeo!  wherefore\tart thou?").split(" ")
    paragraphs = []
    for i in range(13000):          # > 1 MiB: the process pool is used
        lines = [" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(int(rng.integers(1, 5)))]
        end = "\r\n" if i % 7 == 0 else "\n"
        paragraphs.append(end.join(lines) + ("   " if i % 11 == 0 else ""))
    return "\n\n".join(paragraphs) + "\n\n\n"


def decoded_text(out_dir) -> str:
    paths = shard_paths(str(out_dir))
    ordered = [p for p in paths if "_val_" in p] + [p for p in paths if "_train_" in p]
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in ordered])
    return decode(tokens[tokens != EOT_ID])


@pytest.mark.slow
def test_text_command_round_trip(tmp_path, capsys):
    text = corpus_text()
    src = tmp_path / "corpus.txt"
    src.write_bytes(text.encode("utf-8"))
    out = tmp_path / "shards"
    code = main(["data", "text", str(src), "--out", str(out), "--val-tokens", "5k", "--shard-tokens", "20000",
                 "--workers", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'corpus_val_000000.bin'} (5000 tokens)" in printed
    assert "1 documents from 1 files ->" in printed
    assert decoded_text(out) == text
    # cut into documents at paragraphs: still the exact text
    code = main(["data", "text", str(src), "--out", str(tmp_path / "docs"), "--doc-tokens", "1024", "--quiet"])
    assert code == 0 and "cut into" in capsys.readouterr().out
    assert decoded_text(tmp_path / "docs") == text


def test_console_entry_point_runs(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "speedrun", "data", "text", str(src), "--out",
                             str(tmp_path / "o"), "--prefix", "q"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert os.path.exists(tmp_path / "o" / "q_val_000000.bin")
    assert os.path.exists(tmp_path / "o" / "q_train_000001.bin")


def test_info_command(tmp_path, capsys):
    write_shard(tmp_path / "x_val_000000.bin", [EOT_ID, 1, 2, EOT_ID, 3])
    write_shard(tmp_path / "x_train_000001.bin", [7, 7, EOT_ID, 1, 2, 3, 4, 5, EOT_ID, 9])
    assert main(["data", "info", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["shard", "tokens", "documents", "mean", "doc", "max", "doc"]
    assert lines[1].split() == ["x_train_000001.bin", "10", "2", "4.0", "6"]
    assert lines[2].split() == ["x_val_000000.bin", "5", "2", "2.5", "3"]
    assert lines[3].split()[:5] == ["total", "15", "4", "3.2", "6"]    # (15 - 2 lead) / 4 documents
    assert shard_stats(str(tmp_path / "x_train_000001.bin"))["lead"] == 2


def test_errors_are_one_line_with_exit_code_1(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "none*.bin")]) == 1
    err = capsys.readouterr().err
    assert err == f"speedrun data: error: {tmp_path / 'none*.bin'}: no shard files match this pattern\n"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 1030)
    assert main(["data", "info", str(bad)]) == 1
    assert "wrong magic number 0, expected 20240520" in capsys.readouterr().err
    assert main(["data", "text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "no such input file or directory" in capsys.readouterr().err


def test_fineweb_command_offline_error(tmp_path, capsys, monkeypatch):
    from speedrun.data import prepare

    def offline(repo_id, filename, local_dir, endpoint):
        raise OSError("network is unreachable")

    monkeypatch.setattr(prepare, "_hf_fetch", offline)
    assert main(["data", "fineweb", "1", "--variant", "edu10B", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("speedrun data: error: could not download finewebedu_val_000000.bin")


def test_fineweb_real_hub_client_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-m", "speedrun", "data", "fineweb", "2", "--out",
                             str(tmp_path / "fw")], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("speedrun data: error: could not download fineweb_val_000000.bin from the "
                           "Hugging Face dataset kjj0/fineweb10B-gpt2")
    assert "unset HF_HUB_OFFLINE" in last and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "fw" / "fineweb_val_000000.bin")


def test_embedded_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path))
    assert main(["data", "embedded"]) == 0
    out = capsys.readouterr().out
    assert f"in {tmp_path / 'embedded' / 'shakespeare-v1'}" in out
    assert "val_tokens 65,536 + 1" in out and "held-out works: macbeth, julius_caesar" in out


def test_data_without_action_prints_usage(capsys):
    assert main(["data"]) == 2
    assert "text" in capsys.readouterr().out


@pytest.mark.parametrize("text, value", [("1000", 1000), ("1_000_000", 10**6), ("1e6", 10**6),
                                         ("1M", 10**6), ("100k", 10**5), ("2.5M", 2_500_000), ("1G", 10**9)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5", "-3", "1T"])
def test_parse_count_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count(text)


def test_text_with_no_text_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    records = tmp_path / "blank.jsonl"
    records.write_text('{"text": ""}\n\n{"text": ""}\n')
    for path, docs in ((empty, "1 file(s), 1 empty document(s)"), (records, "1 file(s), 2 empty document(s)")):
        assert main(["data", "text", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err == f"speedrun data: error: {path}: no text to tokenize ({docs}); nothing was written\n"
        assert not os.path.exists(tmp_path / "out")
