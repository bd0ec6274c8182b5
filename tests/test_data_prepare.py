"""Text -> shards (layout, splits, determinism, document cutting), the embedded corpus, and the FineWeb
download logic against a local fake repository (no network)."""
import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest

from speedrun.data import embedded, prepare
from speedrun.data.prepare import (
    DownloadError,
    InputError,
    download_fineweb,
    fineweb_filenames,
    prepare_text,
    split_document,
)
from speedrun.data.shards import read_shard, shard_paths, write_shard
from speedrun.data.tokenizer import EOT_ID, decode, encode

PARAGRAPHS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.\n  Indented line, then trailing spaces   ",
    "Ünïcödé — “quotes” and emoji 🤖, tabs\tand\r\nCRLF line ends.",
    "I'm sure they've said we'll go; it's 12,345 miles.",
]


def sample_text(repeat: int = 3) -> str:
    return "\n\n".join(PARAGRAPHS * repeat) + "\n"


def all_tokens(out_dir) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in shard_paths(str(out_dir))
                           if "_val_" in p] + [np.asarray(read_shard(p)) for p in
                                                shard_paths(str(out_dir)) if "_train_" in p])


def decode_without_separators(tokens: np.ndarray) -> list[str]:
    """Documents' texts: split the stream at the EOT separators, decode each piece."""
    starts = np.flatnonzero(tokens == EOT_ID)
    return [decode(tokens[a + 1:b]) for a, b in zip(starts, np.append(starts[1:], len(tokens)))]


def write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


# ---- text inputs -------------------------------------------------------------------------------

def test_text_file_round_trip_and_layout(tmp_path):
    text = sample_text()
    src = write(tmp_path / "book.txt", text)
    summary = prepare_text([src], str(tmp_path / "out"), val_tokens=20, shard_tokens=50, progress=False)
    names = [os.path.basename(p) for p in summary.shards]
    assert names[0] == "book_val_000000.bin" and names[1] == "book_train_000001.bin"
    assert summary.shard_tokens[0] == 20 and all(n == 50 for n in summary.shard_tokens[1:-1])
    assert 0 < summary.shard_tokens[-1] <= 50
    tokens = all_tokens(tmp_path / "out")
    assert tokens.tolist() == [EOT_ID] + encode(text)          # one document, EOT prefix
    assert decode_without_separators(tokens) == [text]
    assert summary.tokens == len(tokens) == sum(summary.shard_tokens)
    assert (summary.documents, summary.shard_documents, summary.files) == (1, 1, 1)


def test_jsonl_documents_field_and_order(tmp_path):
    src = tmp_path / "docs.jsonl"
    records = [{"body": t, "id": i} for i, t in enumerate(PARAGRAPHS)]
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    summary = prepare_text([str(src)], str(tmp_path / "out"), field="body", val_tokens=0, progress=False)
    assert [os.path.basename(p) for p in summary.shards] == ["docs_train_000001.bin"]   # no val shard
    tokens = all_tokens(tmp_path / "out")
    expected = [t for p in PARAGRAPHS for t in [EOT_ID] + encode(p)]
    assert tokens.tolist() == expected
    assert decode_without_separators(tokens) == PARAGRAPHS
    assert summary.documents == len(PARAGRAPHS)


def test_missing_json_field_names_file_line_and_field(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "ok"}\n{"content": "no text here"}\n', encoding="utf-8")
    with pytest.raises(InputError) as err:
        prepare_text([str(src)], str(tmp_path / "out"), progress=False)
    assert str(err.value) == (f"{src}:2: record has no field 'text' (has: content); "
                              f"choose the text field with --field")


