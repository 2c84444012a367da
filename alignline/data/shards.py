"""Pretraining data path: tokenize once into memory-mapped shards, pack into blocks, sample resumably.

    from alignline.data.shards import build_shards, PackedBlocks, BlockSampler
    shards = build_shards(texts, tokenizer, cache_dir="runs/cache/shards")   # cached by (corpus, tokenizer)
    blocks = PackedBlocks(shards, seq_len=128)        # blocks[k]: seq_len+1 tokens (inputs + shifted targets)
    sampler = BlockSampler(len(blocks), batch_size=32, seed=0, rank=0, world_size=1)
    idx = sampler.next_batch(); x = blocks.batch(idx)  # LongTensor [32 // world_size, seq_len + 1]
    state = sampler.state_dict(); ...; sampler.load_state_dict(state)      # resume mid-epoch, exactly

Layout of a cache entry `<cache_dir>/<sha256(corpus hash, tokenizer hash)[:24]>/`:
    index.json       dtype, n_tokens, n_docs, eos_id, vocab_size, corpus/tokenizer hashes, shard list
    shard_00000.bin  raw token ids (uint16 if vocab < 65536 else uint32), documents joined as
                     doc0 <eos> doc1 <eos> ...  (EOS after every document, so none straddle silently)
The entry is built in a temporary directory and renamed into place, so a crash or a validation
failure leaves no half-built entry; a complete entry is reused without re-tokenizing.

Sampling: epoch e visits blocks in `default_rng([seed, e]).permutation(n_blocks)`, cut into global
batches of `batch_size`; rank r of `world_size` takes the r-th contiguous slice of each global
batch (disjoint across ranks). The position is (epoch, batch index), so a resumed run - even with a
different world size - sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def corpus_hash(texts: Iterable[str]) -> str:
    """sha256 over the documents with their boundaries (so ["ab"] and ["a", "b"] differ)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@dataclass
class ShardSet:
    """A built cache entry: memory-mapped token arrays and their index."""

    path: Path
    index: dict[str, Any]
    arrays: list[np.memmap]

    @property
    def n_tokens(self) -> int:
        return int(self.index["n_tokens"])

    @property
    def eos_id(self) -> int:
        return int(self.index["eos_id"])

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the whole stream, across shard boundaries."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"token range [{start}, {start + length}) outside the stream of {self.n_tokens} tokens")
        out = np.empty(length, dtype=np.int64)
        filled, pos = 0, start
        for arr, offset in zip(self.arrays, self._offsets):
            end = offset + len(arr)
            if pos >= end or filled == length:
                continue
            take = min(end - pos, length - filled)
            out[filled:filled + take] = arr[pos - offset:pos - offset + take]
            filled += take
            pos += take
        return out

    @property
    def _offsets(self) -> list[int]:
        offs, total = [], 0
        for arr in self.arrays:
            offs.append(total)
            total += len(arr)
        return offs


def open_shards(path: str | Path) -> ShardSet:
    path = Path(path)
    index_file = path / INDEX
    if not index_file.is_file():
        raise FileNotFoundError(f"no shard index at {index_file}; build shards with build_shards(...)")
    index = json.loads(index_file.read_text())
    dtype = np.dtype(index["dtype"])
    arrays = []
    for sh in index["shards"]:
        f = path / sh["file"]
        expected = sh["n_tokens"] * dtype.itemsize
        if not f.is_file() or f.stat().st_size != expected:
            raise ValueError(f"shard {f} is missing or truncated (expected {expected} bytes); delete {path} to rebuild")
        arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=(sh["n_tokens"],)))
    return ShardSet(path, index, arrays)


