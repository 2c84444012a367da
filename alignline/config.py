"""Typed configuration: strict pydantic models, YAML files, and `--set key=value` overrides.

Every config in alignline derives from `StrictModel`, so an unknown or misspelt key is an
error rather than a silently ignored setting. `load_config` reads a YAML file, applies
overrides last, validates, and on failure raises `ConfigError` naming the file, the line
(when the key is in the file) and the dotted key:

    cfg = load_config(PretrainConfig, "configs/pretrain/tiny.yaml", ["optim.lr=3e-4"])
    save_config(cfg, run_dir / "config.yaml")

Shared sub-configs (optimizer, schedule, LoRA, logging, the decoder's shape) live here; each stage's own
config lives beside the stage in `stages/<name>.py`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

T = TypeVar("T", bound=BaseModel)


class UserError(Exception):
    """A problem the user can fix (config, input path, data), as opposed to a bug.

    The CLIs (alignline/stage_cli.py, alignline_cli/main.py) print its message alone and exit 2;
    any other exception is a bug and keeps its traceback (exit 1). The message names the file,
    key or line and says how to fix it.
    """


def debug_enabled() -> bool:
    """ALIGNLINE_DEBUG=1 (or `alignline --debug`): user errors keep their traceback everywhere."""
    return os.environ.get("ALIGNLINE_DEBUG", "") not in ("", "0")


class InputError(UserError, ValueError):
    """A model, tokenizer, data file or chat template that cannot be used, found before any training."""


class ConfigError(UserError, ValueError):
    """A configuration problem, with where it is and how to fix it in the message."""


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated.

    `variant_key` (a class variable, not a config key): the dotted config key that selects the
    stage's variant, e.g. "algorithm" in the rlhf stage's config. Each variant writes its own output
    directory, `<stage>-<value>/` (see `alignline.artifacts.stage_dir_name`), so alternatives in one
    run directory survive side by side and are cached separately. None (the default): one `<stage>/`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    variant_key: ClassVar[str | None] = None
    # A discriminated union: the base class of the variants' configs sets `variants` (value of
    # `variant_key` -> config class) and `default_variant`; validating or constructing the base then
    # builds the class the data's `variant_key` names, so a variant cannot carry another's keys.
    variants: ClassVar[dict[str, type[StrictModel]] | None] = None
    default_variant: ClassVar[str | None] = None

    @model_validator(mode="before")
    @classmethod
    def _section_defaults(cls, data: Any) -> Any:
        """A section given in part keeps its field's defaults for the rest: `optim: {lr: 1e-3}` in a
        DPO config has DPO's weight decay and betas (the values --help shows), not OptimConfig's."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            default = field.default
            if isinstance(default, StrictModel) and isinstance(out.get(name), dict):
                out[name] = {**default.model_dump(exclude_unset=False), **out[name]}
        return out

    @classmethod
    def variant_class(cls, data: Any) -> type[StrictModel]:
        """The class `data` validates into: `cls`, or (for a union's base) the variant it names."""
        variants = cls.__dict__.get("variants")
        if not variants or not isinstance(data, dict):
            return cls
        tag = data.get(cls.variant_key, cls.default_variant)
        if tag not in variants:
            names = list(variants)
            expected = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
            raise ValidationError.from_exception_data(cls.__name__, [
                {"type": "literal_error", "loc": (cls.variant_key,), "input": tag, "ctx": {"expected": expected}}])
        return variants[tag]

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):
        target = cls.variant_class(obj)
        if target is not cls:
            return target.model_validate(obj, *args, **kwargs)
        return super().model_validate(obj, *args, **kwargs)

    def __new__(cls, *args: Any, **data: Any):
        target = cls.variant_class(data)
        return super().__new__(target if target is not cls else cls)


# --------------------------------------------------------------------------- shared parts


class OptimConfig(StrictModel):
    """AdamW with decoupled weight decay; no decay on norms, biases and embeddings."""

    lr: float = Field(3e-3, gt=0, description="peak learning rate (reached after warmup)")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay coefficient")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon added to the denominator")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


class ScheduleConfig(StrictModel):
    """Linear warmup, then cosine decay to `min_lr_ratio * lr`."""

    warmup_steps: int = Field(10, ge=0, description="optimizer steps of linear LR warmup; 0 = none")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="final LR as a fraction of optim.lr (cosine; linear too in pretrain)"
    )
    kind: Literal["cosine", "constant", "linear"] = Field(
        "cosine", description="LR shape after warmup: cosine | constant | linear decay"
    )


