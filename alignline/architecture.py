"""The architecture lab's switches: their choices and the rules that combine them.

Torch-free, so a stage config (`stages/pretrain.py`'s `model:` section) is checked before anything heavy
loads; `alignline.model.AlignlineConfig` runs the same checks. Each error starts with `field=value`.

    from alignline.architecture import check_switches
    check_switches(config)     # any object with the AlignlineConfig switch attributes
"""

from __future__ import annotations

from typing import Any

CHOICES = {
    "norm": ("rmsnorm", "layernorm", "deepnorm"),
    "norm_position": ("pre", "post", "sandwich"),
    "activation": ("swiglu", "geglu", "gelu", "relu", "swish"),
    "position": ("rope", "alibi", "sinusoidal", "learned", "t5_bias", "none"),
    "attention": ("standard", "infini"),
    "infini_update": ("linear", "delta"),
}


def check_switches(c: Any) -> None:
    """ValueError naming the first switch (or combination) that is invalid."""

    def bad(field: str, value: Any, why: str) -> ValueError:
        return ValueError(f"{field}={value!r} is invalid: {why}")

    for name, allowed in CHOICES.items():
        if getattr(c, name) not in allowed:
            raise bad(name, getattr(c, name), f"choose one of {list(allowed)}.")
    if c.norm == "deepnorm" and c.norm_position != "post":
        raise bad("norm_position", c.norm_position,
                  "DeepNorm is a post-norm residual (x_{l+1} = LN(alpha x + f(x))); leave norm_position unset "
                  "or set it to 'post'.")
    if c.position == "sinusoidal" and c.hidden_size % 2:
        raise bad("hidden_size", c.hidden_size, "sinusoidal positions pair sin/cos channels; use an even width.")
    for name in ("relative_attention_num_buckets", "relative_attention_max_distance", "infini_segment_len"):
        if getattr(c, name) <= 0:
            raise bad(name, getattr(c, name), "must be a positive integer.")
    if c.relative_attention_num_buckets < 2 or (
            c.relative_attention_max_distance <= c.relative_attention_num_buckets // 2):
        raise bad("relative_attention_max_distance", c.relative_attention_max_distance,
                  "must exceed relative_attention_num_buckets // 2 (the exact buckets), and num_buckets >= 2.")
    if c.num_experts < 0 or c.num_shared_experts < 0:
        raise bad("num_experts", c.num_experts, "num_experts and num_shared_experts must be >= 0.")
    if c.num_experts and not 1 <= c.num_experts_per_tok <= c.num_experts:
        raise bad("num_experts_per_tok", c.num_experts_per_tok,
                  f"must be in [1, num_experts={c.num_experts}].")
    if c.num_shared_experts and not c.num_experts:
        raise bad("num_shared_experts", c.num_shared_experts, "shared experts need num_experts > 0.")
    aux = getattr(c, "router_aux_loss_coef", None)  # MoE configs only
    if (aux is not None and aux < 0) or c.router_z_loss_coef < 0:
        raise bad("router_aux_loss_coef", aux, "router loss coefficients must be >= 0.")
    if not c.num_experts and (aux or c.router_z_loss_coef):
        # TRL reads router_aux_loss_coef to decide whether a model is an MoE to add a balance loss to.
        raise bad("router_aux_loss_coef" if aux else "router_z_loss_coef", aux or c.router_z_loss_coef,
                  "a dense model (num_experts=0) has no router; leave the router loss coefficients unset.")
    if c.position != "rope" and c.rope_parameters and \
            c.rope_parameters.get("rope_type", "default") != "default":
        raise bad("rope_parameters", c.rope_parameters,
                  f"RoPE scaling needs position='rope' (position={c.position!r}).")
    if c.sliding_window is not None and c.sliding_window < 1:
        raise bad("sliding_window", c.sliding_window, "must be None (full attention) or >= 1 token.")