def build_shards(
    texts: Iterable[str],
    tokenizer: Any,
    cache_dir: str | Path,
    shard_tokens: int = 1 << 26,
    batch_docs: int = 1000,
    progress: bool = False,
) -> ShardSet:
    """Tokenize `texts` (EOS after each document) into shards under `cache_dir`, or reuse the cached entry."""
    from alignline.tokenizer import tokenizer_hash

    docs = list(texts)
    if not docs:
        raise ValueError("build_shards: the corpus is empty; pass at least one document")
    c_hash, t_hash = corpus_hash(docs), tokenizer_hash(tokenizer)
    key = hashlib.sha256(f"{c_hash}:{t_hash}".encode()).hexdigest()[:24]
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    if (final / INDEX).is_file():
        return open_shards(final)

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("build_shards: the tokenizer has no eos_token_id; documents need an EOS separator")
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".tmp-{key}-"))
    try:
        shards: list[dict[str, Any]] = []
        buf: list[np.ndarray] = []
        buffered = 0

        def flush() -> None:
            nonlocal buf, buffered
            if not buffered:
                return
            name = f"shard_{len(shards):05d}.bin"
            np.concatenate(buf).astype(dtype).tofile(tmp / name)
            shards.append({"file": name, "n_tokens": int(buffered)})
            buf, buffered = [], 0

        starts = range(0, len(docs), batch_docs)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="tokenizing", unit=f" x{batch_docs} docs")
        n_tokens = 0
        for i in starts:
            for ids in tokenizer(docs[i:i + batch_docs], add_special_tokens=False)["input_ids"]:
                arr = np.asarray([*ids, eos], dtype=np.int64)
                # Split a long document across shards so each shard stays <= shard_tokens.
                while len(arr):
                    room = shard_tokens - buffered
                    buf.append(arr[:room])
                    buffered += len(arr[:room])
                    n_tokens += len(arr[:room])
                    arr = arr[room:]
                    if buffered >= shard_tokens:
                        flush()
        flush()
        index = {
            "format": 1,
            "dtype": dtype.name,
            "n_tokens": n_tokens,
            "n_docs": len(docs),
            "eos_id": int(eos),
            "vocab_size": vocab,
            "corpus_sha256": c_hash,
            "tokenizer_sha256": t_hash,
            "shards": shards,
        }
        # The index is written last inside the temp dir; the rename makes the entry visible at once.
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX).is_file():  # not a concurrent builder winning the race: a real error
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_shards(final)


class PackedBlocks:
    """Fixed-length blocks over the packed stream: block k = tokens [k*seq_len, k*seq_len + seq_len + 1)."""

    def __init__(self, shards: ShardSet, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.shards, self.seq_len = shards, seq_len
        self.n_blocks = (shards.n_tokens - 1) // seq_len
        if self.n_blocks < 1:
            raise ValueError(
                f"the corpus has {shards.n_tokens} tokens, fewer than seq_len+1={seq_len + 1}; "
                "use more text or a shorter seq_len"
            )

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, k: int) -> np.ndarray:
        if not 0 <= k < self.n_blocks:
            raise IndexError(f"block {k} out of range [0, {self.n_blocks})")
        return self.shards.tokens(k * self.seq_len, self.seq_len + 1)

    def batch(self, indices: Iterable[int]):
        """LongTensor [len(indices), seq_len + 1]; inputs are [:, :-1], targets [:, 1:]."""
        import torch

        return torch.from_numpy(np.stack([self[int(k)] for k in indices]))


class BlockSampler:
    """Deterministic, resumable, DDP-aware sampler of block indices (see the module docstring)."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or n_blocks < batch_size:
            raise ValueError(f"batch_size={batch_size} must be in [1, n_blocks={n_blocks}]")
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self._set_world(rank, world_size)
        self.epoch, self.batch_idx = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _set_world(self, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if self.batch_size % world_size:
            raise ValueError(f"global batch_size={self.batch_size} must be divisible by world_size={world_size}")
        self.rank, self.world_size = rank, world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.n_blocks // self.batch_size  # the ragged tail of each permutation is dropped

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, epoch: int, batch_idx: int) -> np.ndarray:
        b = self.batch_size
        return self.permutation(epoch)[batch_idx * b:(batch_idx + 1) * b]

    def next_batch(self) -> list[int]:
        """This rank's block indices for the next global batch; advances the position."""
        g = self.global_batch(self.epoch, self.batch_idx)
        per = self.batch_size // self.world_size
        mine = g[self.rank * per:(self.rank + 1) * per].tolist()
        self.batch_idx += 1
        if self.batch_idx >= self.batches_per_epoch:
            self.epoch, self.batch_idx = self.epoch + 1, 0
        return mine

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_idx": self.batch_idx, "seed": self.seed,
                "n_blocks": self.n_blocks, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a saved position; refuses a state from a different corpus, batch size or seed."""
        for key in ("seed", "n_blocks", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state.get(key)}, this sampler has {getattr(self, key)}; "
                    "resume with the same corpus, tokenizer, seq_len, batch size and seed"
                )
        if not 0 <= state["batch_idx"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"sampler state position epoch={state['epoch']} batch_idx={state['batch_idx']} is invalid")
        self.epoch, self.batch_idx = int(state["epoch"]), int(state["batch_idx"])
