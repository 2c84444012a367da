"""LoRA stage end to end on tiny random Llama, Qwen2, GPT-2 and alignline checkpoints built on disk.

For each base: held-out assistant loss goes down; only adapter weights change (the merged checkpoint
equals the base outside the target modules, and the adapter holds only LoRA tensors); the merged
checkpoint loads with plain transformers in a fresh process (without importing alignline for the
non-alignline bases) and reproduces the logits of base + adapter (PeftModel) to 1e-5. Plus the
stage contract (manifest with base identity, eval.json, samples) and a run on the shared Alpaca demo.

    .venv/bin/pytest tests/test_lora.py -q        (~40 s on 2 CPU cores)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.lora_fixtures import (
    ARCHS,
    build_base,
    conversations,
    lora_overrides,
    one_thread_per_module,  # noqa: F401 - autouse
    write_jsonl,
)

pytestmark = pytest.mark.slow  # trains with TRL/PEFT: out of `make test-fast`

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "sft" / "alpaca_en_demo.json"
PROBE_IDS = [[3, 17, 42, 5, 99, 7, 250, 11, 64, 2]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the lora stage once per architecture; {arch: (base_dir, stage_dir)}."""
    from stages.lora import build_config, run

    root = tmp_path_factory.mktemp("lora")
    data = write_jsonl(root / "chat.jsonl", conversations(96))
    out = {}
    for arch in ARCHS:
        base = build_base(arch, root / f"base_{arch}")
        cfg = build_config(None, str(base), str(data), lora_overrides())
        out[arch] = (base, run(cfg, None, root / f"run_{arch}"))
    return out


@pytest.fixture(scope="module")
def fresh_logits(runs, tmp_path_factory):
    """Logits of every merged checkpoint computed in ONE fresh interpreter with plain transformers.

    The non-alignline checkpoints load first and the child asserts alignline was never imported;
    only then does it import alignline.model (which registers the model type) for the alignline one.
    """
    dump = tmp_path_factory.mktemp("fresh") / "logits.pt"
    plain = {a: str(runs[a][1] / "checkpoint") for a in ARCHS if a != "alignline"}
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {{}}
for arch, path in {plain!r}.items():
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out[arch] = m(torch.tensor({PROBE_IDS!r})).logits
assert not any(k == "alignline" or k.startswith("alignline.") for k in sys.modules), "alignline was imported"
import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes
m = AutoModelForCausalLM.from_pretrained({str(runs['alignline'][1] / 'checkpoint')!r}, dtype=torch.float32).eval()
with torch.no_grad():
    out["alignline"] = m(torch.tensor({PROBE_IDS!r})).logits