def test_directory_recursion_sorted_and_json_array(tmp_path):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    write(root / "b" / "2.txt", PARAGRAPHS[1])
    write(root / "a.txt", PARAGRAPHS[0])
    (root / "c.json").write_text(json.dumps([{"text": PARAGRAPHS[2]}, PARAGRAPHS[3]]), encoding="utf-8")
    (root / "ignored.md").write_text("not an input", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    summary = prepare_text([str(root)], str(tmp_path / "out"), val_tokens=0, progress=False)
    # sorted paths: a.txt, b/2.txt, c.json, empty.txt (skipped: no text)
    assert decode_without_separators(all_tokens(tmp_path / "out")) == PARAGRAPHS
    assert (summary.files, summary.documents, summary.empty_documents) == (4, 4, 1)


def test_missing_input_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such input"):
        prepare_text([str(tmp_path / "nope.txt")], str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="directory has no .txt, .jsonl or .json files"):
        prepare_text([str(tmp_path / "empty")], str(tmp_path / "out"), progress=False)


def test_invalid_utf8_is_a_clear_error(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes("café".encode("latin-1"))
    with pytest.raises(InputError, match="not valid UTF-8"):
        prepare_text([str(src)], str(tmp_path / "out"), progress=False)


def test_automatic_val_split_is_a_tenth_of_a_small_corpus(tmp_path):
    src = write(tmp_path / "t.txt", sample_text(5))
    total = 1 + len(encode(sample_text(5)))
    summary = prepare_text([src], str(tmp_path / "out"), progress=False)
    assert summary.val_tokens == total // 10 == summary.shard_tokens[0]
    assert summary.shard_tokens[1] == total - total // 10


def test_val_tokens_too_large_for_corpus(tmp_path):
    src = write(tmp_path / "t.txt", "tiny text")
    with pytest.raises(InputError, match="only 3 tokens: not enough for 3 val tokens"):
        prepare_text([src], str(tmp_path / "out"), val_tokens=3, progress=False)


def test_deterministic_for_any_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "_POOL_MIN_BYTES", 0)
    monkeypatch.setattr(prepare, "_CHUNK_DOCS", 3)       # many small ordered tasks
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"{i}: {PARAGRAPHS[i % 4]}"}) + "\n" for i in range(60)),
                   encoding="utf-8")
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare_text([str(src)], str(out), val_tokens=100, shard_tokens=300, workers=workers, progress=False)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1] and len(outputs[0]) > 3


def test_stale_shards_of_an_earlier_run_are_removed(tmp_path):
    src = write(tmp_path / "t.txt", sample_text())
    out = tmp_path / "out"
    big = prepare_text([src], str(out), val_tokens=10, shard_tokens=20, progress=False)
    small = prepare_text([src], str(out), val_tokens=10, shard_tokens=1000, progress=False)
    assert len(big.shards) > 2 and len(small.shards) == 2
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in small.shards)
    assert len(small.removed) == len(big.shards) - 2


# ---- cutting long texts into documents ---------------------------------------------------------

def test_split_document_is_token_exact_and_bounded():
    text = sample_text(20)
    docs = split_document(text, 64)
    assert all(d[0] == EOT_ID and len(d) <= 64 for d in docs)
    assert all(EOT_ID not in d[1:] for d in docs)
    assert np.concatenate([d[1:] for d in docs]).tolist() == encode(text)
    assert "".join(decode(d[1:]) for d in docs) == text
    # whole paragraphs are packed: documents are cut inside a blank line (before its last newline,
    # which is where the tokenization does not change)
    offsets = np.cumsum([len(decode(d[1:])) for d in docs])[:-1]
    assert len(offsets) > 10 and all(text[o - 1:o + 1] == "\n\n" for o in offsets)


def test_split_document_cuts_overlong_lines():
    line = "word " * 500                             # one line of 500 tokens, no line breaks
    docs = split_document("Title\n\n" + line, 100)
    assert all(len(d) <= 100 for d in docs) and len(docs) >= 6
    assert np.concatenate([d[1:] for d in docs]).tolist() == encode("Title\n\n" + line)


