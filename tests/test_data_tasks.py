"""The built-in task suite: determinism, record shapes, correct answers, no held-out leakage, gold scorer.

    .venv/bin/pytest tests/test_data_tasks.py -q
"""

from __future__ import annotations

import json
import re

import pytest

from alignline.config import ConfigError
from alignline.data.tasks import (
    TRAINING_FILES,
    SuiteConfig,
    gold_score,
    make_world,
    record_texts,
    suite_config,
    write_suite,
)
from alignline.files import read_jsonl

CFG = suite_config("tiny")
FILES = [f"{k}/{s}.jsonl" for k in ("sft", "preference", "prompts") for s in ("train", "val", "test")]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    meta = write_suite(out, CFG)
    return out, meta


def _load(out, rel):
    return read_jsonl(out / rel)


def test_same_seed_byte_identical_and_seed_matters(suite, tmp_path):
    out, meta = suite
    write_suite(tmp_path / "again", CFG)
    for rel in ["pretrain/train.jsonl", "pretrain/val.jsonl", *FILES, "suite.json"]:
        assert (out / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel
    write_suite(tmp_path / "other", suite_config("tiny", ["seed=1"]))
    assert (out / "sft/train.jsonl").read_bytes() != (tmp_path / "other" / "sft/train.jsonl").read_bytes()


def test_suite_json_records_sizes_and_hashes(suite):
    import hashlib

    out, _ = suite
    meta = json.loads((out / "suite.json").read_text())
    assert meta["seed"] == 0 and meta["tasks"] == list(CFG.tasks)
    for rel, digest in meta["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
        assert meta["sizes"][rel] == len(_load(out, rel))
    assert meta["sizes"]["sft/train.jsonl"] == CFG.sft_train
    assert meta["sizes"]["prompts/test.jsonl"] == CFG.eval_size


def test_record_shapes(suite):
    out, _ = suite
    for r in _load(out, "pretrain/train.jsonl"):
        assert set(r) == {"text"} and r["text"]
    for s in ("train", "val", "test"):
        for r in _load(out, f"sft/{s}.jsonl"):
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        for r in _load(out, f"preference/{s}.jsonl"):
            assert set(r) == {"prompt", "chosen", "rejected"}
            assert [m["role"] for m in r["prompt"]] == ["user"]
            assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        for r in _load(out, f"prompts/{s}.jsonl"):
            assert set(r) == {"prompt", "answer", "task", "match"} and r["match"] in ("exact", "numeric")


def _reference_answer(prompt: str, world) -> str:
    """Recompute the answer from the prompt text alone, independently of the generator."""
    if m := re.fullmatch(r"What is (\d+)([+-])(\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if m := re.fullmatch(r"Reverse ([a-z](?: [a-z])*)\.", prompt):
        return " ".join(reversed(m[1].split(" ")))
    if m := re.fullmatch(r"Sort ([a-z](?: [a-z])*)\.", prompt):
        return " ".join(sorted(m[1].split(" ")))
    if m := re.fullmatch(r"How many ([a-z]) in ([a-z](?: [a-z])*)\?", prompt):
        return str(m[2].split(" ").count(m[1]))
    if m := re.fullmatch(r"What is the capital of (\w+)\?", prompt):
        return world.capital[m[1]]
    if m := re.fullmatch(r"What language is spoken in (\w+)\?", prompt):
        return world.language[m[1]]
    raise AssertionError(f"unrecognised prompt {prompt!r}")


def test_answers_are_correct_and_pairs_ordered(suite):
    out, _ = suite
    world = make_world(CFG)
    for s in ("train", "val", "test"):
        for r in _load(out, f"sft/{s}.jsonl"):
            assert r["messages"][1]["content"] == _reference_answer(r["messages"][0]["content"], world)
        for r in _load(out, f"prompts/{s}.jsonl"):
            assert r["answer"] == _reference_answer(r["prompt"][0]["content"], world)
            assert gold_score(r["answer"], r["answer"], r["match"]) == 1.0
        for r in _load(out, f"preference/{s}.jsonl"):
            ans = _reference_answer(r["prompt"][0]["content"], world)
            match = "exact" if not ans.isdigit() else "numeric"
            assert gold_score(r["chosen"][0]["content"], ans, match) == 1.0
            assert gold_score(r["rejected"][0]["content"], ans, match) == 0.0
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]


def test_every_task_present_in_every_split(suite):
    out, _ = suite
    for s in ("train", "val", "test"):
        assert {r["task"] for r in _load(out, f"prompts/{s}.jsonl")} == set(CFG.tasks)


def test_heldout_prompts_never_in_training_files(suite):
    out, _ = suite
    training = "\n".join(t for rel in TRAINING_FILES for r in _load(out, rel) for t in record_texts(r))
    val = {r["prompt"][0]["content"] for r in _load(out, "prompts/val.jsonl")}
    test = {r["prompt"][0]["content"] for r in _load(out, "prompts/test.jsonl")}
    assert not val & test
    for p in val | test:
        assert p not in training, f"held-out prompt leaked into training data: {p!r}"
    # Same for the held-out SFT and preference files.
    for s in ("val", "test"):
        for rel in (f"sft/{s}.jsonl", f"preference/{s}.jsonl"):
            for r in _load(out, rel):
                q = (r.get("messages") or r.get("prompt"))[0]["content"]
                assert q not in training


def test_heldout_countries_only_in_pretraining_facts(suite):
    out, meta = suite
    world = make_world(CFG)
    held = meta["world"]["heldout_countries"]["val"] + meta["world"]["heldout_countries"]["test"]
    pretrain = "\n".join(r["text"] for r in _load(out, "pretrain/train.jsonl"))
    other_train = "\n".join(
        t for rel in TRAINING_FILES[1:] for r in _load(out, rel) for t in record_texts(r)
    )
    for c in held:
        assert c not in other_train, f"held-out country {c} asked about in a training file"
        # ...but the knowledge is there for pretraining to learn.
        assert f"{world.capital[c]}" in pretrain and c in pretrain


def test_rejected_mix_has_detectable_and_plausible(suite):
    out, _ = suite
    pairs = _load(out, "preference/train.jsonl")
    malformed = sum(
        1 for r in pairs if not re.fullmatch(r"\d+|[A-Z][a-z]+|[a-z](?: [a-z])*", r["rejected"][0]["content"])
    )
    frac = malformed / len(pairs)
    assert 0.5 < frac < 0.8, frac  # pref_format_fraction=0.65: both kinds are well represented


@pytest.mark.parametrize(
    "response,answer,match,expected",
    [
        ("19", "19", "numeric", 1.0),
        (" 19\n", "19", "numeric", 1.0),
        ("19.0", "19", "numeric", 1.0),
        ("+19", "19", "numeric", 1.0),
        ("18", "19", "numeric", 0.0),
        ("The answer is 19", "19", "numeric", 0.0),
        ("19 19", "19", "numeric", 0.0),
        ("", "19", "numeric", 0.0),
        ("nineteen", "19", "numeric", 0.0),
        ("t a c", "t a c", "exact", 1.0),
        ("t a c ", "t a c", "exact", 1.0),
        ("tac", "t a c", "exact", 0.0),
        ("Lumen", "Lumen", "exact", 1.0),
        ("lumen", "Lumen", "exact", 0.0),
    ],
)
def test_gold_score(response, answer, match, expected):
    assert gold_score(response, answer, match) == expected


def test_gold_score_unknown_match():
    with pytest.raises(ValueError, match="is not .exact., .numeric. or a scorer"):
        gold_score("1", "1", "fuzzy")


def test_config_is_strict_and_presets_validate():
    with pytest.raises(ConfigError, match="unknown key"):
        suite_config("tiny", ["sft_trian=5"])
    with pytest.raises(ValueError, match="unknown suite size"):
        suite_config("huge")
    with pytest.raises(Exception, match="heldout_countries"):
        SuiteConfig(n_countries=10, heldout_countries=5)
    for size in ("tiny", "default", "small"):
        suite_config(size)
    assert suite_config("tiny", ["tasks=[add]"]).tasks == ["add"]


def test_verbose_demonstrators_change_only_sft_train(suite, tmp_path):
    """`sft_verbose_rate` rewrites that share of SFT training answers as "The answer is X." (same items,
    same order) and leaves every other file byte-identical; preferences still favour the bare answer."""
    out, _ = suite
    noisy = tmp_path / "noisy"
    write_suite(noisy, CFG.model_copy(update={"sft_verbose_rate": 0.4}))
    for rel in sorted(set(TRAINING_FILES) | set(FILES) | {"pretrain/val.jsonl"}):
        if rel != "sft/train.jsonl":
            assert (noisy / rel).read_bytes() == (out / rel).read_bytes(), rel
    clean, verbose = _load(out, "sft/train.jsonl"), _load(noisy, "sft/train.jsonl")
    assert len(clean) == len(verbose)
    n_verbose = 0
    for c, v in zip(clean, verbose, strict=True):
        assert c["messages"][0] == v["messages"][0]
        bare, got = c["messages"][1]["content"], v["messages"][1]["content"]
        if got != bare:
            assert got == f"The answer is {bare}."
            n_verbose += 1
    assert 0.3 < n_verbose / len(clean) < 0.5, n_verbose
