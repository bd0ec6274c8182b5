"""BOS-aligned train batches (spec 1.11) and the val loader."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from speedrun.config import BatchShape
from speedrun.data.loader import (
    DataExhaustedError,
    TrainLoader,
    ValLoader,
    default_max_num_docs,
    max_num_docs_for,
)
from speedrun.data.shards import DataError, ShardError, read_shard, write_shard

BOS = 50256
SEQ = 256                    # tokens per micro-batch
STEP = 8 * SEQ               # 8 virtual micro-batches per optimizer step
MAX_DOC = 300


def make_shard(path, n_docs, seed, lead=0):
    """Random documents of 1..700 tokens (many longer than MAX_DOC), each starting with BOS;
    ``lead`` tokens without BOS first (a document continued from the previous shard)."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, BOS, lead)]
    for _ in range(n_docs):
        parts.append(np.concatenate([[BOS], rng.integers(0, BOS, int(rng.integers(0, 700)))]))
    tokens = np.concatenate(parts).astype(np.uint16)
    write_shard(path, tokens)
    return tokens


@pytest.fixture
def shards(tmp_path):
    for i, (docs, lead) in enumerate([(60, 0), (45, 37), (80, 5)]):
        make_shard(tmp_path / f"d_train_{i + 1:06d}.bin", docs, seed=i, lead=lead)
    return str(tmp_path / "d_train_*.bin")


def loader(pattern, world=1, rank=0, **kw):
    args = dict(tokens_per_step=STEP, sequence_tokens=SEQ, max_doc_len=MAX_DOC, world_size=world, rank=rank)
    args.update(kw)
    return TrainLoader(pattern, **args)


def steps(ld, n):
    return [ld.next_step() for _ in range(n)]


def as_lists(batches):
    return [(b.inputs.tolist(), b.targets.tolist(), b.cu_seqlens.tolist()) for b in batches]


def reference_plan(paths, n_steps, seq=SEQ, micro=8, max_doc=MAX_DOC, shapes=None):
    """The spec's loop, written plainly: for each micro-batch take BOS-started segments of
    min(next BOS, start+max_doc, start+remaining+1) until seq+1 tokens; a shard that runs out
    mid-step is dropped and the whole step is rebuilt from the next one. ``shapes``: step i's
    (micro-batch tokens, micro-batches, cap) instead of the fixed ones."""
    out, shard_i, cursor = [], 0, 0
    shard = read_shard(paths[0])
    bos = np.flatnonzero(shard == BOS).tolist()
    while len(out) < n_steps:
        if shapes is not None:
            seq, micro, max_doc = shapes[len(out)]
        step, idx, ok = [], cursor, True
        for _ in range(micro):
            segs, have = [], 0
            while have < seq + 1:
                if idx >= len(bos):
                    ok = False
                    break
                start = bos[idx]
                end = bos[idx + 1] if idx + 1 < len(bos) else len(shard)
                end = min(end, start + max_doc, start + (seq - have) + 1)
                segs.append(shard[start:end])
                have += end - start
                idx += 1
            if not ok:
                break
            step.append(np.concatenate(segs))
        if not ok:
            shard_i += 1
            if shard_i == len(paths):
                return out
            shard, cursor = read_shard(paths[shard_i]), 0
            bos = np.flatnonzero(shard == BOS).tolist()
            continue
        cursor = idx
        out.append(step)
    return out


def test_matches_the_reference_loop_including_shard_switches(shards, tmp_path):
    paths = sorted(str(p) for p in tmp_path.glob("d_train_*.bin"))
    expected = reference_plan(paths, 1000)
    ld = loader(shards)
    got = []
    with pytest.raises(DataExhaustedError):
        while True:
            got.append(ld.next_step())
    assert len(got) == len(expected) > 6
    assert ld.state_dict()["shard"] == 2                     # all three shards were used
    for step, ref in zip(got, expected):
        for batch, buf in zip(step, ref):
            assert batch.inputs.tolist() == buf[:-1].tolist()
            assert batch.targets.tolist() == buf[1:].tolist()


def test_segments_start_with_bos_and_counts_are_exact(shards):
    ld = loader(shards)
    assert ld.grad_accum == 8 and ld.max_num_docs == default_max_num_docs(SEQ) == 128
    for step in steps(ld, 6):
        assert len(step) == 8
        for b in step:
            assert b.inputs.dtype == torch.int32 and b.targets.dtype == torch.int64
            assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.shape == (128,)
            assert b.inputs.shape == b.targets.shape == (SEQ,)
            assert torch.equal(b.inputs[1:], b.targets[:-1].to(torch.int32))
            cu = b.cu_seqlens.tolist()
            assert cu[0] == 0 and cu[-1] == SEQ and cu == sorted(cu)
            starts = [c for c in cu if c < SEQ]
            assert all(b.inputs[s] == BOS for s in starts)           # every segment starts at a BOS
            lengths = np.diff(sorted(set(cu)))
            assert lengths.max() <= MAX_DOC
            # no BOS inside a segment except at its start: documents are never merged
            bos_positions = set(torch.nonzero(b.inputs == BOS).flatten().tolist())
            assert bos_positions == set(starts)


