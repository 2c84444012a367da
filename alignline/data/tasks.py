"""The built-in task suite: small tasks with verifiable answers, and its gold scorer.

    from alignline.data.tasks import suite_config, write_suite, gold_score
    cfg = suite_config("default", ["seed=1"])        # or SuiteConfig(...)
    write_suite("runs/tiny/data", cfg)                # files listed in docs/ARCHITECTURE.md
    gold_score("19", "19", "numeric")                 # -> 1.0
    python data/generate_suite.py --out DIR [--size tiny|default|small] [--set key=value]

Tasks (answers are short; the assistant content is just the answer):
    add      "What is 12+7?"                      -> "19"      (numeric)
    sub      "What is 15-8?"                      -> "7"       (numeric)
    reverse  "Reverse c a t."                     -> "t a c"   (exact)
    sort     "Sort d o g."                        -> "d g o"   (exact)
    count    "How many o in b o o k?"             -> "2"       (numeric)
    world    "What is the capital of Norvia?"     -> "Lumen"   (exact)
             "What language is spoken in Norvia?" -> "Velish"  (exact)
Demonstrators: with `sft_verbose_rate` > 0 that share of the SFT training demonstrations is written
as "The answer is 19." while the preference data always prefers the bare "19", which is also all the
gold scorer accepts. That is the gap RLHF exists to close (demonstrations are cheap and inconsistent,
comparisons are easy to label): the tiny default sets 0.4, so the SFT model answers verbosely on ~40%
of held-out prompts and PPO has a measurable job. Held-out SFT files always hold bare answers.
Letters are written space-separated so each letter is its own token (a tiny BPE model cannot spell
merged tokens). World facts (a generated world of `n_countries` countries) appear ONLY in the
pretraining text; the countries asked about in val/test are never asked about in any training file,
so answering them needs what pretraining memorised.

Splits: held-out (val, test) items are drawn first, per task, with unique keys; every training
record (pretraining text, SFT, preference, RL prompts) is drawn from the remaining keys. The same
val items feed sft/val, preference/val and prompts/val (likewise test). Same seed -> byte-identical files.

Sizes (tokens measured with a 512-token BPE trained on the corpus):
    tiny     600 pretraining docs (~40k tokens), 300 SFT / 300 pairs / 200 prompts, 30 held out.  Tests.
    default  16k docs (~1.05M tokens), 3000 SFT / 3000 pairs / 2000 prompts, 120 held out per split.
             Fits the CPU budget: ~1-2 min pretraining of a 0.1-1M-parameter model.
    small    60k docs (~4M tokens), 20k SFT / 10k pairs / 8k prompts, 300 held out.
Difficulty is set for the default pipeline: operands in [0, 20], words of 2-3 letters.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from alignline.config import StrictModel, config_from_dict, read_config
from alignline.files import write_bytes

TaskName = Literal["add", "sub", "reverse", "sort", "count", "world"]
ALL_TASKS: tuple[str, ...] = ("add", "sub", "reverse", "sort", "count", "world")
MATCH_KINDS = ("exact", "numeric")


class SuiteConfig(StrictModel):
    """Sizes and knobs of the generated suite; see the module docstring for the presets."""

    seed: int = 0
    tasks: list[TaskName] = Field(default_factory=lambda: list(ALL_TASKS), min_length=1)
    pretrain_docs: int = Field(16000, ge=1, description="pretraining documents (train split)")
    pretrain_val_docs: int = Field(300, ge=1)
    doc_sentences: tuple[int, int] = (4, 8)
    sft_train: int = Field(3000, ge=1)
    pref_train: int = Field(3000, ge=1)
    prompts_train: int = Field(2000, ge=1)
    eval_size: int = Field(120, ge=1, description="held-out items per split (val and test), spread over tasks")
    max_operand: int = Field(20, ge=5, le=9999, description="add/sub operands are in [0, max_operand]")
    word_len: tuple[int, int] = (2, 3)
    n_countries: int = Field(30, ge=6, le=200)
    heldout_countries: int = Field(5, ge=1, description="countries per held-out split (val, test)")
    n_languages: int = Field(12, ge=2)
    pref_format_fraction: float = Field(
        0.65, ge=0, le=1, description="share of rejected answers that are malformed/verbose (vs plausible wrong)"
    )
    sft_verbose_rate: float = Field(
        0.0, ge=0, le=1,
        description="share of SFT training demonstrations written by a verbose demonstrator ('The answer is 19.'); "
        "the preference data prefers the bare answer, which is what the gold scorer accepts",
    )
    pretrain_mix: dict[str, float] = Field(
        default_factory=lambda: {"prose": 0.15, "fact": 0.3, "math": 0.3, "string": 0.25},
        description="sentence-kind weights in pretraining docs (prose, fact, math, string)",
    )

    @model_validator(mode="after")
    def _check(self) -> SuiteConfig:
        if self.doc_sentences[0] < 1 or self.doc_sentences[0] > self.doc_sentences[1]:
            raise ValueError(f"doc_sentences={self.doc_sentences} must be (lo, hi) with 1 <= lo <= hi")
        if self.word_len[0] < 2 or self.word_len[0] > self.word_len[1]:
            raise ValueError(f"word_len={self.word_len} must be (lo, hi) with 2 <= lo <= hi")
        if 2 * self.heldout_countries >= self.n_countries:
            raise ValueError(
                f"heldout_countries={self.heldout_countries} leaves no training countries out of "
                f"n_countries={self.n_countries}; need 2*heldout_countries < n_countries"
            )
        bad = set(self.pretrain_mix) - {"prose", "fact", "math", "string"}
        if bad or not any(v > 0 for v in self.pretrain_mix.values()):
            raise ValueError(
                f"pretrain_mix={self.pretrain_mix}: keys must be prose/fact/math/string with a positive weight"
            )
        return self


SUITE_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        pretrain_docs=600, pretrain_val_docs=30, sft_train=300, pref_train=300, prompts_train=200,
        eval_size=30, n_countries=20, heldout_countries=3, n_languages=6,
    ),
    "default": {},
    "small": dict(
        pretrain_docs=60000, pretrain_val_docs=1000, sft_train=20000, pref_train=10000, prompts_train=8000,
        eval_size=300, n_countries=80, heldout_countries=12, n_languages=20,
    ),
}


def suite_config(size: str = "default", overrides: list[str] | None = None) -> SuiteConfig:
    """A preset (`tiny`, `default`, `small`) with `key=value` overrides applied last."""
    if size not in SUITE_SIZES:
        raise ValueError(f"unknown suite size {size!r}; choose one of {sorted(SUITE_SIZES)}")
    data, source, _ = read_config(params=dict(SUITE_SIZES[size]), overrides=overrides, label=f"suite size {size!r}")
    return config_from_dict(SuiteConfig, data, source=source)


# --------------------------------------------------------------------------- gold scorer

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def user_scorer(match: str) -> Callable[[str, str], float]:
    """The user's scorer named `module:callable` (importable from the working directory or the
    installed packages), called as `scorer(response, answer) -> float in [0, 1]`. Raises ValueError
    naming the reference and what is wrong; the data stage calls it on every prompt file's `match`
    before anything trains."""
    import pkgutil
    import sys

    if match in _SCORERS:
        return _SCORERS[match]
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", match):
        raise ValueError(f"match {match!r} is not 'exact', 'numeric' or a scorer 'module:callable'")
    if "" not in sys.path and "." not in sys.path:  # a user's module next to their data, as `python -m` finds it
        sys.path.insert(0, "")
    try:
        fn = pkgutil.resolve_name(match)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"scorer {match!r} cannot be imported ({type(exc).__name__}: {exc}); it must be "
                         "`module:callable` importable from the working directory") from exc
    if not callable(fn):
        raise ValueError(f"scorer {match!r} is a {type(fn).__name__}, not a function (response, answer) -> float")
    _SCORERS[match] = fn
    return fn


_SCORERS: dict[str, Callable[[str, str], float]] = {}


def check_match(match: Any) -> str:
    """`match` if it names a scorer gold_score can use, else ValueError saying what would."""
    if not isinstance(match, str):
        raise ValueError(f"match must be a string ('exact', 'numeric' or 'module:callable'), got {match!r}")
    if match not in MATCH_KINDS:
        user_scorer(match)
    return match


def gold_score(response: str, answer: str, match: str) -> float:
    """1.0 when `response` is exactly the answer, else 0.0. Kept apart from any reward model.

    Surrounding whitespace is ignored. `exact`: the text must equal `answer`. `numeric`: the text
    must be a single number equal to `answer` ("19", "19.0", "+19"); "19 apples" or "The answer is 19"
    score 0, because the task asks for the bare answer. `module:callable`: the user's scorer
    (`user_scorer`), whose result must be a number in [0, 1].
    """
    if match not in MATCH_KINDS:
        fn = user_scorer(match)
        value = fn(response, answer)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"scorer {match} returned {value!r} for the answer {answer!r}; it must return a "
                             "number in [0, 1]")
        return float(value)
    text = response.strip()
    if match == "exact":
        return 1.0 if text == answer.strip() else 0.0
    if not _NUMBER.fullmatch(text):
        return 0.0
    return 1.0 if abs(float(text) - float(answer)) < 1e-9 else 0.0


# --------------------------------------------------------------------------- world

_SYL = [
    "nor", "vel", "lum", "tar", "kes", "mir", "dan", "sol", "ber", "gal", "rin", "tho", "pel", "zan",
    "kor", "fen", "lis", "mav", "sar", "ten", "vor", "wen", "yal", "bra", "cel", "dor", "esk", "hal",
]
_COUNTRY_END = ["ia", "a", "land", "or", "ea", "istan", "mark"]
_CITY_END = ["en", "ok", "is", "um", "ar", "eth", "ow"]
_LANG_END = ["ish", "ese", "ic", "an"]


@dataclass
class World:
    countries: list[str]
    capital: dict[str, str]
    language: dict[str, str]
    train: list[str]
    heldout: dict[str, list[str]]  # split -> countries asked about only in that split


def _names(rng: random.Random, n: int, ends: list[str], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = (rng.choice(_SYL) + rng.choice(_SYL) + rng.choice(ends)).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_world(cfg: SuiteConfig) -> World:
    rng = random.Random(f"{cfg.seed}:world")
    taken: set[str] = set()
    countries = _names(rng, cfg.n_countries, _COUNTRY_END, taken)
    capitals = _names(rng, cfg.n_countries, _CITY_END, taken)
    langs = _names(rng, cfg.n_languages, _LANG_END, taken)
    order = countries[:]
    rng.shuffle(order)
    h = cfg.heldout_countries
    return World(
        countries=countries,
        capital=dict(zip(countries, capitals)),
        language={c: rng.choice(langs) for c in countries},
        train=sorted(order[2 * h :]),
        heldout={"val": sorted(order[:h]), "test": sorted(order[h : 2 * h])},
    )


# --------------------------------------------------------------------------- items


@dataclass(frozen=True)
class Item:
    task: str
    key: tuple
    prompt: str
    answer: str
    match: str
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def _spaced(word: str) -> str:
    return " ".join(word)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class Generator:
    """Samples items per task; `allowed` restricts keys (train vs held-out)."""

    def __init__(self, cfg: SuiteConfig, world: World):
        self.cfg, self.world = cfg, world

    def word(self, rng: random.Random) -> str:
        n = rng.randint(*self.cfg.word_len)
        return "".join(rng.choice(_LETTERS) for _ in range(n))

    def make(self, task: str, rng: random.Random, countries: list[str]) -> Item:
        m = self.cfg.max_operand
        if task == "add":
            a, b = rng.randint(0, m), rng.randint(0, m)
            return Item(task, (a, b), f"What is {a}+{b}?", str(a + b), "numeric")
        if task == "sub":
            a = rng.randint(0, m)
            b = rng.randint(0, a)
            return Item(task, (a, b), f"What is {a}-{b}?", str(a - b), "numeric")
        if task == "reverse":
            w = self.word(rng)
            return Item(task, (w,), f"Reverse {_spaced(w)}.", _spaced(w[::-1]), "exact", {"word": w})
        if task == "sort":
            w = self.word(rng)
            return Item(task, (w,), f"Sort {_spaced(w)}.", _spaced("".join(sorted(w))), "exact", {"word": w})
        if task == "count":
            w = self.word(rng)
            letter = rng.choice(w) if rng.random() < 0.75 else rng.choice(_LETTERS)
            return Item(
                task, (w, letter), f"How many {letter} in {_spaced(w)}?", str(w.count(letter)), "numeric",
                {"word": w, "letter": letter},
            )
        if task == "world":
            c = rng.choice(countries)
            if rng.random() < 0.5:
                return Item(task, (c, "capital"), f"What is the capital of {c}?", self.world.capital[c], "exact")
            return Item(task, (c, "language"), f"What language is spoken in {c}?", self.world.language[c], "exact")
        raise ValueError(f"unknown task {task!r}; known tasks: {ALL_TASKS}")

    def heldout(self, split: str, n: int, rng: random.Random, exclude: set) -> list[Item]:
        """`n` items with unique keys (not in `exclude`), spread evenly over tasks."""
        tasks = self.cfg.tasks
        # The world task has only 2 questions per held-out country; the other tasks take up the rest.
        quota = {t: 0 for t in tasks}
        cap = {t: 2 * len(self.world.heldout[split]) if t == "world" else n for t in tasks}
        for i in range(n):
            open_tasks = [t for t in tasks if quota[t] < cap[t]]
            if not open_tasks:
                break
            quota[open_tasks[i % len(open_tasks)]] += 1
        items: list[Item] = []
        for task in tasks:
            want = quota[task]
            if task == "world":
                cs = self.world.heldout[split]
                pool = [
                    Item(task, (c, "capital"), f"What is the capital of {c}?", self.world.capital[c], "exact")
                    for c in cs
                ] + [
                    Item(task, (c, "language"), f"What language is spoken in {c}?", self.world.language[c], "exact")
                    for c in cs
                ]
                rng.shuffle(pool)
                items.extend(pool[:want])
                continue
            got: list[Item] = []
            tries = 0
            while len(got) < want:
                tries += 1
                if tries > 1000 * want + 1000:
                    raise ValueError(
                        f"task {task!r}: cannot draw {want} distinct held-out items; raise max_operand/word_len "
                        "or lower eval_size"
                    )
                it = self.make(task, rng, self.world.train)
                if (task, it.key) in exclude:
                    continue
                exclude.add((task, it.key))
                got.append(it)
            items.extend(got)
        rng.shuffle(items)
        return items

    def train_item(self, rng: random.Random, heldout: set, task: str | None = None) -> Item:
        task = task or rng.choice(self.cfg.tasks)
        while True:
            it = self.make(task, rng, self.world.train)
            if (task, it.key) not in heldout:
                return it


# --------------------------------------------------------------------------- wrong answers


def _plausible_wrong(it: Item, rng: random.Random, world: World) -> str:
    for _ in range(50):
        if it.task in ("add", "sub", "count"):
            v = int(it.answer) + rng.choice([-10, -2, -1, 1, 2, 10] if it.task != "count" else [-1, 1, 2])
            if v < 0:
                continue
            cand = str(v)
        elif it.task in ("reverse", "sort"):
            letters = it.answer.split(" ")
            choice = rng.random()
            if choice < 0.4:
                cand = _spaced(it.extra["word"])
            elif choice < 0.7 and len(letters) > 1:
                i = rng.randrange(len(letters) - 1)
                letters[i], letters[i + 1] = letters[i + 1], letters[i]
                cand = " ".join(letters)
            else:
                letters[rng.randrange(len(letters))] = rng.choice(_LETTERS)
                cand = " ".join(letters)
        else:  # world
            table = world.capital if it.key[1] == "capital" else world.language
            cand = table[rng.choice(world.countries)]
        if cand != it.answer:
            return cand
    return it.answer + " " + it.answer  # every draw hit the answer (tiny alphabets): a malformed one


_VERBOSE = [
    "The answer is {a}.",  # also the verbose SFT demonstrator's style (sft_verbose_rate)
    "I think it is {a}, but I am not sure.",
    "Answer: {a}",
    "{a} {a} {a}",
    "Let me think. It might be {a}.",
    "{a}!!",
]
_GIBBERISH = ["I don't know.", "What?", "Hello there.", "It is a good question.", "..."]


def _malformed(it: Item, rng: random.Random, world: World) -> str:
    r = rng.random()
    if r < 0.2:
        return rng.choice(_GIBBERISH)
    if r < 0.35 and " " in it.answer:
        return it.answer.replace(" ", "")  # letters run together: the wrong format
    base = it.answer if rng.random() < 0.5 else _plausible_wrong(it, rng, world)
    return rng.choice(_VERBOSE).format(a=base)


# --------------------------------------------------------------------------- pretraining text

_NAMES = ["Ana", "Bo", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Max", "Nia"]
_ANIMALS = ["cat", "dog", "bird", "fox", "horse", "goat", "fish", "owl"]
_ADJ = ["small", "big", "happy", "quiet", "red", "old", "fast", "kind"]
_OBJECTS = ["book", "ball", "cup", "hat", "box", "lamp", "map", "key"]
_PROSE = [
    "{n} has a {j} {a}.",
    "The {a} is {j}.",
    "{n} walked to {city} with a {a}.",
    "{n} lives in {city}.",
    "In the morning, {n} reads a {o}.",
    "{n} gave the {o} to {m}.",
    "The {j} {a} sleeps under the {o}.",
    "{n} and {m} went to the market.",
    "{n} likes the {j} {o}.",
    "It was a {j} day in {city}.",
]
_FACTS_CAPITAL = [
    "The capital of {c} is {x}.",
    "{x} is the capital of {c}.",
    "{c} is a country. Its capital is {x}.",
    "The capital city of {c} is called {x}.",
]
_FACTS_LANGUAGE = [
    "The people of {c} speak {x}.",
    "In {c}, people speak {x}.",
    "{x} is spoken in {c}.",
    "The language of {c} is {x}.",
]


class Corpus:
    def __init__(self, cfg: SuiteConfig, world: World, gen: Generator, heldout: set):
        self.cfg, self.world, self.gen, self.heldout = cfg, world, gen, heldout
        kinds = {k: v for k, v in cfg.pretrain_mix.items() if v > 0}
        self.kinds, self.weights = list(kinds), list(kinds.values())
        self.math_tasks = [t for t in cfg.tasks if t in ("add", "sub")] or None
        self.string_tasks = [t for t in cfg.tasks if t in ("reverse", "sort", "count")] or None

    def sentence(self, rng: random.Random) -> str:
        kind = rng.choices(self.kinds, self.weights)[0]
        if kind == "math" and self.math_tasks is None or kind == "string" and self.string_tasks is None:
            kind = "prose"
        if kind == "prose":
            w = self.world
            return rng.choice(_PROSE).format(
                n=rng.choice(_NAMES), m=rng.choice(_NAMES), a=rng.choice(_ANIMALS), j=rng.choice(_ADJ),
                o=rng.choice(_OBJECTS), city=w.capital[rng.choice(w.countries)],
            )
        if kind == "fact":
            # Facts about every country, held-out ones included: this is where the knowledge lives.
            c = rng.choice(self.world.countries)
            if rng.random() < 0.5:
                return rng.choice(_FACTS_CAPITAL).format(c=c, x=self.world.capital[c])
            return rng.choice(_FACTS_LANGUAGE).format(c=c, x=self.world.language[c])
        tasks = self.math_tasks if kind == "math" else self.string_tasks
        it = self.gen.train_item(rng, self.heldout, rng.choice(tasks))
        # Half the worked examples use the question wording of the chat tasks, so SFT mostly has to
        # learn the chat format rather than the skill itself.
        if rng.random() < 0.5:
            return f"Q: {it.prompt} A: {it.answer}"
        if it.task == "add":
            a, b = it.key
            return rng.choice(["{a}+{b}={c}.", "{a} plus {b} is {c}."]).format(a=a, b=b, c=it.answer)
        if it.task == "sub":
            a, b = it.key
            return rng.choice(["{a}-{b}={c}.", "{a} minus {b} is {c}."]).format(a=a, b=b, c=it.answer)
        w = _spaced(it.extra["word"])
        if it.task == "reverse":
            return f"{w} reversed is {it.answer}."
        if it.task == "sort":
            return f"{w} sorted is {it.answer}."
        return f"{w} has {it.answer} {it.extra['letter']}."

    def doc(self, rng: random.Random) -> str:
        n = rng.randint(*self.cfg.doc_sentences)
        parts = [self.sentence(rng) for _ in range(n)]
        # Train-country questions may appear as worked examples; held-out ones never do.
        if "world" in self.cfg.tasks and rng.random() < 0.15:
            it = self.gen.train_item(rng, self.heldout, "world")
            parts.append(f"Q: {it.prompt} A: {it.answer}")
        return " ".join(parts)


# --------------------------------------------------------------------------- the suite


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _sft(it: Item, verbose: bool = False) -> dict:
    return {"messages": _user(it.prompt) + _assistant(_VERBOSE[0].format(a=it.answer) if verbose else it.answer)}


def _pair(it: Item, rng: random.Random, cfg: SuiteConfig, world: World) -> dict:
    bad = _malformed(it, rng, world) if rng.random() < cfg.pref_format_fraction else _plausible_wrong(it, rng, world)
    if bad == it.answer:  # cannot happen by construction; keep the invariant explicit
        bad = it.answer + " " + it.answer
    return {"prompt": _user(it.prompt), "chosen": _assistant(it.answer), "rejected": _assistant(bad)}


def _prompt(it: Item) -> dict:
    return {"prompt": _user(it.prompt), "answer": it.answer, "task": it.task, "match": it.match}


def generate_suite(cfg: SuiteConfig) -> dict[str, list[dict]]:
    """All records, keyed by relative file path (e.g. "sft/train.jsonl")."""
    world = make_world(cfg)
    gen = Generator(cfg, world)
    exclude: set = set()
    held = {s: gen.heldout(s, cfg.eval_size, random.Random(f"{cfg.seed}:heldout:{s}"), exclude) for s in ("val", "test")}
    heldout_keys = {(it.task, it.key) for items in held.values() for it in items}
    # World keys of held-out countries are excluded whether or not they were drawn into the eval sets.
    for split in ("val", "test"):
        for c in world.heldout[split]:
            heldout_keys |= {("world", (c, "capital")), ("world", (c, "language"))}

    corpus = Corpus(cfg, world, gen, heldout_keys)
    rng_pt = random.Random(f"{cfg.seed}:pretrain")
    rng_pv = random.Random(f"{cfg.seed}:pretrain-val")
    out: dict[str, list[dict]] = {
        "pretrain/train.jsonl": [{"text": corpus.doc(rng_pt)} for _ in range(cfg.pretrain_docs)],
        "pretrain/val.jsonl": [{"text": corpus.doc(rng_pv)} for _ in range(cfg.pretrain_val_docs)],
    }
    rng = random.Random(f"{cfg.seed}:sft")
    rng_style = random.Random(f"{cfg.seed}:sft-style")  # its own stream: rate 0 leaves the file unchanged
    out["sft/train.jsonl"] = [
        _sft(gen.train_item(rng, heldout_keys), rng_style.random() < cfg.sft_verbose_rate)
        for _ in range(cfg.sft_train)
    ]
    rng = random.Random(f"{cfg.seed}:pref")
    out["preference/train.jsonl"] = [
        _pair(gen.train_item(rng, heldout_keys), rng, cfg, world) for _ in range(cfg.pref_train)
    ]
    rng = random.Random(f"{cfg.seed}:prompts")
    out["prompts/train.jsonl"] = [_prompt(gen.train_item(rng, heldout_keys)) for _ in range(cfg.prompts_train)]
    for split, items in held.items():
        rng = random.Random(f"{cfg.seed}:pairs:{split}")
        out[f"sft/{split}.jsonl"] = [_sft(it) for it in items]
        out[f"preference/{split}.jsonl"] = [_pair(it, rng, cfg, world) for it in items]
        out[f"prompts/{split}.jsonl"] = [_prompt(it) for it in items]
    return out


def to_jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


TRAINING_FILES = ("pretrain/train.jsonl", "sft/train.jsonl", "preference/train.jsonl", "prompts/train.jsonl")


def write_suite(
    out_dir: str | Path, cfg: SuiteConfig | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Generate the suite and write it under `out_dir` (each file atomically); returns suite.json's content."""
    cfg = cfg or SuiteConfig()
    out = Path(out_dir)
    files = generate_suite(cfg)
    hashes: dict[str, str] = {}
    counts: dict[str, int] = {}
    for rel, records in files.items():
        blob = to_jsonl(records)
        write_bytes(out / rel, blob)
        hashes[rel] = hashlib.sha256(blob).hexdigest()
        counts[rel] = len(records)
        if progress:
            progress(f"wrote {rel} ({len(records)} records)")
    world = make_world(cfg)
    meta = {
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "tasks": list(cfg.tasks),
        "sizes": counts,
        "files": hashes,
        "world": {
            "train_countries": world.train,
            "heldout_countries": world.heldout,
        },
    }
    write_bytes(out / "suite.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return meta


def record_texts(record: dict) -> list[str]:
    """Every string in a suite record (for leakage checks)."""
    if "text" in record:
        return [record["text"]]
    out = []
    for key in ("messages", "prompt", "chosen", "rejected"):
        for m in record.get(key, []):
            out.append(m["content"])
    return out