torch.save(out, {str(dump)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(dump.parent), capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dump)


@pytest.mark.parametrize("arch", ARCHS)
def test_heldout_loss_goes_down(runs, arch):
    ev = json.loads((runs[arch][1] / "eval.json").read_text())
    assert ev["heldout_loss_after"] < ev["heldout_loss_before"] - 0.1, ev
    assert ev["steps"] == 40


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapter_weights_change(runs, arch):
    base, out = runs[arch]
    ev = json.loads((out / "eval.json").read_text())
    targets = set(ev["target_modules"])
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter), sorted(adapter)[:5]
    before = load_file(str(base / "model.safetensors"))
    after = load_file(str(out / "checkpoint" / "model.safetensors"))
    assert set(before) == set(after)
    changed = []
    for name, w in before.items():
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        if module in targets and name.endswith("weight"):
            changed.append(not torch.equal(w, after[name]))
        else:
            assert torch.equal(w, after[name]), f"{arch}: non-adapter weight {name} changed"
    assert changed and all(changed), f"{arch}: some target weights did not change"


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_checkpoint_reproduces_adapter_model(runs, fresh_logits, arch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    base, out = runs[arch]
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(out / "adapter")).eval()
    with torch.no_grad():
        ref = model(torch.tensor(PROBE_IDS)).logits
        plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()(
            torch.tensor(PROBE_IDS)).logits
    assert (ref - plain).abs().max() > 1e-3, "the adapter does nothing; the comparison would be vacuous"
    torch.testing.assert_close(fresh_logits[arch], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_contract_and_base_identity(runs, arch):
    from alignline.artifacts import load_stage, sha256_file

    base, out = runs[arch]
    sd = load_stage(out, expect="lora")
    ident = sd.manifest["base"]
    assert ident["source"] == "local" and Path(ident["path"]) == base.resolve()
    assert ident["weight_sha256"] == {"model.safetensors": sha256_file(base / "model.safetensors")}
    ev = sd.eval
    assert len(ev["samples"]) == 2 and all({"before", "after", "reference"} <= set(s) for s in ev["samples"])
    assert (out / "samples.jsonl").is_file()
    expected = {"llama": ("base", "render"), "qwen2": ("base", "generation"), "gpt2": ("default", "generation"),
                "alignline": ("base", "generation")}[arch]
    assert (ev["chat_template_source"], ev["loss_mask"]) == expected
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    # The checkpoint carries the template it was trained with, so later stages render the same way.
    from transformers import AutoTokenizer

    from stages.lora import DEFAULT_CHAT_TEMPLATE

    want = DEFAULT_CHAT_TEMPLATE if arch == "gpt2" else AutoTokenizer.from_pretrained(str(base)).chat_template
    assert AutoTokenizer.from_pretrained(str(sd.checkpoint)).chat_template == want


@pytest.mark.parametrize("arch", ["gpt2", "alignline"])
def test_checkpoint_loads_as_reward_model_init(runs, arch):
    # The reward stage builds AutoModelForSequenceClassification(num_labels=1) from `--init <stage>/checkpoint`.
    from transformers import AutoModelForSequenceClassification

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    ckpt = runs[arch][1] / "checkpoint"
    rm = AutoModelForSequenceClassification.from_pretrained(str(ckpt), num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        assert rm(torch.tensor(PROBE_IDS)).logits.shape == (1, 1)


def test_alpaca_demo_through_the_loaders(tmp_path):
    """Real Alpaca records (instruction/input/output) via alignline.data.loaders on a Llama-style base."""
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} not present (CI has ../shared beside the repo)")
    from stages.lora import build_config, run

    base = build_base("llama", tmp_path / "base")
    cfg = build_config(None, str(base), str(ALPACA), lora_overrides(**{
        "data.max_records": 48, "data.max_val_examples": 8, "train.max_length": 96, "train.max_steps": 15}))
    out = run(cfg, None, tmp_path / "run")
    ev = json.loads((out / "eval.json").read_text())
    assert ev["heldout_loss_after"] < ev["heldout_loss_before"]
    assert ev["train_examples"] + ev["heldout_examples"] + sum(ev["dropped_examples"].values()) == 48


def test_killed_run_resumes_from_its_trainer_checkpoint(tmp_path, monkeypatch, caplog):
    """A crash after a checkpoint, then the same command again: the adapter equals an uninterrupted run's."""
    from alignline.artifacts import load_stage
    from alignline.training import FAIL_AFTER_ENV, SimulatedInterrupt
    from stages.lora import build_config, run

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(48))
    base = build_base("llama", tmp_path / "base")
    cfg = build_config(None, str(base), str(data), lora_overrides(**{"train.max_steps": 8, "train.save_every": 4}))
    full = run(cfg, None, tmp_path / "a")

    monkeypatch.setenv(FAIL_AFTER_ENV, "4")
    with pytest.raises(SimulatedInterrupt):
        run(cfg, None, tmp_path / "b")
    assert (tmp_path / "b" / "lora" / "state" / "trainer" / "checkpoint-4").is_dir()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    with caplog.at_level(logging.INFO, logger="alignline"):
        resumed = run(cfg, None, tmp_path / "b")
    lines = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
    assert len(lines) == 1 and "lora: resumed from step 4" in lines[0] and "checkpoint-4" in lines[0], lines

    wa = load_file(str(load_stage(full).adapter / "adapter_model.safetensors"))
    wb = load_file(str(load_stage(resumed).adapter / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics logged before the crash must not be repeated"