class TrainerLoopConfig(StrictModel):
    """The `train:` section of a stage trained by an HF/TRL Trainer (sft, reward): steps, batches,
    cadence, device. `alignline.training.hf_trainer_args` turns it, with `optim:`/`schedule:`, into
    TrainingArguments; a stage subclasses it to add its own keys."""

    seed: int = Field(0, description="seeds init, data order and dropout (Trainer seed/data_seed)")
    epochs: float = Field(1.0, gt=0, description="passes over the training set when max_steps is -1")
    max_steps: int = Field(-1, description="optimizer steps; -1 = use epochs")
    batch_size: int = Field(32, gt=0, description="examples per step over all ranks (global: under torchrun each of "
                            "N ranks takes batch_size/N, so N does not change what is trained)")
    grad_accum: int = Field(1, gt=0, description="batches accumulated per optimizer step")
    max_length: int = Field(256, gt=0, description="tokens per training example; longer ones are cut")
    eval_every: int = Field(50, gt=0, description="Trainer evaluation on the val set every N steps")
    save_every: int = Field(50, gt=0, description="Trainer checkpoint under state/ every N steps")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when there is one")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 off the CPU")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="under torchrun (nproc_per_node > 1): ddp = a full copy per rank, gradients averaged; "
        "fsdp = FSDP2, parameters, gradients and optimizer state sharded over the ranks (for models that do not fit)")
    max_train_examples: int | None = Field(None, ge=1, description="use the first N training examples only")


# --------------------------------------------------------------------------- decoder shape


class ModelConfig(StrictModel):
    """Decoder shape and architecture switches. vocab_size comes from the tokenizer. The switch defaults are
    the LLaMA recipe (converts 1:1 to LlamaForCausalLM); see alignline/model/configuration.py."""

    arch: Literal["alignline", "llama"] = Field("alignline", description="alignline decoder or HF LlamaForCausalLM")
    hidden_size: int = Field(64, gt=0, description="model width; divisible by num_attention_heads")
    intermediate_size: int | None = Field(
        176, gt=0, description="hidden width of the MLP (and of each expert); null = 2.75x width gated, 4x plain")
    num_hidden_layers: int = Field(2, gt=0, description="decoder blocks")
    num_attention_heads: int = Field(4, gt=0, description="query heads; divisible by num_key_value_heads")
    num_key_value_heads: int = Field(2, gt=0, description="key/value heads (grouped-query attention)")
    max_position_embeddings: int = Field(
        256, gt=0, description="longest sequence in tokens; >= train.seq_len (the learned table's size)"
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency")
    rope_scaling: dict[str, Any] | None = Field(
        None, description="RoPE scaling, e.g. {rope_type: yarn, factor: 8, original_max_position_embeddings: 128}")
    tie_word_embeddings: bool = Field(True, description="share the input embedding and output head weights")
    initializer_range: float = Field(0.02, gt=0, description="std of the normal weight initialisation")
    norm: Literal["rmsnorm", "layernorm", "deepnorm"] = Field(
        "rmsnorm", description="normalisation; deepnorm = post-norm LayerNorm with DeepNet's alpha/beta")
    norm_position: Literal["pre", "post", "sandwich"] | None = Field(
        None, description="where the norms sit; null = post for deepnorm, else pre")
    activation: Literal["swiglu", "geglu", "gelu", "relu", "swish"] = Field(
        "swiglu", description="MLP activation; swiglu/geglu are gated (3 matrices)")
    position: Literal["rope", "alibi", "sinusoidal", "learned", "t5_bias", "none"] = Field(
        "rope", description="position encoding; none = NoPE (causal mask only)")
    num_experts: int = Field(0, ge=0, description="0 = dense MLP; > 0 = mixture of experts with this many experts")
    num_experts_per_tok: int = Field(2, gt=0, description="experts each token is routed to (top-k)")
    num_shared_experts: int = Field(0, ge=0, description="always-on experts beside the routed ones")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="weight of the load-balancing loss; null = 0.01 with experts, 0 without")
    router_z_loss_coef: float = Field(0.0, ge=0, description="weight of the router z-loss (ST-MoE)")
    sliding_window: int | None = Field(None, gt=0, description="attend to the last N tokens only; null = all")
    attention: Literal["standard", "infini"] = Field(
        "standard", description="infini = Infini-attention: segment-local attention + compressive memory")
    infini_segment_len: int = Field(64, gt=0, description="Infini-attention segment length in tokens")
    infini_update: Literal["linear", "delta"] = Field("linear", description="Infini-attention memory update rule")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.arch == "llama":
            odd = [f"{k}={getattr(self, k)!r}" for k in SWITCHES if getattr(self, k) != ModelConfig.model_fields[k].default]
            if odd:
                raise ValueError(f"arch=llama is the LLaMA recipe only; {', '.join(odd)} need arch=alignline")
        from types import SimpleNamespace

        from alignline.architecture import check_switches

        # The model's own combination rules, without loading torch (AlignlineConfig runs the same ones).
        position = self.norm_position or ("post" if self.norm == "deepnorm" else "pre")
        fields = {k: getattr(self, k) for k in SWITCHES} | {"norm_position": position}
        check_switches(SimpleNamespace(**fields, hidden_size=self.hidden_size, rope_parameters=self.rope_scaling,
                                       relative_attention_num_buckets=32, relative_attention_max_distance=128))
        return self

    def alignline_config(self, vocab_size: int, **token_ids: Any):
        """The AlignlineConfig this section describes (`model_kwargs` gives the fields LlamaConfig shares)."""
        from alignline.model import AlignlineConfig

        return AlignlineConfig(**self.model_kwargs(vocab_size), **token_ids)

    def model_kwargs(self, vocab_size: int) -> dict[str, Any]:
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        kwargs = dict(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, initializer_range=self.initializer_range,
            rope_parameters=rope,
        )
        if self.arch == "alignline":
            kwargs.update({k: getattr(self, k) for k in SWITCHES})
        return kwargs


