"""Convert checkpoints between alignline and transformers' `LlamaForCausalLM`; weights map 1:1.

    from alignline.model.convert import convert_checkpoint
    convert_checkpoint("runs/tiny/sft/checkpoint", "out/llama", to="llama")
    convert_checkpoint("out/llama", "out/alignline", to="alignline")

or `alignline convert SRC --to llama|alignline|mixtral|mistral --out DIR`.

Architecture-lab variants convert only where transformers has the exact same network: a mixture of experts
(SwiGLU experts, no shared experts, otherwise the LLaMA recipe) to `MixtralForCausalLM`, a sliding window
(otherwise the LLaMA recipe) to `MistralForCausalLM`. Every other switch (norm, norm position, activation,
position encoding, shared experts, Infini-attention) is refused, naming the field; GPT-2 for instance has
biases and a tanh GELU that our LayerNorm/GELU/learned-position variant does not, so it is not exact. The tokenizer, chat template and
generation config travel with the weights (their files are copied unchanged). Llama features our
decoder does not implement (attention_bias, mlp_bias, a non-SiLU activation, rope types other than
default/linear/dynamic/yarn, quantized weights, ...) are refused with a message naming them; nothing
is dropped silently. In memory: `to_llama(model)` and `from_llama(model)`.
"""

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from alignline.model.configuration import ROPE_KEYS, AlignlineConfig
from alignline.model.modeling import AlignlineForCausalLM

# Fields with the same name and meaning in both configs.
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "attention_dropout", "initializer_range", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
)
# Llama fields we accept only at the value our decoder implements.
LLAMA_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
# Files that are not copied next to the converted weights (they are rewritten by save_pretrained).
WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """The checkpoint uses something the target architecture cannot represent."""


def _base_keys() -> set[str]:
    # Generic PretrainedConfig bookkeeping (dtype, architectures, id2label, ...) carries over as is.
    return set(PretrainedConfig().to_dict()) | {"model_type", "transformers_version", "architectures", "dtype"}


# Which variant switches each transformers target expresses exactly (beyond the LLaMA recipe).
TARGETS = {"llama": (), "mixtral": ("num_experts",), "mistral": ("sliding_window",)}


def _check_target(config: AlignlineConfig, to: str) -> None:
    """ConversionError unless `to` expresses every switch this config sets."""
    odd = [item for item in config.llama_incompatibilities() if item.split("=")[0] not in TARGETS[to]]
    if to == "mixtral" and not config.num_experts:
        odd.append("num_experts=0 (a dense model: convert it with --to llama)")
    if to == "mixtral" and config.num_shared_experts:
        odd.append(f"num_shared_experts={config.num_shared_experts} (Mixtral has no shared experts)")
    if to == "mistral" and config.sliding_window is None:
        odd.append("sliding_window=None (full attention: convert it with --to llama)")
    if odd:
        hints = [f"{field} converts with --to {target}" for target, (field,) in
                 (("mixtral", TARGETS["mixtral"]), ("mistral", TARGETS["mistral"]))
                 if target != to and any(item.startswith(field + "=") for item in odd)]
        raise ConversionError(
            f"this alignline model cannot be expressed as transformers' {to} architecture: {', '.join(odd)}. "
            "Only the LLaMA recipe's switches have an exact counterpart"
            + (f" ({'; '.join(hints)})" if hints else "") + "."
        )


def alignline_to_hf_config(config: AlignlineConfig, to: str = "llama") -> PretrainedConfig:
    """The Llama / Mixtral / Mistral config describing the same network; ConversionError naming any switch
    the target cannot express."""
    from transformers import MistralConfig, MixtralConfig

    _check_target(config, to)
    llama = alignline_to_llama_config(config, checked=True)
    if to == "llama":
        return llama
    kwargs = {name: getattr(llama, name) for name in SHARED_FIELDS}
    kwargs.update(hidden_act="silu", rope_parameters=dict(config.rope_parameters), dtype=config.dtype)
    if to == "mixtral":
        return MixtralConfig(**kwargs, num_local_experts=config.num_experts,
                             num_experts_per_tok=config.num_experts_per_tok,
                             router_aux_loss_coef=config.router_aux_loss_coef, sliding_window=None)
    return MistralConfig(**kwargs, sliding_window=config.sliding_window)


def alignline_to_llama_config(config: AlignlineConfig, checked: bool = False) -> LlamaConfig:
    """The LlamaConfig describing the same network (rope_parameters copied verbatim)."""
    if not checked:
        _check_target(config, "llama")
    if config.hidden_size % config.num_attention_heads != 0:
        raise ConversionError(
            f"LlamaConfig requires hidden_size ({config.hidden_size}) divisible by num_attention_heads "
            f"({config.num_attention_heads}); this alignline config sets head_dim={config.head_dim} explicitly "
            "and cannot be expressed as a Llama checkpoint."
        )
    kwargs: dict[str, Any] = {name: getattr(config, name) for name in SHARED_FIELDS}
    kwargs.update(LLAMA_FIXED)
    kwargs["rope_parameters"] = dict(config.rope_parameters)
    kwargs["pretraining_tp"] = 1
    kwargs["dtype"] = config.dtype
    return LlamaConfig(**kwargs)


