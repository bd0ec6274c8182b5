"""The .bin shard format: byte layout identical to the reference scripts, validation errors."""
import os
import struct

import numpy as np
import pytest

from speedrun.data.shards import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    ShardError,
    read_header,
    read_shard,
    shard_paths,
    write_shard,
)
from speedrun.utils import current_umask


def reference_bytes(tokens, magic=MAGIC, version=VERSION, count=None):
    """A shard built the way the reference's data/fineweb.py writes one: 256 int32 header, uint16 body."""
    header = [0] * 256
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    return struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens)


def reference_read(path):
    """The reference's loader: read the header, check magic/version, read exactly 2N bytes."""
    with open(path, "rb") as f:
        header = struct.unpack("<256i", f.read(1024))
        assert header[0] == 20240520 and header[1] == 1
        body = f.read()
    assert len(body) == 2 * header[2]
    return list(struct.unpack(f"<{header[2]}H", body))


TOKENS = [50256, 15496, 995, 0, 65535, 50256, 1, 2, 3]


def test_reference_file_loads_unchanged(tmp_path):
    path = tmp_path / "ref.bin"
    path.write_bytes(reference_bytes(TOKENS))
    tokens = read_shard(path)
    assert tokens.dtype == np.uint16 and tokens.tolist() == TOKENS
    assert read_header(path) == len(TOKENS)


def test_written_bytes_match_reference_layout(tmp_path):
    path = tmp_path / "ours.bin"
    write_shard(path, TOKENS)
    data = path.read_bytes()
    assert data == reference_bytes(TOKENS)
    assert len(data) == HEADER_BYTES + 2 * len(TOKENS)
    assert reference_read(path) == TOKENS


def test_write_accepts_numpy_of_any_integer_dtype(tmp_path):
    for dtype in (np.int64, np.int32, np.uint16, np.uint32):
        path = tmp_path / f"{np.dtype(dtype).name}.bin"
        write_shard(path, np.array(TOKENS, dtype=dtype))
        assert path.read_bytes() == reference_bytes(TOKENS)


def test_read_is_a_read_only_memory_map(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, np.arange(1000) % 50257)
    tokens = read_shard(path)
    assert isinstance(tokens, np.memmap)
    assert tokens[999] == 999 and len(tokens) == 1000
    with pytest.raises(ValueError):
        tokens[0] = 1


def test_empty_token_list_round_trips(tmp_path):
    path = tmp_path / "zero.bin"
    write_shard(path, [])
    assert path.read_bytes() == reference_bytes([])
    assert len(read_shard(path)) == 0


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, TOKENS)
    with pytest.raises(ShardError):
        write_shard(path, [1, 70000])       # a failed write keeps the old file intact
    assert read_shard(path).tolist() == TOKENS
    assert sorted(os.listdir(tmp_path)) == ["a.bin"]
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~current_umask()  # normal file, not mkstemp's 0600


@pytest.mark.parametrize("tokens, expected", [
    ([1, 65536], "token id 65536 out of range"),
    ([-1, 5], "token id -1 out of range"),
    (np.array([1.0, 2.0]), "expected integer token ids"),
    (np.zeros((2, 2), dtype=np.int64), "expected a 1-D sequence"),
])
def test_write_rejects_bad_tokens(tmp_path, tokens, expected):
    path = tmp_path / "bad.bin"
    with pytest.raises(ShardError) as err:
        write_shard(path, tokens)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert not path.exists()


def _one_line_error(path):
    with pytest.raises(ShardError) as err:
        read_shard(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_wrong_magic(tmp_path):
    path = tmp_path / "m.bin"
    path.write_bytes(reference_bytes(TOKENS, magic=12345))
    assert "wrong magic number 12345, expected 20240520" in _one_line_error(path)


def test_wrong_version(tmp_path):
    path = tmp_path / "v.bin"
    path.write_bytes(reference_bytes(TOKENS, version=7))
    assert "unsupported shard version 7, expected 1" in _one_line_error(path)


def test_truncated_body(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(reference_bytes(TOKENS)[:-3])
    message = _one_line_error(path)
    assert "truncated body" in message and "header says 9 tokens (18 bytes)" in message
    assert "15 bytes" in message


def test_header_count_differs_from_body(tmp_path):
    path = tmp_path / "c.bin"
    path.write_bytes(reference_bytes(TOKENS, count=4))
    assert "header token count 4 does not match the body size (18 bytes = 9 tokens)" in _one_line_error(path)


def test_empty_file(tmp_path):
    path = tmp_path / "e.bin"
    path.write_bytes(b"")
    assert "empty file" in _one_line_error(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "h.bin"
    path.write_bytes(reference_bytes(TOKENS)[:100])
    assert "truncated header (100 bytes), expected 1024" in _one_line_error(path)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_shard(tmp_path / "nope.bin")


def test_shard_paths_file_directory_glob(tmp_path):
    for name in ("x_train_000002.bin", "x_train_000001.bin", "x_val_000000.bin", "notes.txt"):
        (tmp_path / name).write_bytes(reference_bytes([1]))
    names = lambda paths: [os.path.basename(p) for p in paths]
    assert names(shard_paths(tmp_path)) == ["x_train_000001.bin", "x_train_000002.bin", "x_val_000000.bin"]
    assert names(shard_paths(str(tmp_path / "x_train_*.bin"))) == ["x_train_000001.bin", "x_train_000002.bin"]
    assert shard_paths(str(tmp_path / "x_val_000000.bin")) == [str(tmp_path / "x_val_000000.bin")]


def test_shard_paths_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(str(empty), "directory has no .bin shard files"),
             (str(tmp_path / "*.bin"), "no shard files match this pattern"),
             (str(tmp_path / "missing.bin"), "no such shard file or directory")]
    for pattern, expected in cases:
        with pytest.raises(ShardError) as err:
            shard_paths(pattern)
        assert str(err.value) == f"{pattern}: {expected}"


def test_directory_given_as_shard(tmp_path):
    with pytest.raises(ShardError, match="is a directory"):
        read_shard(tmp_path)