def test_doc_tokens_option_round_trips(tmp_path):
    text = sample_text(10)
    src = write(tmp_path / "t.txt", text)
    summary = prepare_text([src], str(tmp_path / "out"), val_tokens=0, max_doc_tokens=80, progress=False)
    tokens = all_tokens(tmp_path / "out")
    assert summary.shard_documents == int((tokens == EOT_ID).sum()) > 5
    assert summary.longest_document <= 80
    assert "".join(decode_without_separators(tokens)) == text


# ---- embedded corpus ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    embedded.embedded_shards(root)
    return root


def test_embedded_counts_and_layout(embedded_cache):
    train_glob, val_glob = embedded.embedded_shards(embedded_cache)
    info = embedded.embedded_info(embedded_cache)
    val, train = read_shard(shard_paths(val_glob)[0]), read_shard(shard_paths(train_glob)[0])
    assert len(val) == info["val_shard_tokens"] == embedded.VAL_TOKENS + 1 == 65537
    assert info["val_tokens"] % 16384 == 0
    assert len(train) == info["train_tokens"] > 1_400_000
    assert info["train_documents"] == int((train == EOT_ID).sum())
    assert train[0] == EOT_ID and val[0] == EOT_ID
    starts = np.flatnonzero(train == EOT_ID)
    assert np.diff(np.append(starts, len(train))).max() <= embedded.DOC_TOKENS
    assert 0.03 < len(val) / (len(val) + len(train)) < 0.06


def test_embedded_train_is_the_other_works_token_exact(embedded_cache):
    works = embedded.load_works()
    train = np.asarray(read_shard(shard_paths(embedded.embedded_shards(embedded_cache)[0])[0]))
    text_tokens = train[train != EOT_ID]
    first = next(w for w in works if w["title"] not in embedded.VAL_WORKS)
    head = encode(first["text"])
    assert text_tokens[:len(head)].tolist() == head
    expected = sum(len(encode(w["text"])) for w in works if w["title"] not in embedded.VAL_WORKS)
    assert len(text_tokens) == expected


def test_embedded_cache_is_reused_and_repaired(embedded_cache, tmp_path):
    directory = embedded.embedded_dir(embedded_cache)
    stamp = os.stat(os.path.join(directory, "info.json")).st_mtime_ns
    embedded.embedded_shards(embedded_cache)
    assert os.stat(os.path.join(directory, "info.json")).st_mtime_ns == stamp   # not rebuilt
    copy = tmp_path / "copy"
    shutil.copytree(embedded_cache, copy)
    broken = os.path.join(embedded.embedded_dir(copy), "shakespeare_train_000001.bin")
    with open(broken, "r+b") as f:
        f.truncate(5000)
    train_glob, _ = embedded.embedded_shards(copy)
    assert len(read_shard(shard_paths(train_glob)[0])) == embedded.embedded_info(embedded_cache)["train_tokens"]


def _prepare_in_child(root, queue):
    queue.put(embedded.embedded_shards(root))


def test_embedded_concurrent_preparation(tmp_path):
    ctx = multiprocessing.get_context()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert os.listdir(tmp_path / "embedded") == [embedded.CORPUS]   # no temp dirs left behind
    assert embedded.embedded_info(tmp_path)["val_shard_tokens"] == 65537


def test_embedded_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SPEEDRUN_CACHE", str(tmp_path))
    assert embedded.embedded_dir() == os.path.join(str(tmp_path), "embedded", "shakespeare-v1")
    monkeypatch.delenv("SPEEDRUN_CACHE")
    assert embedded.embedded_dir().endswith(os.path.join(".cache", "speedrun", "embedded", "shakespeare-v1"))


# ---- FineWeb download (fake repository, no network) ---------------------------------------------

@pytest.fixture
def fake_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    rng = np.random.default_rng(0)
    for name in fineweb_filenames(3, "10B"):
        write_shard(repo / name, rng.integers(0, 50257, 1000))
    calls = []

    def fetch(repo_id, filename, local_dir, endpoint):
        calls.append((repo_id, filename))
        os.makedirs(local_dir, exist_ok=True)
        dest = os.path.join(local_dir, filename)
        shutil.copyfile(repo / filename, dest)
        return dest

    return repo, fetch, calls