def build_model(m: ModelConfig, tokenizer, vocab_size: int | None = None):
    """A freshly initialised causal LM of the configured shape (seed the RNG before calling). `vocab_size`:
    the output layer's rows, default the tokenizer's length (a distillation student takes its teacher's,
    which may be padded past the tokenizer)."""
    vocab = vocab_size or len(tokenizer)
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    if m.arch == "alignline":
        from alignline.model import AlignlineForCausalLM

        return AlignlineForCausalLM(m.alignline_config(vocab, **token_ids))
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = m.model_kwargs(vocab)
    if kwargs["intermediate_size"] is None:
        kwargs["intermediate_size"] = int(m.hidden_size * 2.75)
    return LlamaForCausalLM(LlamaConfig(**kwargs, **token_ids))


# Architecture switches passed through to AlignlineConfig unchanged.
SWITCHES = ("norm", "norm_position", "activation", "position", "num_experts", "num_experts_per_tok",
            "num_shared_experts", "router_aux_loss_coef", "router_z_loss_coef", "sliding_window", "attention",
            "infini_segment_len", "infini_update")


def split_batch(batch_size: int, world_size: int, key: str = "train.batch_size") -> int:
    """Each rank's share of a global batch; a ConfigError naming `key` when it does not split evenly."""
    if batch_size % world_size:
        raise ConfigError(f"{key}={batch_size} must split evenly over the {world_size} torchrun ranks (it is the "
                          f"global batch; each rank takes {key}/{world_size}); use a multiple of {world_size}")
    return batch_size // world_size


