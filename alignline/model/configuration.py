"""`AlignlineConfig`: the hyper-parameters of the alignline decoder (a LLaMA-style transformer).

    from alignline.model import AlignlineConfig
    cfg = AlignlineConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg.save_pretrained("out/")          # config.json with "model_type": "alignline"

RoPE follows transformers 5: the canonical field is `rope_parameters`, a dict such as
`{"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}`. The transformers-4 spelling
(`rope_theta=...`, `rope_scaling={...}`) is accepted at construction and folded into it, so the
dict is exactly what `LlamaConfig.rope_parameters` holds and conversion is lossless.
Supported rope types: default, linear, dynamic (NTK-aware), yarn.

Architecture switches (the "architecture lab"; the defaults are the LLaMA recipe and convert 1:1 to
`LlamaForCausalLM`, see `llama_incompatibilities()`):
    norm            rmsnorm | layernorm | deepnorm (post-norm LayerNorm with DeepNet's alpha/beta)
    norm_position   pre | post | sandwich          (None: post for deepnorm, else pre)
    activation      swiglu | geglu | gelu | relu | swish   (intermediate_size None: 2.75x gated, 4x plain)
    position        rope | alibi | sinusoidal | learned | t5_bias | none
    num_experts     0 = dense MLP; > 0 = top-k routed experts (num_experts_per_tok, num_shared_experts,
                    router_aux_loss_coef (None: 0.01), router_z_loss_coef, output_router_logits (None: True)).
                    As in Mixtral, an MoE forward returns router_logits and aux_loss (the unweighted
                    balance loss) and adds the weighted router losses to `loss` when output_router_logits
                    (the forward argument, else the config's) is true. router_aux_loss_coef and
                    output_router_logits exist on MoE configs only, as on LlamaConfig vs MixtralConfig.
    sliding_window  None, or each token sees itself and the previous sliding_window - 1 tokens
    attention       standard | infini (compressive memory per layer over segments of infini_segment_len,
                    infini_update linear | delta)

Invalid combinations raise `ValueError` at construction naming the field and the fix. A
`rope_parameters` dict assigned after construction is standardised and checked when the model
reads it (`validated_rope_parameters()`), as transformers' own RoPE functions do: yarn's
`original_max_position_embeddings` defaults to `max_position_embeddings`, a legacy `type` key
becomes `rope_type`, a missing `rope_theta` gets the default.
"""


import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

# rope_type -> keys allowed in rope_parameters besides rope_type/rope_theta (None = required key)
ROPE_KEYS: dict[str, dict[str, bool]] = {
    "default": {},
    "linear": {"factor": True},
    "dynamic": {"factor": True},
    "yarn": {
        "factor": True,
        "original_max_position_embeddings": True,
        "attention_factor": False,
        "beta_fast": False,
        "beta_slow": False,
        "mscale": False,
        "mscale_all_dim": False,
        "truncate": False,
    },
}