def llama_to_alignline_config(config: LlamaConfig) -> AlignlineConfig:
    """The AlignlineConfig for a Llama config; raises ConversionError on any unsupported feature."""
    d = config.to_dict()
    problems = []
    for key, want in LLAMA_FIXED.items():
        if d.get(key, want) != want:
            problems.append(f"{key}={d[key]!r} (alignline implements only {want!r})")
    if (d.get("pretraining_tp") or 1) != 1:
        # transformers 5 ignores it too, but a value > 1 signals a checkpoint expecting sliced matmuls.
        problems.append(f"pretraining_tp={d['pretraining_tp']!r} (only 1 is supported)")
    rp = dict(d.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0})
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ROPE_KEYS:
        problems.append(f"rope_parameters.rope_type={rope_type!r} (supported: {sorted(ROPE_KEYS)})")
    else:
        extra = set(rp) - set(ROPE_KEYS[rope_type]) - {"rope_type", "rope_theta", "type"}
        if extra:
            problems.append(f"rope_parameters keys {sorted(extra)} (not used by alignline's {rope_type!r} rope)")
    if d.get("quantization_config"):
        problems.append("quantization_config (convert the unquantized checkpoint)")
    handled = set(SHARED_FIELDS) | set(LLAMA_FIXED) | {"rope_parameters", "pretraining_tp", "quantization_config"}
    unknown = sorted(k for k in d if k not in handled and k not in _base_keys() and not k.startswith("_"))
    if unknown:
        problems.append(f"fields {unknown} (unknown to alignline)")
    if problems:
        raise ConversionError(
            "Cannot convert this Llama checkpoint to alignline without changing the model: "
            + "; ".join(problems) + ". Retrain or convert a checkpoint without these features."
        )
    kwargs = {name: d[name] for name in SHARED_FIELDS if name in d}
    kwargs["rope_parameters"] = rp
    if d.get("dtype") is not None:
        kwargs["dtype"] = d["dtype"]
    return AlignlineConfig(**kwargs)


def _copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    if set(src_sd) != set(dst_sd):
        missing, extra = sorted(set(dst_sd) - set(src_sd)), sorted(set(src_sd) - set(dst_sd))
        raise ConversionError(f"parameter names differ: missing {missing}, unexpected {extra}")
    for name, tensor in src_sd.items():
        if tensor.shape != dst_sd[name].shape:
            raise ConversionError(f"{name}: shape {tuple(tensor.shape)} vs {tuple(dst_sd[name].shape)}")
    dst.load_state_dict(src_sd, strict=True)


def to_llama(model: AlignlineForCausalLM, to: str = "llama") -> PreTrainedModel:
    """A LlamaForCausalLM (or MixtralForCausalLM / MistralForCausalLM, `to`) with the same weights (copied)
    and the same outputs."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(alignline_to_hf_config(model.config, to)).to(model.dtype)
    _copy_weights(model, hf)
    hf.generation_config = model.generation_config
    return hf.to(model.device)


def from_llama(model: LlamaForCausalLM) -> AlignlineForCausalLM:
    """An AlignlineForCausalLM with the same weights (copied) and the same outputs."""
    ours = AlignlineForCausalLM(llama_to_alignline_config(model.config)).to(model.dtype)
    _copy_weights(model, ours)
    ours.generation_config = model.generation_config
    return ours.to(model.device)


def convert_checkpoint(
    src_dir: str | Path, out_dir: str | Path, to: Literal["llama", "alignline", "mixtral", "mistral"]
) -> Path:
    """Convert the HF checkpoint directory `src_dir` into `out_dir` (created); returns out_dir.

    Weights keep their dtype and values bit for bit; tokenizer / chat template / generation config files
    are copied unchanged.
    """
    from transformers import AutoConfig

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes

    src, out = Path(src_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}/config.json not found: SRC must be a save_pretrained() checkpoint dir.")
    if (src / "adapter_config.json").is_file():
        raise ConversionError(f"{src} is a PEFT adapter, not a model; convert the merged model instead: the lora, "
                              "sft and reward stages write it to <stage dir>/checkpoint next to the adapter (or merge "
                              "it yourself with peft's merge_and_unload() and save_pretrained()).")
    if to not in ("llama", "alignline", "mixtral", "mistral"):
        raise ValueError(f"to={to!r}: choose 'llama', 'mixtral', 'mistral' or 'alignline'.")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source directory; choose a new directory.")
    model_type = AutoConfig.from_pretrained(src).model_type
    want_src = "llama" if to == "alignline" else "alignline"
    if model_type != want_src:
        raise ConversionError(
            f"{src}/config.json has model_type={model_type!r}; converting to {to!r} needs a {want_src!r} "
            "checkpoint."
        )
    if to != "alignline":
        _check_target(AutoConfig.from_pretrained(src), to)  # refuse before loading the weights
        converted = to_llama(AlignlineForCausalLM.from_pretrained(src, dtype="auto"), to)
    else:
        converted = from_llama(LlamaForCausalLM.from_pretrained(src, dtype="auto"))
    out.mkdir(parents=True, exist_ok=True)
    converted.save_pretrained(out)
    for path in src.iterdir():
        if path.is_file() and path.name not in WEIGHT_FILES and not path.name.endswith(".safetensors") \
                and path.name != "generation_config.json":
            shutil.copy2(path, out / path.name)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
    return out


__all__ = [
    "TARGETS",
    "alignline_to_hf_config",
    "ConversionError",
    "alignline_to_llama_config",
    "convert_checkpoint",
    "from_llama",
    "llama_to_alignline_config",
    "to_llama",
]
