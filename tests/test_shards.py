"""Token shards, packing and the resumable sampler, checked against references.

    .venv/bin/pytest tests/test_shards.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from alignline.data.shards import BlockSampler, PackedBlocks, build_shards, open_shards, token_dtype
from alignline.data.tasks import generate_suite, suite_config
from alignline.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in generate_suite(suite_config("tiny"))["pretrain/train.jsonl"]][:300]


@pytest.fixture(scope="module")
def tok(texts):
    return train_tokenizer(texts, vocab_size=300)


def test_dtype_choice():
    assert token_dtype(512) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128_256) == np.uint32


def test_stream_is_documents_joined_by_eos(texts, tok, tmp_path):
    shards = build_shards(texts, tok, tmp_path, shard_tokens=1000)  # several shards: boundaries exercised
    assert len(shards.index["shards"]) > 3
    assert shards.arrays[0].dtype == np.uint16
    stream = shards.tokens(0, shards.n_tokens)
    # Reference: tokenizing each document on its own and appending EOS.
    ref = [t for d in texts for t in [*tok.encode(d), tok.eos_token_id]]
    assert stream.tolist() == ref
    docs = np.split(stream, np.flatnonzero(stream == tok.eos_token_id) + 1)[:-1]
    assert [tok.decode(d[:-1]) for d in docs] == texts
    assert shards.index["n_docs"] == len(texts) and shards.index["n_tokens"] == len(ref)


def test_cache_hit_reuses_and_keys_on_corpus_and_tokenizer(texts, tok, tmp_path):
    a = build_shards(texts, tok, tmp_path)
    mtime = (a.path / "index.json").stat().st_mtime_ns

    class Exploding:  # same hash inputs but must not be called to tokenize on a cache hit
        def __init__(self, t):
            self.t = t
            self.eos_token_id = t.eos_token_id
            self.backend_tokenizer = t.backend_tokenizer
            self.chat_template = t.chat_template

        def __len__(self):
            return len(self.t)

        def __call__(self, *a, **k):
            raise AssertionError("re-tokenized despite a cache hit")

    b = build_shards(texts, Exploding(tok), tmp_path)
    assert b.path == a.path and (b.path / "index.json").stat().st_mtime_ns == mtime
    c = build_shards(texts[:-1], tok, tmp_path)
    d = build_shards(texts, train_tokenizer(texts, vocab_size=280), tmp_path)
    assert len({a.path, c.path, d.path}) == 3


def test_failed_build_leaves_nothing(texts, tok, tmp_path):
    class Broken:
        eos_token_id = tok.eos_token_id
        backend_tokenizer = tok.backend_tokenizer
        chat_template = tok.chat_template

        def __len__(self):
            return len(tok)

        def __call__(self, docs, **k):
            raise RuntimeError("tokenizer crashed mid-build")

    with pytest.raises(RuntimeError, match="mid-build"):
        build_shards(texts, Broken(), tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="empty"):
        build_shards([], tok, tmp_path / "e")


def test_truncated_shard_is_detected(texts, tok, tmp_path):
    s = build_shards(texts, tok, tmp_path, shard_tokens=1000)
    f = s.path / s.index["shards"][0]["file"]
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        open_shards(s.path)


def test_blocks_are_shifted_windows(texts, tok, tmp_path):
    s = build_shards(texts, tok, tmp_path, shard_tokens=777)
    blocks = PackedBlocks(s, seq_len=32)
    stream = s.tokens(0, s.n_tokens)
    assert len(blocks) == (len(stream) - 1) // 32
    for k in (0, 1, len(blocks) // 2, len(blocks) - 1):
        assert blocks[k].tolist() == stream[k * 32:k * 32 + 33].tolist()
    x = blocks.batch([3, 0])
    assert x.shape == (2, 33) and str(x.dtype) == "torch.int64"
    assert x[1].tolist() == stream[0:33].tolist() and x[0].tolist() == stream[96:129].tolist()
    # Consecutive blocks overlap by one token: block k's last target is block k+1's first input.
    assert blocks[0][-1] == blocks[1][0]


def _run(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_epoch_is_a_permutation_and_seeded():
    s = BlockSampler(50, batch_size=10, seed=3)
    epoch0 = sum(_run(s, 5), [])
    assert sorted(epoch0) == list(range(50)) and s.epoch == 1
    epoch1 = sum(_run(s, 5), [])
    assert sorted(epoch1) == list(range(50)) and epoch1 != epoch0
    assert sum(_run(BlockSampler(50, 10, seed=3), 5), []) == epoch0
    assert sum(_run(BlockSampler(50, 10, seed=4), 5), []) != epoch0


@pytest.mark.parametrize("k", [0, 1, 4, 7, 13])
def test_resume_at_k_yields_identical_batches(k):
    ref = _run(BlockSampler(53, batch_size=8, seed=1), 20)  # crosses epochs (6 batches per epoch)
    a = BlockSampler(53, batch_size=8, seed=1)
    _run(a, k)
    state = json.loads(json.dumps(a.state_dict()))  # survives a round trip through a file
    b = BlockSampler(53, batch_size=8, seed=1)
    b.load_state_dict(state)
    assert _run(b, 20 - k) == ref[k:]


def test_ranks_get_disjoint_slices_of_each_global_batch():
    ref = _run(BlockSampler(64, batch_size=8, seed=0), 10)
    ranks = [_run(BlockSampler(64, 8, seed=0, rank=r, world_size=4), 10) for r in range(4)]
    for step in range(10):
        parts = [ranks[r][step] for r in range(4)]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == ref[step]  # disjoint, and together exactly the single-process batch
    # Resume on 2 ranks from a 1-rank state: same global batches continue.
    one = BlockSampler(64, 8, seed=0)
    _run(one, 3)
    two = [BlockSampler(64, 8, seed=0, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.load_state_dict(one.state_dict())
    assert two[0].next_batch() + two[1].next_batch() == ref[3]


def test_sampler_refuses_mismatched_state_and_bad_world():
    s = BlockSampler(40, 8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BlockSampler(40, 4, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="divisible"):
        BlockSampler(40, 8, rank=0, world_size=3)
