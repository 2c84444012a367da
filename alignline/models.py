"""Resolving and loading models: where a model is, what it is, and loading it one way everywhere.

    src = resolve_model("Qwen/Qwen2.5-0.5B", revision="main")   # or a local HF dir, or a stage dir
    check_causal_lm(src.path)                                    # refuses encoders, classifiers, seq2seq
    hash_weights(src); src.identity()                            # what a manifest records
    model = load_causal_lm(src.path, device="cpu")               # fp32 unless told otherwise
    rm = load_classifier(reward_dir, device="cpu")               # a reward/value model (one score)
    tok = load_chat_tokenizer(src.path); ensure_pad_token(tok, model)  # a pad token distinct from eos

A model is named by a local HF directory (config.json + weights), an alignline stage directory
(its checkpoint/ is used, and the stage is recorded as an input), or a hub id (`org/name`, with
an optional revision; the snapshot's commit pins it). Every problem is an `InputError` (a user
error: one message, exit 2) raised before any weights load. The device comes from
`alignline.distributed.pick_device`, the one device picker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignline.config import InputError

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


@dataclass
class ModelSource:
    """Where a model's files are and who it is (what a manifest records)."""

    spec: str
    path: Path
    source: Literal["local", "hub", "stage"]
    hub_id: str | None = None
    revision: str | None = None
    stage_dir: Path | None = None
    weight_hashes: dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "source": self.source, "path": str(self.path)}
        if self.hub_id:
            out.update(hub_id=self.hub_id, revision=self.revision)
        if self.stage_dir:
            out["stage_dir"] = str(self.stage_dir)
        out["weight_sha256"] = self.weight_hashes
        return out


def resolve_model(spec: str | None, revision: str | None = None, trust_remote_code: bool = False,
                  flag: str = "--base") -> ModelSource:
    """Find the model on disk (downloading a hub id's snapshot) without loading any weights. `flag`
    names the option or key that gave `spec`, for the messages."""
    if not spec:
        raise InputError(f"no model: pass {flag} DIR_OR_HUB_ID")
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{flag} {spec}: is a file; pass the model directory (with config.json)")
        if (p / "manifest.json").is_file():
            from alignline.artifacts import load_stage

            sd = load_stage(p)
            return ModelSource(spec, sd.checkpoint.resolve(), "stage", stage_dir=p.resolve())
        if not (p / "config.json").is_file():
            raise InputError(f"{flag} {spec}: no config.json in {p}; pass an HF model directory or a finished stage dir")
        return ModelSource(spec, p.resolve(), "local")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise InputError(f"{flag} {spec}: no such directory (and it is not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
        if trust_remote_code:
            patterns.append("*.py")
        local = snapshot_download(repo_id=spec, revision=revision, allow_patterns=patterns)
    except Exception as exc:  # hub errors come in many classes; all mean "could not fetch"
        raise InputError(
            f"{flag} {spec}: not a local directory, and downloading it from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc}). Check the id/revision and your network, or pass a local dir."
        ) from exc
    local_path = Path(local)
    if not list(local_path.glob("*.safetensors")):
        raise InputError(f"hub model {spec} has no *.safetensors weights; convert it or pass a local dir")
    # snapshot dirs are named by the commit sha, which pins the revision exactly.
    return ModelSource(spec, local_path, "hub", hub_id=spec, revision=local_path.name)


def hash_weights(src: ModelSource) -> None:
    """sha256 of every weight file, into `src.weight_hashes` (the manifest's model identity)."""
    from tqdm.auto import tqdm

    from alignline.artifacts import sha256_file

    files = sorted(f for g in WEIGHT_GLOBS for f in src.path.glob(g))
    if not files:
        raise InputError(f"model {src.path} has no weight files ({', '.join(WEIGHT_GLOBS)})")
    for f in tqdm(files, desc="hashing model weights", disable=len(files) < 2):
        src.weight_hashes[f.name] = sha256_file(f)


def check_causal_lm(path: Path, trust_remote_code: bool = False):
    """Read the model config and refuse anything that is not a decoder-only causal LM; returns the config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path / 'config.json'}: cannot read the model config ({exc})") from exc
    causal_names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ([v] if isinstance(v, str) else v)}
    registered = None
    if type(config) in AutoModelForCausalLM._model_mapping:
        registered = AutoModelForCausalLM._model_mapping[type(config)]
        causal_names |= {c.__name__ for c in (registered if isinstance(registered, tuple) else (registered,))}
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        ok = any(a in causal_names or a.endswith("ForCausalLM") for a in archs)
        what = ", ".join(archs)
    else:
        encoder_only = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
            config, "is_decoder", False
        )
        ok = registered is not None and not encoder_only
        what = f"model_type={config.model_type!r} (encoder-only)" if encoder_only else f"model_type={config.model_type!r}"
    if not ok or getattr(config, "is_encoder_decoder", False):
        raise InputError(
            f"{path / 'config.json'}: the model is {what}, not a causal language model. This takes "
            "decoder-only *ForCausalLM checkpoints (Llama, Qwen, Mistral, Gemma, GPT-2, alignline); "
            "for a reward/classifier model use the reward stage."
        )
    return config


def load_causal_lm(path: str | Path, *, dtype=None, device: str | None = None, **kwargs):
    """A causal LM from an HF directory (alignline checkpoints included), in `dtype` (default fp32), on
    `device` (default: stays on the CPU). Extra `kwargs` go to `from_pretrained`."""
    import torch
    from transformers import AutoModelForCausalLM

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32, **kwargs)
    return model.to(device) if device is not None else model


def load_classifier(path: str | Path, *, dtype=None, device: str | None = None, **kwargs):
    """A sequence classifier (a reward or value model: one score per sequence) from an HF directory.
    A causal-LM checkpoint gets a fresh score head (pass `num_labels=1, pad_token_id=...`)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype or torch.float32, **kwargs)
    return model.to(device) if device is not None else model


PAD_TOKEN = "<|pad|>"


def load_chat_tokenizer(path: str | Path):
    """The tokenizer of a chat checkpoint (an alignline one, or a released model's): it must have a
    chat template and an eos token; InputError naming the directory otherwise."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load a tokenizer from {path} ({exc})") from exc
    if tok.chat_template is None or tok.eos_token_id is None:
        what = "chat template" if tok.chat_template is None else "eos token"
        raise InputError(f"the tokenizer in {path} has no {what}; a chat stage needs one (train the alignline "
                         "tokenizer, or start from a chat model)")
    return tok


def ensure_pad_token(tokenizer, model) -> str | None:
    """Give a released model a pad token distinct from eos, as PPO's masks and the reward model's
    last-token lookup need: many released tokenizers have none, or reuse eos. Adds `<|pad|>` as a
    special token, grows the embeddings to the tokenizer (new rows at the mean of the old ones, so
    the padding token's logit starts ordinary), and records the id in the model's config and
    generation config. Call it for every model that will see the tokenizer's ids: a second model
    given the already-extended tokenizer is grown to match. Returns what was added, for the log, or
    None when the tokenizer already had a distinct pad."""
    added = None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        before = tokenizer.pad_token
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        was = "no pad token" if before is None else f"pad token {before!r} = eos"
        added = f"the tokenizer had {was}; added {PAD_TOKEN!r} (id {tokenizer.pad_token_id}) as a distinct pad token"
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added
