"""LoRA helpers shared by the LoRA, SFT and PPO stages: target modules, PEFT config, attach, merge.

The API is small on purpose:

    names = detect_target_modules(model)             # e.g. ["q_proj", ..., "down_proj"] or GPT-2's c_attn...
    check_target_modules(model, ["q_proj", "foo"])   # raises TargetModuleError naming what exists
    cfg = lora_config_from_args(args, model)          # args: alignline.config.LoraArgs -> peft.LoraConfig
    peft_model = attach_lora(model, args, gradient_checkpointing=False)
    merged = merge_lora(peft_model)                   # plain transformers model, adapters folded in
    bnb = bnb_4bit_config()                           # QLoRA quantization config (CUDA + bitsandbytes)

Targets default to every linear projection of the transformer blocks (attention and MLP), which
is what LoRA papers and most recipes train; the output head and embeddings are never targets.
Nothing here trains; see stages/lora.py for the stage that uses it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from torch import nn

from alignline.config import LoraArgs

# Per-architecture targets (HF module names). Llama-like families share the same projection names.
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES_BY_MODEL_TYPE: dict[str, list[str]] = {
    **{
        t: _LLAMA_LIKE
        for t in (
            "alignline", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
            "gemma3_text", "smollm3", "olmo", "olmo2", "granite", "cohere", "starcoder2_llama", "deepseek_v2",
            "internlm2", "yi", "ministral", "helium", "glm", "exaone",
        )
    },
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
}

# Never adapted: output heads and embeddings (their weights are tied or vocabulary-sized).
_EXCLUDED_LEAVES = {"lm_head", "score", "embed_out", "wte", "wpe", "embed_tokens", "v_head", "summary"}


class TargetModuleError(ValueError):
    """A LoRA target module name that the model does not have (the message lists the ones it has)."""


class QLoraUnavailableError(RuntimeError):
    """QLoRA was asked for where it cannot run (no CUDA, or bitsandbytes not installed)."""


def _is_adaptable(module: nn.Module) -> bool:
    # transformers' GPT-2 uses Conv1D (a linear layer with transposed weight); PEFT supports both.
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, nn.Linear | Conv1D)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names (last path component) of every LoRA-adaptable layer, heads excluded, sorted."""
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        if full_name and _is_adaptable(module) and leaf not in _EXCLUDED_LEAVES:
            names.add(leaf)
    return sorted(names)


def detect_target_modules(model: nn.Module) -> list[str]:
    """The LoRA targets for `model`: the per-architecture list, else every linear layer but the heads.

    Works on a model built on the meta device, so it can be checked before weights load.
    """
    present = set(linear_module_names(model))
    if not present:
        raise TargetModuleError(
            f"{type(model).__name__} has no nn.Linear/Conv1D layers outside its heads, so LoRA has nothing "
            "to adapt; is this a causal language model?"
        )
    known = TARGET_MODULES_BY_MODEL_TYPE.get(_model_type(model) or "")
    if known:
        chosen = [name for name in known if name in present]
        if chosen:
            return chosen
    # Unknown architecture: adapt every projection, which is the usual "all-linear" recipe.
    return sorted(present)


def check_target_modules(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Raise TargetModuleError if any of `names` matches no adaptable layer; return the names."""
    names = list(names)
    if not names:
        raise TargetModuleError("lora.target_modules is empty; use 'auto' or list module names such as q_proj")
    present = set(linear_module_names(model))
    missing = [name for name in names if name not in present]
    if missing:
        raise TargetModuleError(
            f"lora.target_modules {missing} not found in {type(model).__name__} "
            f"(model_type={_model_type(model)!r}). Its adaptable layers are: {sorted(present)}. "
            "Fix lora.target_modules or set it to 'auto'."
        )
    return names


def resolve_target_modules(args: LoraArgs, model: nn.Module) -> list[str]:
    """`args.target_modules`, with 'auto' detected per architecture; explicit lists are checked."""
    if args.target_modules == "auto":
        return detect_target_modules(model)
    return check_target_modules(model, args.target_modules)


def _uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, module in model.named_modules()
    )


def lora_config_from_args(args: LoraArgs, model: nn.Module, task_type: str = "CAUSAL_LM"):
    """A `peft.LoraConfig` from our shared LoRA settings (r, alpha, dropout, rsLoRA, DoRA, targets)."""
    from peft import LoraConfig

    targets = resolve_target_modules(args, model)
    return LoraConfig(
        task_type=task_type,
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=targets,
        use_rslora=args.use_rslora,
        use_dora=args.use_dora,
        # Conv1D stores weights as (in, out); PEFT must know to transpose the update.
        fan_in_fan_out=_uses_conv1d(model, targets),
        bias="none",
    )


def attach_lora(model: nn.Module, args: LoraArgs, gradient_checkpointing: bool = False, task_type="CAUSAL_LM"):
    """Wrap `model` in a PEFT LoRA model: base weights frozen, only the adapter trains."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With frozen embeddings the checkpointed blocks would get inputs without grad.
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config_from_args(args, model, task_type=task_type))


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_qlora_support() -> None:
    """Raise QLoraUnavailableError (call it before anything loads) unless CUDA and bitsandbytes are usable."""
    if not torch.cuda.is_available():
        raise QLoraUnavailableError(
            "QLoRA (4-bit) needs a CUDA GPU: bitsandbytes 4-bit kernels do not run on CPU, and this machine "
            "has no CUDA device. Turn QLoRA off to train plain LoRA (lora stage: --set qlora=false), or use a GPU."
        )
    if not bitsandbytes_available():
        raise QLoraUnavailableError(
            "QLoRA (4-bit) needs the bitsandbytes package, which is not installed. Install it with "
            "`pip install 'alignline[qlora]'` (in .venv: `.venv/bin/pip install -e '.[qlora]'`), or set qlora=false."
        )


def bnb_4bit_config(compute_dtype: torch.dtype = torch.bfloat16):
    """NF4 with double quantization, the QLoRA paper's recipe. Call require_qlora_support() first."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
