"""Byte-level BPE tokenizer: training, special tokens, and the chat template.

    from alignline.tokenizer import train_tokenizer, load_tokenizer
    tok = train_tokenizer(texts, vocab_size=512, out_dir="runs/tiny/tokenizer/checkpoint")
    tok = load_tokenizer("runs/tiny/pretrain")      # reuse a checkpoint's tokenizer
    alignline tokenizer train --corpus data.txt --vocab-size 512 --out DIR

Design decisions (other parts rely on them, see docs/ARCHITECTURE.md):
- Byte-level BPE: every Unicode string round-trips (`decode(encode(x)) == x`), nothing is <unk>.
- Digits are split one per token before BPE (as Llama does) so arithmetic is learnable by a tiny model.
- Special tokens: `<|bos|>`, `<|eos|>`, `<|pad|>` (pad != eos), `<|system|>`, `<|user|>`, `<|assistant|>`.
- Encoding plain text adds NO special tokens: the chat template adds `<|bos|>` and the `<|eos|>` after each
  turn; the pretraining packer (alignline.data.shards) puts `<|eos|>` between documents.
- The assistant content and its closing `<|eos|>` sit inside `{% generation %}` so TRL's
  `assistant_only_loss=True` / `return_assistant_tokens_mask=True` select exactly the answer tokens.
- `padding_side="left"`: batched generation needs prompts flush right; TRL trainers pad themselves.
- `clean_up_tokenization_spaces=False`: cleanup would change " ." into "." and break the round trip.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from alignline.chat import (  # noqa: F401  (the chat format lives in alignline.chat; re-exported)
    ASSISTANT,
    BOS,
    CHAT_TEMPLATE,
    EOS,
    PAD,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    SYSTEM,
    USER,
)

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _batches(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch: list[str] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer: item {i} of the corpus is {type(text).__name__}, expected str")
        batch.append(text)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    out_dir: str | Path | None = None,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; save it in HF format to `out_dir` when given."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens plus "
            f"{len(SPECIAL_TOKENS)} special tokens; use at least {MIN_VOCAB} (e.g. 512)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = [0]

    def counted() -> Iterator[list[str]]:
        for batch in _batches(texts):
            seen[0] += len(batch)
            yield batch

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise ValueError("train_tokenizer: the corpus is empty; pass at least one text")
    hf = _wrap(tok)
    if out_dir is not None:
        save_tokenizer(hf, out_dir)
    return hf


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def _resolve(path: Path) -> Path:
    for cand in (path, path / "checkpoint", path / "tokenizer"):
        if (cand / "tokenizer.json").is_file():
            return cand
    raise FileNotFoundError(
        f"no tokenizer at {path}: expected tokenizer.json in {path}, {path / 'checkpoint'} or "
        f"{path / 'tokenizer'}; train one with `alignline tokenizer train --corpus FILE --out DIR`"
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a tokenizer dir, an HF checkpoint dir, or a stage dir (uses its checkpoint/)."""
    src = _resolve(Path(path))
    tok = AutoTokenizer.from_pretrained(str(src))
    missing = [t for t in (BOS, EOS, PAD) if t not in tok.get_vocab()]
    if missing or tok.chat_template is None:
        raise ValueError(
            f"tokenizer at {src} is not an alignline tokenizer (missing {missing or 'chat template'}); "
            "train one with alignline.tokenizer.train_tokenizer"
        )
    return tok


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """A stable hash of what decides token ids: the vocab/merges/pre-tokenizer and the special tokens."""
    blob = json.dumps(
        {"tokenizer": json.loads(tok.backend_tokenizer.to_str()), "template": tok.chat_template},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def iter_corpus_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Texts from .txt (one document per non-empty line... or whole file) and .jsonl/.json `text` fields.

    Files are read through alignline.data.loaders so they are validated the same way as training data.
    """
    from alignline.data.loaders import iter_pretrain_texts

    yield from iter_pretrain_texts(paths)