def check_fsdp_device(device: str, key: str = "train.parallel") -> None:
    """ConfigError unless FSDP through accelerate can run: it shards over CUDA devices only, and on CPU
    ranks it would quietly train as DDP instead."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise ConfigError(f"{key}=fsdp needs CUDA devices (accelerate's FSDP2 shards over GPUs; on CPU ranks it "
                          f"would train as plain DDP); use {key}=ddp here")


def check_trainer_ranks(train: TrainerLoopConfig, lora: LoraArgs, world_size: int) -> None:
    """ConfigError unless a Trainer stage's `train:` (and `lora:`) section runs on `world_size` torchrun
    ranks: the global batch splits evenly, and fsdp is not combined with LoRA."""
    split_batch(train.batch_size, world_size)
    if world_size > 1 and train.parallel == "fsdp" and lora.enabled:
        raise ConfigError("train.parallel=fsdp with lora.enabled=true is not supported: the frozen base is not worth "
                          "sharding for adapters, and the merge needs the whole base on one rank. Use train.parallel=ddp")
    if world_size > 1 and train.parallel == "fsdp":
        check_fsdp_device(train.device, "train.parallel")


class LoraArgs(StrictModel):
    """PEFT LoRA settings shared by SFT, PPO and the LoRA stage."""

    enabled: bool = Field(
        False, description="train LoRA adapters (base weights frozen) instead of all weights"
    )
    r: int = Field(8, gt=0, description="LoRA rank of the update matrices")
    alpha: float = Field(16.0, gt=0, description="LoRA scale numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch input, in [0, 1)")
    target_modules: list[str] | Literal["auto"] = Field(
        "auto", description="module names to adapt; auto = every attention/MLP projection of the architecture"
    )
    use_rslora: bool = Field(False, description="rank-stabilised LoRA: scale by alpha / sqrt(r) instead")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (PEFT use_dora)")


class LoggingConfig(StrictModel):
    """Where training curves go besides metrics.jsonl; TensorBoard is always written."""

    every_steps: int = Field(1, gt=0, description="log training metrics every N optimizer steps")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"], description="tensorboard | wandb | mlflow; TensorBoard is written in any case"
    )
    progress: bool = Field(True, description="show tqdm progress bars")


# --------------------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. optim.lr=3e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; write it as section.key=value")
    # Values are YAML scalars/flow collections, so `a=3`, `a=true`, `a=[1,2]` and `a=null` work.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    # YAML 1.1 reads 3e-4 as a string; numbers people type should be numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            value = str(value)  # not a number: the override is the string as typed
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` override set (creating sections)."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {part!r} is a value, not a section; cannot set {'.'.join(path)}"
                )
            node = child
        node[path[-1]] = value
    return out


def yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map dotted key paths in a YAML document to 1-based line numbers."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*prefix, str(i))] = item.start_mark.line + 1
                walk(item, (*prefix, str(i)))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass  # the real parse error is reported by read_yaml
    return lines


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def format_validation_error(
    exc: ValidationError, source: str, key_lines: dict[tuple[str, ...], int] | None = None
) -> str:
    """One line per problem: `file:line: key.path: message`."""
    out = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        line = None
        if key_lines:
            for n in range(len(loc), 0, -1):
                if loc[:n] in key_lines:
                    line = key_lines[loc[:n]]
                    break
        where = f"{source}:{line}" if line else source
        key = ".".join(loc) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against the documented fields"
        elif err["type"] == "missing":
            msg = "required key is missing"
        if err["type"] not in ("missing", "extra_forbidden"):
            msg = f"{msg} (got {err.get('input')!r})"
        out.append(f"{where}: {key}: {msg}")
    return "\n".join(out)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>", key_lines=None) -> T:
    what, hint = cls.__name__, ""
    try:
        target = cls.variant_class(data) if issubclass(cls, StrictModel) else cls
        if target is not cls:  # a union's variant: say which one the keys were checked against
            tag = data.get(cls.variant_key, cls.default_variant)
            what = f"{what} for {cls.variant_key}: {tag}"
            others = {k: t for t, sub in cls.variants.items() if t != tag for k in sub.model_fields
                      if k not in target.model_fields}
            stray = sorted({k: others[k] for k in data if k in others}.items())
            if stray:
                by_tag: dict[str, list[str]] = {}
                for k, t in stray:
                    by_tag.setdefault(t, []).append(f"`{k}`")
                hint = "\n" + "; ".join(f"{', '.join(ks)} belong(s) to {cls.variant_key}: {t}"
                                        for t, ks in by_tag.items()) + (
                    f". A config selects one {cls.variant_key} and carries only its keys: start from a "
                    f"config written for {cls.variant_key}: {tag}, or remove those keys")
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid {what} ({exc.error_count()} problem(s)):\n"
            + format_validation_error(exc, source, key_lines) + hint
        ) from None


def read_config(path: str | Path | None = None, *, params: dict[str, Any] | None = None,
                overrides: list[str] | None = None, label: str = "<defaults>",
                set_flag: str = "--set") -> tuple[dict[str, Any], str, dict[tuple[str, ...], int]]:
    """The one config reader: YAML `path` (optional), then inline `params` merged over it, then the
    dotted `overrides` last -> (data, source for messages, YAML line of each key). Every config in
    alignline comes through here: stage configs (`load_config`), the pipeline's stage entries
    (flows.tasks.resolve_stage) and the pipeline config itself (flows.pipeline.load_pipeline_config)."""
    data: dict[str, Any] = {}
    key_lines: dict[tuple[str, ...], int] = {}
    source = label
    if path is not None:
        source = str(path)
        data = read_yaml(path)  # first: it names the file when it is missing or not UTF-8
        text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else ""
        key_lines = yaml_key_lines(text)
    if params:
        data = deep_merge(data, params)
        if path is not None:
            source += " + params"
    data = apply_overrides(data, overrides)
    if overrides:
        source = f"{source} (with {set_flag} {' '.join(overrides)})"
    return data, source, key_lines


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base`, recursively for nested mappings (a copy; neither is changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read `path` (YAML; optional), apply `overrides` last, and validate into `cls`."""
    data, source, key_lines = read_config(path, overrides=overrides)
    return config_from_dict(cls, data, source, key_lines)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config as YAML (every field, defaults included)."""
    Path(path).write_text(
        yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )


def config_sha256(cfg: BaseModel | dict[str, Any]) -> str:
    """A stable hash of the resolved config (key order does not matter)."""
    data = config_to_dict(cfg) if isinstance(cfg, BaseModel) else cfg
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