def test_ranks_are_disjoint_and_together_equal_one_rank(shards):
    single = [as_lists(s) for s in steps(loader(shards), 5)]
    for world in (2, 4, 8):
        ranks = [loader(shards, world=world, rank=r) for r in range(world)]
        assert all(ld.grad_accum == 8 // world for ld in ranks)
        for step in range(5):
            joined = [mb for ld in ranks for mb in as_lists(ld.next_step())]
            assert joined == single[step]


def test_one_rank_times_eight_equals_eight_ranks_times_one(shards):
    one = loader(shards)
    eight = [loader(shards, world=8, rank=r) for r in range(8)]
    for _ in range(4):
        a = as_lists(one.next_step())
        b = [as_lists(ld.next_step())[0] for ld in eight]
        assert a == b
        assert len({tuple(x[0]) for x in b}) == 8               # the ranks got different data


def test_resume_from_saved_state(shards):
    ld = loader(shards)
    steps(ld, 3)
    state = json.loads(json.dumps(ld.state_dict()))            # JSON-able
    continued = [as_lists(s) for s in steps(ld, 4)]            # crosses into the second shard
    assert ld.state_dict()["shard"] == 1
    resumed = loader(shards)
    resumed.load_state_dict(state)
    assert [as_lists(s) for s in steps(resumed, 4)] == continued
    # resuming with another world size continues with the same global batches
    ranks = [loader(shards, world=2, rank=r) for r in range(2)]
    for ld2 in ranks:
        ld2.load_state_dict(state)
    for step in continued:
        assert [mb for ld2 in ranks for mb in as_lists(ld2.next_step())] == step


def test_state_from_other_shards_is_rejected(shards, tmp_path):
    ld = loader(shards)
    with pytest.raises(DataError, match="saved loader position is in shard #1 'other.bin'"):
        ld.load_state_dict({"shard": 1, "cursor": 0, "steps": 0, "shard_name": "other.bin"})


def test_async_and_sync_loading_agree(shards):
    def run(async_loading):
        ld, out = loader(shards, async_loading=async_loading), []
        try:
            while True:
                out.append(as_lists(ld.next_step()))
        except DataExhaustedError as e:
            return out, str(e)

    assert run(True) == run(False)


def run_with_timeout(fn, seconds=20):
    """Call fn in a thread; fail the test (instead of hanging) if it does not finish in time."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the loader hung"
    return result


def test_exhaustion_raises_quickly_with_a_clear_message(shards, tmp_path):
    ld = loader(shards)

    def drain():
        n = 0
        while True:
            ld.next_step()
            n += 1

    error = run_with_timeout(drain)["error"]
    assert isinstance(error, DataExhaustedError)
    message = str(error)
    assert message.startswith(f"training data exhausted after {ld.state_dict()['steps']} steps: all 3 "
                              f"train shards of {shards} (d_train_000001.bin .. d_train_000003.bin)")
    assert "data.wrap=true" in message and "\n" not in message
    with pytest.raises(DataExhaustedError):                     # and it stays exhausted
        ld.next_step()


def test_wrap_starts_over_at_the_first_shard(shards):
    per_pass = len(reference_plan(sorted(__import__("glob").glob(shards)), 1000))
    ld = loader(shards, wrap=True)
    first = as_lists(ld.next_step())
    served = 1
    while ld.state_dict()["passes"] == 0:
        step = as_lists(ld.next_step())
        served += 1
    assert served == per_pass + 1                       # every step of the pass, then the first again
    assert step == first and ld.state_dict()["shard"] == 0


def test_shards_too_small_for_one_step(tmp_path):
    make_shard(tmp_path / "tiny.bin", 3, seed=0)
    error = run_with_timeout(lambda: loader(str(tmp_path / "tiny.bin")).next_step())["error"]
    assert isinstance(error, DataExhaustedError) and "less than one step" in str(error)
    error = run_with_timeout(lambda: loader(str(tmp_path / "tiny.bin"), wrap=True).next_step())["error"]
    assert isinstance(error, DataError) and "no train shard can fill one optimizer step" in str(error)


def test_background_loading_error_reaches_the_caller(shards, tmp_path):
    ld = loader(shards)
    with open(tmp_path / "d_train_000002.bin", "r+b") as f:     # broken after the loader checked it
        f.truncate(2000)

    def drain():
        while True:
            ld.next_step()

    error = run_with_timeout(drain)["error"]
    assert isinstance(error, ShardError) and "d_train_000002.bin: truncated body" in str(error)


def test_too_many_documents_for_max_num_docs(tmp_path):
    tokens = np.tile(np.array([BOS, 1, 2], dtype=np.uint16), 2000)   # 3-token documents
    write_shard(tmp_path / "short.bin", tokens)
    ld = loader(str(tmp_path / "short.bin"), max_num_docs=64)
    with pytest.raises(DataError, match=r"holds 86 documents, more than max_num_docs-1 = 63"):
        ld.next_step()
    ok = loader(str(tmp_path / "short.bin"), max_num_docs=128)
    assert ok.next_step()[0].cu_seqlens[86].item() == SEQ


@pytest.mark.parametrize("kw, expected", [
    (dict(tokens_per_step=1000), "must be a positive multiple of sequence_tokens"),
    (dict(world=3), "8 micro-batches per step is not divisible by the world size 3"),
    (dict(world=2, rank=2), "rank 2 is outside 0..1"),
])
def test_bad_split_arguments(shards, kw, expected):
    with pytest.raises(DataError, match=expected):
        loader(shards, **kw)


def test_last_segment_of_length_one_gives_an_empty_document(tmp_path):
    # docs of exactly SEQ tokens: each micro-batch = one full doc + the next doc's BOS as last target
    tokens = np.concatenate([np.concatenate([[BOS], np.arange(1, SEQ)]) for _ in range(40)]).astype(np.uint16)
    write_shard(tmp_path / "exact.bin", tokens)
    batch = loader(str(tmp_path / "exact.bin"), max_doc_len=SEQ).next_step()[0]
    assert batch.cu_seqlens[:3].tolist() == [0, SEQ, SEQ]
    assert batch.targets[-1].item() == BOS


# ---- validation ---------------------------------------------------------------------------------

@pytest.fixture
def val_shards(tmp_path):
    a = make_shard(tmp_path / "v_val_000000.bin", 3, seed=10, lead=3)
    b = make_shard(tmp_path / "v_val_000001.bin", 20, seed=11)
    return str(tmp_path / "v_val_*.bin"), np.concatenate([a, b])


def test_val_chunks_cover_exactly_the_first_tokens(val_shards):
    pattern, tokens = val_shards
    n = 6 * SEQ
    assert n + 1 > len(read_shard(pattern.replace("*", "000000")))   # needs both shards
    for world in (1, 2, 3):
        chunks = {}
        for rank in range(world):
            vl = ValLoader(pattern, num_tokens=n, sequence_tokens=SEQ, world_size=world, rank=rank)
            assert len(vl) == len(range(rank, 6, world))
            for i, b in zip(vl.chunks, vl):
                assert i % world == rank
                chunks[i] = b
        assert sorted(chunks) == list(range(6))
        inputs = torch.cat([chunks[i].inputs for i in range(6)])
        targets = torch.cat([chunks[i].targets for i in range(6)])
        assert inputs.tolist() == tokens[:n].tolist() and targets.tolist() == tokens[1:n + 1].tolist()


def test_val_cu_seqlens_from_bos_positions(val_shards):
    pattern, tokens = val_shards
    vl = ValLoader(pattern, num_tokens=2 * SEQ, sequence_tokens=SEQ)
    for i, b in enumerate(vl):
        chunk = tokens[i * SEQ:(i + 1) * SEQ]
        bos = [p for p in np.flatnonzero(chunk == BOS).tolist() if p > 0]
        cu = b.cu_seqlens.tolist()
        assert cu[:len(bos) + 2] == [0] + bos + [SEQ]
        assert set(cu[len(bos) + 1:]) == {SEQ} and len(cu) == default_max_num_docs(SEQ)
    first = next(iter(vl))
    assert first.inputs[0].item() != BOS                        # the first shard starts mid-document
    assert [b.inputs.tolist() for b in vl] == [b.inputs.tolist() for b in vl]   # fixed every time


def test_val_needs_num_tokens_plus_one(tmp_path):
    write_shard(tmp_path / "v.bin", np.arange(2 * SEQ) % 100)
    with pytest.raises(DataError, match=f"hold {2 * SEQ} tokens, fewer than the {2 * SEQ + 1} needed"):
        ValLoader(str(tmp_path / "v.bin"), num_tokens=2 * SEQ, sequence_tokens=SEQ)
    assert len(ValLoader(str(tmp_path / "v.bin"), num_tokens=SEQ, sequence_tokens=SEQ)) == 1
    with pytest.raises(DataError, match="must be a positive multiple of sequence_tokens"):
        ValLoader(str(tmp_path / "v.bin"), num_tokens=SEQ + 1, sequence_tokens=SEQ)


def test_index_of_a_large_shard_is_fast(tmp_path):
    import time

    from speedrun.data.loader import index_shard
    tokens = np.random.default_rng(0).integers(0, BOS, 20_000_000, dtype=np.uint16)
    tokens[::1000] = BOS
    write_shard(tmp_path / "big.bin", tokens)
    start = time.perf_counter()
    index = index_shard(str(tmp_path / "big.bin"), BOS, 2048)
    assert time.perf_counter() - start < 1.0 and len(index.starts) == 20_000
    os.unlink(tmp_path / "big.bin")


# ---- batch changes between steps (a stage table) ------------------------------------------------

A = BatchShape(8 * 128, 128, 150)       # 8 micro-batches of 128 tokens, documents cut at 150
B = BatchShape(8 * SEQ, SEQ, MAX_DOC)   # the batch doubles, the cap grows
C = BatchShape(12 * SEQ, SEQ, MAX_DOC)  # a fixed micro-batch and a growing batch: 12 micro-batches
PLAN = [A, A, A, B, B, C, C]


def plan_steps(ld, shapes):
    return [as_lists(ld.next_step(shape)) for shape in shapes]


def test_batch_changes_match_the_reference_loop(shards, tmp_path):
    paths = sorted(str(p) for p in tmp_path.glob("d_train_*.bin"))
    expected = reference_plan(paths, len(PLAN), shapes=[(s.micro_batch_tokens, s.micro_batches, s.max_doc_len)
                                                        for s in PLAN])
    ld = loader(shards, tokens_per_step=A.tokens_per_step, sequence_tokens=A.micro_batch_tokens,
                max_doc_len=A.max_doc_len)
    for shape, ref in zip(PLAN, expected):
        step = ld.next_step(shape)
        assert len(step) == shape.micro_batches == len(ref) and ld.grad_accum == shape.micro_batches
        for batch, buf in zip(step, ref):
            assert batch.inputs.tolist() == buf[:-1].tolist()
            assert batch.cu_seqlens.shape == (default_max_num_docs(shape.micro_batch_tokens),)
            lengths = np.diff(sorted(set(batch.cu_seqlens.tolist())))
            assert lengths.max() <= shape.max_doc_len
    assert ld.state_dict()["shard"] >= 1                      # the plan crossed a shard switch


def test_batch_changes_give_the_same_batches_on_any_world_size(shards):
    single = plan_steps(loader(shards), PLAN)
    for world in (2, 4):
        ranks = [loader(shards, world=world, rank=r) for r in range(world)]
        for shape, expected in zip(PLAN, single):
            got = [mb for ld in ranks for mb in as_lists(ld.next_step(shape))]
            assert got == expected
            assert all(ld.grad_accum == shape.micro_batches // world for ld in ranks)
    with pytest.raises(DataError, match="12 micro-batches per step is not divisible by the world size 8"):
        loader(shards, world=8, rank=0).next_step(C)


def test_resume_across_a_batch_change(shards):
    """Saved before the edge, resumed after it: the very batches of the uninterrupted run, also on
    another world size (the position is a BOS number; batch and cap are the caller's each step)."""
    ld = loader(shards)
    plan_steps(ld, PLAN[:2])
    state = json.loads(json.dumps(ld.state_dict()))
    continued = plan_steps(ld, PLAN[2:])
    resumed = loader(shards)                                   # built with another shape (B)
    resumed.load_state_dict(state)
    assert plan_steps(resumed, PLAN[2:]) == continued
    ranks = [loader(shards, world=2, rank=r) for r in range(2)]
    for ld2 in ranks:
        ld2.load_state_dict(state)
    for shape, expected in zip(PLAN[2:], continued):
        assert [mb for ld2 in ranks for mb in as_lists(ld2.next_step(shape))] == expected


def test_max_num_docs_rules():
    assert [max_num_docs_for(t, "spare") for t in (16384, 32768, 49152, 262144)] == [256, 256, 384, 1024]
    assert [max_num_docs_for(t, "tight") for t in (16384, 32768, 49152, 262144, 1024)] == [64, 96, 128, 896, 128]
    with pytest.raises(DataError, match="data.max_num_docs_rule"):
        max_num_docs_for(1024, "roomy")
    assert max_num_docs_for(128, "tight") == 128               # at least one block of 128 entries


def test_cu_seqlens_length_follows_the_micro_batch(shards):
    wide = BatchShape(2 * 600, 600, MAX_DOC)                   # 600 // 300 = 2 documents: one block
    ld = loader(shards)
    assert [len(ld.next_step(shape)[0].cu_seqlens) for shape in (A, wide, A)] == [128, 256, 128]
    ld = loader(shards, max_num_docs_rule="tight")
    assert [len(ld.next_step(shape)[0].cu_seqlens) for shape in (A, wide)] == [128, 128]
    fixed = loader(shards, max_num_docs=200)
    assert [len(fixed.next_step(shape)[0].cu_seqlens) for shape in (A, wide)] == [200, 200]