def test_fineweb_names_per_variant():
    assert fineweb_filenames(2, "10B") == ["fineweb_val_000000.bin", "fineweb_train_000001.bin",
                                           "fineweb_train_000002.bin"]
    assert fineweb_filenames(1, "edu10B") == ["finewebedu_val_000000.bin", "finewebedu_train_000001.bin"]
    assert prepare.FINEWEB_VARIANTS["100B"].repo_id == "kjj0/fineweb100B-gpt2"


def test_fineweb_download_skip_and_redownload(fake_repo, tmp_path):
    repo, fetch, calls = fake_repo
    out = tmp_path / "out"
    paths = download_fineweb(2, "10B", str(out), fetch=fetch, log=lambda m: None)
    assert [os.path.basename(p) for p in paths] == fineweb_filenames(2)
    assert calls == [("kjj0/fineweb10B-gpt2", n) for n in fineweb_filenames(2)]
    assert all(open(p, "rb").read() == (repo / os.path.basename(p)).read_bytes() for p in paths)
    assert sorted(os.listdir(out)) == sorted(fineweb_filenames(2))   # staging dir removed

    calls.clear()
    with open(paths[1], "r+b") as f:                  # truncate one: only it is fetched again
        f.truncate(1500)
    logs = []
    download_fineweb(3, "10B", str(out), fetch=fetch, log=logs.append)
    assert calls == [("kjj0/fineweb10B-gpt2", "fineweb_train_000001.bin"),
                     ("kjj0/fineweb10B-gpt2", "fineweb_train_000003.bin")]
    assert any("incomplete (truncated body" in m for m in logs)
    assert read_shard(paths[1]).tolist() == read_shard(repo / "fineweb_train_000001.bin").tolist()


def test_fineweb_corrupt_download_never_lands(fake_repo, tmp_path):
    repo, _, _ = fake_repo

    def bad_fetch(repo_id, filename, local_dir, endpoint):
        os.makedirs(local_dir, exist_ok=True)
        dest = os.path.join(local_dir, filename)
        with open(dest, "wb") as f:
            f.write((repo / filename).read_bytes()[:2000])
        return dest

    with pytest.raises(DownloadError, match="fineweb_val_000000.bin from kjj0/fineweb10B-gpt2 is not a complete"):
        download_fineweb(1, "10B", str(tmp_path / "out"), fetch=bad_fetch, log=lambda m: None)
    assert not (tmp_path / "out" / "fineweb_val_000000.bin").exists()


def test_fineweb_offline_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)

    def offline(repo_id, filename, local_dir, endpoint):
        raise ConnectionError("[Errno -2] Name or service not known\nmore details")

    with pytest.raises(DownloadError) as err:
        download_fineweb(1, "edu10B", str(tmp_path / "out"), fetch=offline, log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("could not download finewebedu_val_000000.bin from the Hugging Face dataset "
                              "kjj0/finewebedu10B-gpt2 at https://huggingface.co (ConnectionError: "
                              "[Errno -2] Name or service not known more details)")
    for advice in ("HF_ENDPOINT", f"copy the .bin shards into {tmp_path / 'out'}", "`speedrun data text`"):
        assert advice in message


def test_fineweb_without_huggingface_hub(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)
    with pytest.raises(DownloadError, match="needs huggingface_hub: pip install huggingface_hub"):
        download_fineweb(1, "10B", str(tmp_path / "out"), log=lambda m: None)


def test_fineweb_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown FineWeb variant 'x'"):
        download_fineweb(1, "x", str(tmp_path))
    with pytest.raises(ValueError, match="train chunks 1..103; got 104"):
        download_fineweb(104, "10B", str(tmp_path))