@strict
class AlignlineConfig(PretrainedConfig):
    """LLaMA-style decoder: pre-norm RMSNorm, RoPE, SwiGLU MLP, MHA/GQA/MQA attention.

    `head_dim` defaults to hidden_size // num_attention_heads and `num_key_value_heads` to
    num_attention_heads (MHA); num_key_value_heads=1 is MQA, anything between is GQA.
    """

    model_type = "alignline"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # No remote code: the Auto classes find us through registration. TRL's GRPO/RLOO (1.16) read
    # `config.auto_map` to reload the reference of an architecture transformers does not ship, and a
    # config without the attribute raises; an empty mapping sends them to AutoModelForCausalLM.
    # (None breaks transformers' own `in config.auto_map` checks.) Not a field: never saved.
    auto_map = {}  # noqa: RUF012  (read-only by design)

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int | None = None
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    attention_dropout: float | int = 0.0
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # --- architecture switches (defaults = the LLaMA recipe)
    norm: str = "rmsnorm"
    norm_position: str | None = None
    activation: str = "swiglu"
    position: str = "rope"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    num_experts: int = 0
    num_experts_per_tok: int = 2
    num_shared_experts: int = 0
    router_z_loss_coef: float = 0.0
    # `router_aux_loss_coef` and `output_router_logits` are MoE-only attributes (set in __post_init__), absent
    # on a dense config as on LlamaConfig: TRL and transformers' tests take `hasattr(config,
    # "output_router_logits")` to mean "this model routes", and TRL writes both onto any config declaring
    # router_aux_loss_coef.
    sliding_window: int | None = None
    attention: str = "standard"
    infini_segment_len: int = 64
    infini_update: str = "linear"

    def __post_init__(self, **kwargs: Any) -> None:
        # Copy caller dicts: the base class standardizes rope dicts in place.
        if self.rope_parameters is not None:
            self.rope_parameters = dict(self.rope_parameters)
        if kwargs.get("rope_scaling") is not None:
            kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
        if kwargs.get("rope_scaling") is None and self.rope_parameters is None:
            kwargs.pop("rope_scaling", None)
            self.rope_parameters = {"rope_type": "default"}
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.norm_position is None:
            self.norm_position = "post" if self.norm == "deepnorm" else "pre"
        aux, flag = kwargs.pop("router_aux_loss_coef", None), kwargs.pop("output_router_logits", None)
        if self.num_experts or aux:  # a dense model given a coefficient is refused by _check, naming it
            self.router_aux_loss_coef = 0.01 if aux is None else aux
        if self.num_experts:
            # On by default: an MoE forward returns its router logits and, with labels, adds the router losses.
            self.output_router_logits = True if flag is None else flag
        elif flag:
            raise ValueError("AlignlineConfig.output_router_logits=True is invalid: a dense model "
                             "(num_experts=0) has no router; leave it unset.")
        if self.intermediate_size is None and isinstance(self.hidden_size, int):
            # Gated MLPs (3 matrices) at 2.75x, plain ones (2 matrices) at 4x: about the same parameters.
            self.intermediate_size = int(self.hidden_size * (2.75 if self.gated_mlp else 4))
        if self.head_dim is None:
            if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"AlignlineConfig.num_attention_heads={self.num_attention_heads} does not divide "
                    f"hidden_size={self.hidden_size} and head_dim is unset; pick num_attention_heads "
                    "dividing hidden_size or set head_dim explicitly."
                )
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        # Folds rope_theta / rope_scaling kwargs into rope_parameters and fills rope_theta.
        super().__post_init__(**kwargs)
        self._check()

    # `rope_theta` is read and written through rope_parameters so there is one source of truth.
    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", self.default_theta))

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        self.rope_parameters = {**(self.rope_parameters or {"rope_type": "default"}), "rope_theta": value}

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def gated_mlp(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def layer_types(self) -> list[str]:
        # transformers' DynamicCache builds a sliding-window cache layer (which drops old keys) for configs
        # with `sliding_window`; alignline keeps every key and windows through the attention mask, so the
        # cache layout is the same for every variant (and Infini-attention can read the whole history).
        return ["full_attention"] * self.num_hidden_layers

    def llama_incompatibilities(self) -> list[str]:
        """`field=value` for each switch LlamaForCausalLM cannot express (empty for the LLaMA recipe)."""
        defaults = {"norm": "rmsnorm", "norm_position": "pre", "activation": "swiglu", "position": "rope",
                    "num_experts": 0, "sliding_window": None, "attention": "standard"}
        return [f"{k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v]

    def validated_rope_parameters(self) -> dict:
        """`rope_parameters` standardised like LlamaConfig's and checked, for the model to read.

        Construction does this already; calling it at use time covers a dict assigned afterwards
        (e.g. `config.rope_parameters = {"rope_type": "yarn", "factor": 4.0}`), which transformers'
        RoPE functions also standardise before reading. Keys the rope type does not use are refused at
        construction but only logged here: transformers' tools update the dict in place and leave keys of
        an earlier type behind, which Llama also reads past with a warning.
        """
        self.standardize_rope_params()  # transformers' own filling of missing keys, in place
        self._check_rope(unused_keys="warn")
        return self.rope_parameters

    def _check(self) -> None:
        def bad(field: str, value: Any, why: str) -> ValueError:
            return ValueError(f"AlignlineConfig.{field}={value!r} is invalid: {why}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if value <= 0:
                raise bad(name, value, "must be a positive integer.")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise bad("num_key_value_heads", self.num_key_value_heads,
                      f"must divide num_attention_heads={self.num_attention_heads} "
                      "(use num_attention_heads for MHA, 1 for MQA, a divisor for GQA).")
        if self.head_dim % 2 != 0 and self.position == "rope":
            raise bad("head_dim", self.head_dim, "RoPE rotates pairs of channels, so head_dim must be even.")
        self._check_switches()
        if not self.rms_norm_eps > 0:
            raise bad("rms_norm_eps", self.rms_norm_eps, "must be > 0.")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise bad("attention_dropout", self.attention_dropout, "must be in [0, 1).")
        if not self.initializer_range > 0:
            raise bad("initializer_range", self.initializer_range, "must be > 0.")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise bad(name, value, f"must be None or in [0, vocab_size={self.vocab_size}).")
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for value in eos:
            if value is not None and not 0 <= value < self.vocab_size:
                raise bad("eos_token_id", self.eos_token_id, f"ids must be in [0, vocab_size={self.vocab_size}).")
        self._check_rope()

    def _check_switches(self) -> None:
        from alignline.architecture import check_switches

        try:
            check_switches(self)
        except ValueError as exc:  # name the field as this class's
            raise ValueError(f"AlignlineConfig.{exc}") from None

    def _check_rope(self, unused_keys: str = "raise") -> None:
        rp = self.rope_parameters
        if not isinstance(rp, dict):
            raise ValueError(f"AlignlineConfig.rope_parameters must be a dict, got {type(rp).__name__}.")
        legacy = rp.pop("type", None)  # transformers-4 spelling of rope_type
        rope_type = rp.setdefault("rope_type", legacy or "default")
        if rope_type not in ROPE_KEYS:
            raise ValueError(
                f"AlignlineConfig.rope_parameters['rope_type']={rope_type!r} is not supported; "
                f"use one of {sorted(ROPE_KEYS)}."
            )
        allowed = ROPE_KEYS[rope_type]
        # transformers' tools may write the partial-rotary fraction explicitly; 1.0 (the whole head) is
        # what this model does, anything else is refused rather than silently ignored.
        if rp.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"AlignlineConfig.rope_parameters['partial_rotary_factor']={rp['partial_rotary_factor']!r} is "
                "not supported: alignline rotates the whole head (1.0)."
            )
        for key in rp:
            if key not in allowed and key not in ("rope_type", "rope_theta", "partial_rotary_factor"):
                message = (f"AlignlineConfig.rope_parameters[{key!r}] is not used by rope_type={rope_type!r}; "
                           f"allowed keys: {sorted(['rope_type', 'rope_theta', *allowed])}.")
                if unused_keys == "raise":
                    raise ValueError(message)
                logger.warning_once(message + " It is ignored.")
        for key, required in allowed.items():
            if required and rp.get(key) is None:
                raise ValueError(
                    f"AlignlineConfig.rope_parameters[{key!r}] is required for rope_type={rope_type!r}."
                )
        theta = rp.get("rope_theta")
        if not isinstance(theta, (int, float)) or not theta > 0 or not math.isfinite(theta):
            raise ValueError(f"AlignlineConfig.rope_parameters['rope_theta']={theta!r} must be a positive number.")
        if "factor" in rp and (not isinstance(rp["factor"], (int, float)) or rp["factor"] < 1.0):
            raise ValueError(
                f"AlignlineConfig.rope_parameters['factor']={rp['factor']!r} must be a number >= 1 "
                "(the context-length multiplier)."
            )


__all__ = ["AlignlineConfig", "ROPE_KEYS"]
