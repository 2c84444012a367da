"""The alignline decoder: a LLaMA-style transformer written as one readable file (nanoGPT spirit).

    import alignline.model                             # registers "alignline" with the Auto* classes
    from alignline.model import AlignlineConfig, AlignlineForCausalLM
    model = AlignlineForCausalLM(AlignlineConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                                                 num_hidden_layers=2, num_attention_heads=4))
    out = model(input_ids, attention_mask=mask, labels=input_ids)    # out.loss, out.logits
    model.generate(input_ids, attention_mask=mask, max_new_tokens=20)  # KV cache (DynamicCache)

Module and parameter names are transformers' LLaMA names (embed_tokens, layers.N.self_attn.q_proj,
mlp.gate_proj, input_layernorm, norm, lm_head, ...) so weights map 1:1 to `LlamaForCausalLM`
(see convert.py) and PEFT's LoRA target names work unchanged.

Shapes in comments: B batch, T new tokens, S = past + T key/value length, C hidden_size,
nh / nkv query / key-value heads, hd head_dim, V vocab_size.

Attention runs on torch's scaled_dot_product_attention. Masks are built only when needed: no padding
and no cache -> `is_causal=True` (fused kernel, no mask tensor); one new token and no padding -> no mask;
otherwise one boolean (B, 1, T, S) mask shared by all layers. Positions in a packed row (position_ids
restarting at 0, no attention_mask) get a block-diagonal mask so documents do not see each other.

Architecture switches (AlignlineConfig; defaults = the LLaMA recipe above): norm (RMSNorm, LayerNorm,
DeepNorm), norm_position (pre, post, sandwich), activation (SwiGLU, GeGLU, GELU, ReLU, Swish), position
(RoPE, ALiBi, sinusoidal, learned, T5 bias, none), a mixture of experts, a sliding window and
Infini-attention. Distance-based variants (ALiBi, T5 bias, windows, Infini segments) number tokens by the
padding mask (real tokens only) and build one additive (B, nh, T, S) mask per forward, so a cached decode
step sees exactly the distances a full recompute sees.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_utils import PreTrainedModel

from alignline.model.configuration import AlignlineConfig

# Keyword arguments that HF/TRL callers pass and that need no action here.
# cache_position: positions are derived from position_ids / the cache length. tokenizer: generate(tokenizer=...)
# (stop strings, and transformers' server) leaves it in the model kwargs of every forward (transformers 5.24).
_IGNORED_KWARGS = {"cache_position", "tokenizer"}

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, both as the forward argument
# that generate() passes and as the output field it reads back. Forwards accept either name (one at a
# time); outputs use the field the installed transformers declares, so its generate() finds the cache.
CACHE_OUTPUT_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache: Cache | None, past_key_values: Cache | None, where: str) -> Cache | None:
    """The KV cache passed under either name; both at once is a caller error."""
    if cache is not None and past_key_values is not None:
        raise ValueError(f"{where}.forward got both `cache` and `past_key_values`; pass the KV cache once.")
    if past_key_values is not None and CACHE_OUTPUT_FIELD == "cache":
        # Where the installed transformers has renamed it, the old name still works but says so, as Llama's
        # forwards do; older transformers' generate() passes `past_key_values` and gets no warning.
        warnings.warn(f"`past_key_values` is deprecated for {where}.forward; pass the KV cache as `cache`.",
                      FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


# --------------------------------------------------------------------------- building blocks


class AlignlineRMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / rms(x) * weight, statistics in fp32 like LLaMA."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # torch's rms_norm op: fewer intermediate tensors (forward and backward) than the step-by-step form.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)
        # Low precision: normalise in fp32, cast back, then scale, exactly as LLaMA does.
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.variance_epsilon)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class AlignlineLayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al. 2016): (x - mean) / std * weight + bias, statistics in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


def make_norm(config: AlignlineConfig) -> nn.Module:
    """The config's norm over hidden_size: RMSNorm, or LayerNorm (also DeepNorm's)."""
    if config.norm == "rmsnorm":
        return AlignlineRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
    return AlignlineLayerNorm(config.hidden_size, eps=config.rms_norm_eps)


def deepnorm_constants(num_layers: int) -> tuple[float, float]:
    """DeepNet (Wang et al. 2022) for a decoder-only stack of N layers: residual alpha = (2N)^(1/4),
    init gain beta = (8N)^(-1/4) on the value/output and feed-forward projections."""
    return (2 * num_layers) ** 0.25, (8 * num_layers) ** -0.25


# --------------------------------------------------------------------------- positions


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ... for the largest
    power of two n <= num_heads; the remaining heads take every other slope of the sequence for 2n."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    n = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(n)
    if n < num_heads:
        slopes += geometric(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal relative-position bucket (Raffel et al. 2020) of key_pos - query_pos (<= 0 for visible keys):
    distances below num_buckets/2 get their own bucket, larger ones share log-spaced buckets up to
    max_distance, and everything farther shares the last bucket."""
    distance = (-relative_position).clamp(min=0)  # (...,) >= 0
    exact = num_buckets // 2
    log_bucket = exact + (
        torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return torch.where(distance < exact, distance, log_bucket)


def sinusoidal_positions(position_ids: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al. (2017) absolute encodings (..., dim): channel 2i = sin(p / 10000^(2i/dim)), 2i+1 = cos."""
    inv = 10000.0 ** (-torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float32) / dim)
    angles = position_ids[..., None].float() * inv  # (..., dim/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleaved sin, cos


def rope_inv_freq(
    config: AlignlineConfig, seq_len: int | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (hd/2,) and the cos/sin scale for the config's rope type.

    default: theta^(-2i/hd). linear: positions divided by `factor` (Chen et al. 2023).
    dynamic: NTK-aware base growth once seq_len exceeds max_position_embeddings.
    yarn: per-frequency blend of interpolation and extrapolation plus an attention scale (Peng et al. 2023).
    """
    rp = config.validated_rope_parameters()  # a dict assigned after construction may lack defaults
    rope_type, base, dim = rp["rope_type"], float(rp["rope_theta"]), config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # (hd/2,)
    if rope_type == "dynamic" and seq_len is not None and seq_len > config.max_position_embeddings:
        factor, max_pos = rp["factor"], config.max_position_embeddings
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        return inv_freq / rp["factor"], 1.0
    if rope_type != "yarn":
        return inv_freq, 1.0

    factor, orig = rp["factor"], rp["original_max_position_embeddings"]
    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # channel index whose wavelength completes `rotations` turns over the original context
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1 keeps the original (high) frequency, 0 interpolates by `factor`
    pos_freqs = base**exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class AlignlineRotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al. 2021): returns (cos, sin_signed) for given position_ids.

    `sin_signed` is LLaMA's sin with its first half negated, so the rotation is
    x * cos + swap_halves(x) * sin_signed, equal to LLaMA's x * cos + rotate_half(x) * sin with one
    kernel fewer. Values come from a per-(device, dtype) table over positions (a gather instead of
    ~8 ops per call) whenever the largest position is known without a device sync (CPU, or a bound
    from the caller); otherwise they are computed from position_ids directly, as transformers does.
    Both paths produce identical numbers. Tables and inverse frequencies are plain attributes, not
    buffers: built on first use, never on the meta device, and kept in fp32 before the final cast.
    """

    def __init__(self, config: AlignlineConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.validated_rope_parameters()["rope_type"]
        self.attention_scaling = 1.0
        # Filled on first use, not here: from_pretrained builds modules under a meta-device context.
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def inv_freq(self) -> torch.Tensor:
        """(hd/2,) inverse frequencies at the trained length, as LlamaRotaryEmbedding.inv_freq (read-only)."""
        return self._inv_freq_on(next(iter(self._inv_freq_by_device), torch.device("cpu")))

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_by_device:
            inv_freq, self.attention_scaling = rope_inv_freq(self.config, device=device)
            self._inv_freq_by_device[device] = inv_freq
        return self._inv_freq_by_device[device]

    def _cos_sin(self, positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * inv_freq  # (..., hd/2), fp32
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)  # (..., hd)

    def _table(self, device: torch.device, dtype: torch.dtype, length: int):
        key = (device, dtype)
        if key not in self._tables or self._tables[key][0].shape[0] < length:
            length = max(length, self.config.max_position_embeddings)
            length = 1 << (length - 1).bit_length()  # grow in powers of two
            positions = torch.arange(length, device=device)
            self._tables[key] = self._cos_sin(positions, self._inv_freq_on(device), dtype)
        return self._tables[key]

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin_signed), each (B|1, T, hd) in x.dtype; `max_position` bounds position_ids if known."""
        if max_position is None and position_ids.device.type == "cpu":
            max_position = int(position_ids.max())  # free on CPU
        inv_freq = self._inv_freq_on(x.device)
        if self.rope_type == "dynamic":
            # NTK-aware scaling depends on the current length once it exceeds the trained context.
            seq_len = max_position + 1 if max_position is not None else int(position_ids.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq = rope_inv_freq(self.config, seq_len, device=x.device)[0]
                return self._cos_sin(position_ids, inv_freq, x.dtype)
        if max_position is None:
            return self._cos_sin(position_ids, inv_freq, x.dtype)
        cos, sin_signed = self._table(x.device, x.dtype, max_position + 1)
        return cos[position_ids], sin_signed[position_ids]


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, nh, T, hd) and k (B, nkv, T, hd) by cos/sin_signed (B, 1, T, hd)."""
    return (torch.addcmul(q * cos, swap_halves(q), sin_signed),
            torch.addcmul(k * cos, swap_halves(k), sin_signed))


_ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu, "gelu": F.gelu, "relu": F.relu, "swish": F.silu}


class AlignlineMLP(nn.Module):
    """Feed-forward: gated (SwiGLU / GeGLU, Shazeer 2020) down(act(gate(x)) * up(x)), or plain down(act(up(x)))."""

    def __init__(self, config: AlignlineConfig, intermediate_size: int | None = None):
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.act_fn = _ACTIVATIONS[config.activation]
        if config.gated_mlp:
            self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)
        self.down_proj.is_residual_projection = True  # scaled init, see _init_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))  # (B, T, I) inside
        return self.down_proj(self.act_fn(self.up_proj(x)))


class AlignlineExperts(nn.Module):
    """num_experts MLPs stored as 3D tensors in Mixtral's layout: gate_up_proj (E, 2I, C) (gated) or
    up_proj (E, I, C) (plain), and down_proj (E, C, I)."""

    def __init__(self, config: AlignlineConfig):
        super().__init__()
        E, C, width = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = E
        self.top_k = config.num_experts_per_tok
        self.act_fn = _ACTIVATIONS[config.activation]
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * width, C))
        else:
            self.up_proj = nn.Parameter(torch.empty(E, width, C))
        self.down_proj = nn.Parameter(torch.empty(E, C, width))

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """x (N, C); top_k_index / top_k_weights (N, k) -> (N, C): each token's experts, weighted and summed."""
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)  # tokens routed to expert e
            if token.numel() == 0:  # (the stacked weights still get a gradient, zero in this slice)
                continue
            h = x[token]  # (n_e, C)
            if self.gated:
                gate, up = F.linear(h, self.gate_up_proj[e]).chunk(2, dim=-1)
                h = self.act_fn(gate) * up
            else:
                h = self.act_fn(F.linear(h, self.up_proj[e]))
            h = F.linear(h, self.down_proj[e]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out


class AlignlineTopKRouter(nn.Module):
    """Softmax router; each token goes to its top-k experts, gates renormalised to sum to 1 (as Mixtral)."""

    def __init__(self, config: AlignlineConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> router logits (N, E), gates (N, k), expert indices (N, k)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        return logits, (top_value / top_value.sum(dim=-1, keepdim=True)).to(x.dtype), top_index


class AlignlineSparseMoeBlock(nn.Module):
    """Mixture of experts (Shazeer 2017; Switch / Mixtral): routed experts plus optional always-on shared ones
    (DeepSeekMoE), one MLP of num_shared_experts x intermediate_size."""

    def __init__(self, config: AlignlineConfig):
        super().__init__()
        self.gate = AlignlineTopKRouter(config)
        self.experts = AlignlineExperts(config)
        if config.num_shared_experts:
            self.shared_experts = AlignlineMLP(config, config.num_shared_experts * config.intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> (output (B, T, C), router logits (B*T, E))."""
        flat = x.reshape(-1, x.shape[-1])
        logits, gates, index = self.gate(flat)
        out = self.experts(flat, index, gates).reshape(x.shape)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x)
        return out, logits


def router_losses(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                  attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) over all layers' router logits (each (N, E)); padding excluded.

    Balance: Switch Transformer's E * sum_e f_e * P_e, with f_e the share of top-k assignments that go to
    expert e and P_e its mean router probability, pooled over layers as Mixtral does (k at uniform load).
    z-loss: ST-MoE's mean logsumexp(logits)^2, which keeps router logits small.
    """
    logits = torch.stack([layer.float() for layer in router_logits])  # (L, N, E)
    if attention_mask is not None and attention_mask.dim() == 2:
        weight = attention_mask.reshape(-1).to(logits.device, torch.float32)[None, :].expand(logits.shape[:2])
    else:
        weight = torch.ones(logits.shape[:2], device=logits.device)
    probs = torch.softmax(logits, dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(-2).float()  # (L, N, E)
    total = weight.sum()
    f = (chosen * weight[..., None]).sum((0, 1)) / total  # (E,)
    p = (probs * weight[..., None]).sum((0, 1)) / total  # (E,)
    z = (torch.logsumexp(logits, dim=-1) ** 2 * weight).sum() / total
    return num_experts * (f * p).sum(), z


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active) parameters: active counts, in each MoE layer, only the num_experts_per_tok routed
    experts a token passes through (shared experts and the router always count). Dense models: equal."""
    total = sum(p.numel() for p in model.parameters())
    idle = 0
    for module in model.modules():
        if isinstance(module, AlignlineExperts):
            per_expert = sum(p.numel() for p in module.parameters()) // module.num_experts
            idle += (module.num_experts - module.top_k) * per_expert
    return total, total - idle


def expert_load(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Share of one layer's top-k assignments that each expert received (E,), summing to 1."""
    index = torch.topk(router_logits.float(), top_k, dim=-1).indices
    counts = torch.bincount(index.reshape(-1), minlength=router_logits.shape[-1]).float()
    return counts / counts.sum()


# --------------------------------------------------------------------------- attention


@dataclass
class AttentionInputs:
    """What every layer's attention needs, computed once per forward by the model.

    cos/sin: RoPE for the queries (B|1, 1, T, hd), or None without RoPE. attn_mask/is_causal: SDPA's mask,
    boolean or additive float (B|1, 1|nh, T, S), which carries ALiBi / T5 biases, the sliding window and
    Infini-attention's segment-local window. For Infini-attention: segment ids of queries (B|1, T) and keys
    (B|1, S), which keys are real (B|1, S), and RoPE for all S keys (the cache keeps keys unrotated).
    """

    cos: torch.Tensor | None
    sin: torch.Tensor | None
    attn_mask: torch.Tensor | None
    is_causal: bool
    query_segment: torch.Tensor | None = None
    key_segment: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    key_cos: torch.Tensor | None = None
    key_sin: torch.Tensor | None = None


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x.float()) + 1.0


def infini_memory(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_segment: torch.Tensor,
                  key_segment: torch.Tensor, key_valid: torch.Tensor, update: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Infini-attention's compressive memory (Munkhdalai et al. 2024), read for every query.

    q (B, nh, T, hd); k, v (B, nh, S, hd), position-free (before RoPE); segments (B|1, T) / (B|1, S).
    A query in segment s reads the memory of segments 0..s-1 of its row:
        A_mem = sigma(q) M / (sigma(q) z),  sigma = ELU + 1,
    where, segment by segment, z += sum sigma(K_s) and
        linear: M += sigma(K_s)^T V_s
        delta:  M += sigma(K_s)^T (V_s - sigma(K_s) M / (sigma(K_s) z))   (only the new part is stored).
    Returns (A_mem (B, nh, T, hd) fp32, has_memory (B|1, 1, T, 1)): a query with nothing before its segment
    has no memory, and the layer then uses local attention alone.
    """
    B, nh, _, hd = q.shape
    sq, sk, vf = _elu1(q), _elu1(k), v.float()
    M = q.new_zeros(B, nh, hd, hd, dtype=torch.float32)
    z = q.new_zeros(B, nh, 1, hd, dtype=torch.float32)
    out = torch.zeros_like(sq)
    has = torch.zeros(query_segment.shape[0], 1, query_segment.shape[1], 1, dtype=torch.bool, device=q.device)
    for s in range(int(query_segment.max()) + 1):
        if s > 0:
            den = (sq * z).sum(-1, keepdim=True)  # (B, nh, T, 1)
            read = (query_segment == s)[:, None, :, None] & (den > 0)
            out = torch.where(read, (sq @ M) / den.clamp(min=1e-30), out)
            has = has | (query_segment == s)[:, None, :, None] & (den > 0).any(1, keepdim=True)
        mine = ((key_segment == s) & key_valid).float()[:, None, :, None]  # (B|1, 1, S, 1)
        values = vf
        if update == "delta":
            den_k = (sk * z).sum(-1, keepdim=True)
            values = vf - torch.where(den_k > 0, (sk @ M) / den_k.clamp(min=1e-30), 0.0)
        M = M + (sk * mine).transpose(-1, -2) @ (values * mine)
        z = z + (sk * mine).sum(-2, keepdim=True)
    return out, has


class AlignlineAttention(nn.Module):
    """Causal self-attention with grouped key/value heads (MHA: nkv == nh, GQA: 1 < nkv < nh, MQA: nkv == 1).

    With `attention="infini"` each head also reads a compressive memory of the earlier segments and mixes it
    with the segment-local attention through a learned per-head gate sigmoid(memory_gate).
    """

    def __init__(self, config: AlignlineConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = float(config.attention_dropout)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.o_proj.is_residual_projection = True
        self.infini_update = config.infini_update if config.attention == "infini" else None
        if self.infini_update:
            self.memory_gate = nn.Parameter(torch.zeros(self.num_heads))  # sigmoid(0) = an even mix at init

    def forward(self, x: torch.Tensor, pos: AttentionInputs, cache: Cache | None) -> torch.Tensor:
        B, T, _ = x.shape
        # Separate q/k/v matmuls (not one fused GEMM): measured no faster on CPU, and they stay LoRA-able.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if self.infini_update:
            # The memory is position-free, so the cache keeps keys unrotated and RoPE is applied per call.
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hd)
            q_raw, k_raw = q, k
            if pos.cos is not None:
                q = q * pos.cos + swap_halves(q) * pos.sin
                k = k * pos.key_cos + swap_halves(k) * pos.key_sin
        else:
            if pos.cos is not None:
                q, k = apply_rotary_pos_emb(q, k, pos.cos, pos.sin)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)  # (B, nkv, S, hd)
        mask = pos.attn_mask
        if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # SDPA wants an additive mask in the query's dtype (autocast)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=pos.is_causal,
            scale=self.scaling,
            enable_gqa=self.num_key_value_groups > 1,
        )  # (B, nh, T, hd)
        if self.infini_update:
            groups = self.num_key_value_groups
            memory, has = infini_memory(
                q_raw, k_raw.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                pos.query_segment, pos.key_segment, pos.key_valid, self.infini_update,
            )
            g = torch.sigmoid(self.memory_gate.float())[None, :, None, None]
            y = torch.where(has, g * memory + (1 - g) * y.float(), y.float()).to(y.dtype)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)


class AlignlineDecoderLayer(GradientCheckpointingLayer):
    """One block. norm_position pre (LLaMA): x + attn(norm(x)), then x + mlp(norm(x)); post (original
    Transformer; DeepNorm with alpha > 1): norm(alpha x + attn(x)), then norm(alpha x + mlp(x)); sandwich
    (Gemma 2 / CogView): x + norm(attn(norm(x))), then x + norm(mlp(norm(x))). Returns (hidden, router logits
    or None)."""

    def __init__(self, config: AlignlineConfig, layer_idx: int):
        super().__init__()
        self.norm_position = config.norm_position
        self.alpha = deepnorm_constants(config.num_hidden_layers)[0] if config.norm == "deepnorm" else 1.0
        self.self_attn = AlignlineAttention(config, layer_idx)
        self.mlp = AlignlineSparseMoeBlock(config) if config.num_experts else AlignlineMLP(config)
        # Names follow LLaMA (pre) and Gemma 2 (sandwich; post uses its post_* norms).
        if self.norm_position in ("pre", "sandwich"):
            self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)
        if self.norm_position == "sandwich":
            self.pre_feedforward_layernorm = make_norm(config)
        if config.norm == "deepnorm":
            beta = deepnorm_constants(config.num_hidden_layers)[1]
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    module.deepnorm_gain = 1.0 if name in ("self_attn.q_proj", "self_attn.k_proj") else beta
        if self.norm_position in ("post", "sandwich"):
            self.post_feedforward_layernorm = make_norm(config)

    def _mlp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.mlp(x)
        return out if isinstance(out, tuple) else (out, None)

    # hidden_states is positional so reentrant gradient checkpointing sees it (GradientCheckpointingLayer).
    def forward(self, hidden_states: torch.Tensor, pos: AttentionInputs, cache: Cache | None = None):
        x = hidden_states
        if self.norm_position == "pre":
            h = x + self.self_attn(self.input_layernorm(x), pos, cache)
            out, router = self._mlp(self.post_attention_layernorm(h))
            return h + out, router
        if self.norm_position == "post":
            h = self.post_attention_layernorm(self.alpha * x + self.self_attn(x, pos, cache))
            out, router = self._mlp(h)
            return self.post_feedforward_layernorm(self.alpha * h + out), router
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), pos, cache))
        out, router = self._mlp(self.pre_feedforward_layernorm(h))
        return h + self.post_feedforward_layernorm(out), router


# --------------------------------------------------------------------------- masks


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    batch_size: int,
    query_len: int,
    past_len: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """Return (attn_mask, is_causal) for SDPA; attn_mask is boolean (B|1, 1, T, S), True = may attend.

    `attention_mask` is the usual 2D (B, S) 1/0 padding mask over past + new tokens, or a ready 4D mask
    (boolean, or additive float) which is passed through unchanged.
    """
    kv_len = past_len + query_len
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask, False
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, {kv_len}) = "
                f"(batch, past {past_len} + new {query_len}) or a 4D mask; pass the mask over all tokens so far."
            )
        padded = not bool(attention_mask.all())
    else:
        padded = False
    packed = None
    if attention_mask is None and position_ids is not None and past_len == 0 and query_len > 1:
        # A position that does not continue its predecessor starts a new packed document.
        starts = position_ids[:, 1:] != position_ids[:, :-1] + 1  # (B|1, T-1)
        if bool(starts.any()):
            packed = F.pad(starts.long().cumsum(-1), (1, 0))  # (B|1, T) document index per token

    if not padded and packed is None:
        if query_len == kv_len:
            return None, True  # plain causal: the fused path
        if query_len == 1:
            return None, False  # one new token sees the whole cache
    q_pos = torch.arange(past_len, kv_len, device=device)
    mask = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]  # (T, S) causal
    mask = mask[None, None]  # (1, 1, T, S)
    if padded:
        mask = mask & attention_mask[:, None, None, :].to(device=device, dtype=torch.bool)  # (B, 1, T, S)
    if packed is not None:
        mask = mask & (packed[:, None, :, None] == packed[:, None, None, :])
    # A query that may see nothing (a left-pad position) would produce NaN in SDPA; let it see all keys.
    # Its output is never used by real tokens, which cannot attend to it.
    return mask | ~mask.any(dim=-1, keepdim=True), False


# --------------------------------------------------------------------------- models


class AlignlinePreTrainedModel(PreTrainedModel):
    config: AlignlineConfig
    config_class = AlignlineConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AlignlineDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 / nanoGPT init: N(0, initializer_range) everywhere, and the two projections that write into
        # the residual stream (o_proj, down_proj) scaled by 1/sqrt(2 * num_layers) so the residual's variance
        # does not grow with depth. Norm weights start at 1. DeepNorm replaces this with its own (below).
        # `transformers.initialization` skips tensors already loaded from a checkpoint.
        config = self.config
        std = config.initializer_range
        residual_std = std / math.sqrt(2 * config.num_hidden_layers)
        # DeepNet instead: Xavier-normal, gain beta on the value, output and feed-forward projections (those
        # that scale the residual update), gain 1 on queries and keys (`deepnorm_gain`, set by the layer).
        if isinstance(module, nn.Linear) and hasattr(module, "deepnorm_gain"):
            init.xavier_normal_(module.weight, gain=module.deepnorm_gain)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=residual_std if getattr(
                module, "is_residual_projection", False) else std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, AlignlineRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, AlignlineLayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, AlignlineExperts):
            up = module.gate_up_proj if module.gated else module.up_proj
            if config.norm == "deepnorm":  # the same Xavier std per (out, in) expert matrix
                beta = deepnorm_constants(config.num_hidden_layers)[1]
                for w in (up, module.down_proj):
                    init.normal_(w, mean=0.0, std=beta * math.sqrt(2.0 / (w.shape[1] + w.shape[2])))
            else:
                init.normal_(up, mean=0.0, std=std)
                init.normal_(module.down_proj, mean=0.0, std=residual_std)
        elif isinstance(module, AlignlineTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, AlignlineAttention) and module.infini_update:
            init.zeros_(module.memory_gate)


def _check_kwargs(kwargs: dict, where: str) -> None:
    unknown = set(kwargs) - _IGNORED_KWARGS
    if unknown:
        raise TypeError(
            f"{where}.forward got unsupported arguments {sorted(unknown)}; alignline models take input_ids, "
            "attention_mask, position_ids, cache (or past_key_values), inputs_embeds, use_cache, output_hidden_states, "
            "return_dict (and labels/logits_to_keep on heads). Remove them or extend the model."
        )


class AlignlineModel(AlignlinePreTrainedModel):
    """The backbone: token embeddings -> N decoder layers -> final RMSNorm. Returns hidden states (B, T, C)."""

    def __init__(self, config: AlignlineConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.position == "t5_bias":
            # One table shared by all layers, as T5 does.
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets,
                                                        config.num_attention_heads)
        self.layers = nn.ModuleList([AlignlineDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config)
        if config.position == "rope":
            self.rotary_emb = AlignlineRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _attention_inputs(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor, max_position: int | None, past_len: int) -> AttentionInputs:
        """Masks, biases and rotations shared by every layer (see AttentionInputs)."""
        config = self.config
        B, T, _ = x.shape
        attn_mask, is_causal = build_attention_mask(attention_mask, position_ids, B, T, past_len, x.device)
        rope = config.position == "rope"
        infini = config.attention == "infini"
        relative = config.position in ("alibi", "t5_bias") or config.sliding_window is not None or infini
        if not relative:
            cos = sin = None
            if rope:
                cos, sin = self.rotary_emb(x, position_ids, max_position)  # (B|1, T, hd)
                cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
            return AttentionInputs(cos, sin, attn_mask, is_causal)
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError(f"a 4D attention_mask cannot be combined with position={config.position!r}, "
                             f"sliding_window or Infini-attention; pass the 2D padding mask.")
        S = past_len + T
        # Positions that define distances and segments: counted over real tokens when there is a padding
        # mask (as generate() numbers them), the packed position_ids, or 0..S-1. Queries are the last T keys,
        # so a cached step sees exactly the distances a full recompute sees.
        if attention_mask is not None:
            key_pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).to(x.device)  # (B, S)
            key_valid = attention_mask.to(device=x.device, dtype=torch.bool)
        elif past_len == 0:
            key_pos = position_ids.expand(-1, T) if position_ids.shape[-1] == T else position_ids
            key_valid = torch.ones_like(key_pos, dtype=torch.bool)
        else:
            key_pos = torch.arange(S, device=x.device)[None]
            key_valid = torch.ones_like(key_pos, dtype=torch.bool)
        query_pos = key_pos[:, past_len:]  # (B|1, T)
        rel = query_pos[:, :, None] - key_pos[:, None, :]  # (B|1, T, S): distance back to each key
        if attn_mask is None:
            allowed = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(past_len)[None, None]
        else:
            allowed = attn_mask  # (B|1, 1, T, S), causal + padding + packing
        if config.sliding_window is not None:
            allowed = allowed & (rel < config.sliding_window)[:, None]
        segment = config.infini_segment_len
        if infini:
            allowed = allowed & ((query_pos // segment)[:, :, None] == (key_pos // segment)[:, None, :])[:, None]
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # a query with nothing to see: see all (unused)
        bias = None
        if config.position == "alibi":
            slopes = alibi_slopes(config.num_attention_heads).to(x.device)
            bias = -slopes[None, :, None, None] * rel[:, None].float()  # (B|1, nh, T, S)
        elif config.position == "t5_bias":
            bucket = relative_position_bucket(-rel, config.relative_attention_num_buckets,
                                              config.relative_attention_max_distance)
            bias = self.relative_attention_bias(bucket).permute(0, 3, 1, 2).float()  # (B|1, nh, T, S)
        mask = allowed if bias is None else bias.masked_fill(~allowed, float("-inf"))
        pos = AttentionInputs(None, None, mask, False)
        if rope:
            rope_pos = query_pos if infini else position_ids
            cos, sin = self.rotary_emb(x, rope_pos, None)
            pos.cos, pos.sin = cos[:, None], sin[:, None]
        if infini:
            pos.query_segment, pos.key_segment, pos.key_valid = query_pos // segment, key_pos // segment, key_valid
            if rope:
                key_cos, key_sin = self.rotary_emb(x, key_pos, None)
                pos.key_cos, pos.key_sin = key_cos[:, None], key_sin[:, None]
        return pos

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast | tuple:
        if output_router_logits is None:  # Mixtral's flag: the argument, else the config (MoE configs only)
            output_router_logits = getattr(self.config, "output_router_logits", False)
        # A head's option that TRL's DistillationTrainer also hands the backbone (it slices the hidden
        # states itself); LlamaModel swallows it in **kwargs, so the backbone ignores it too.
        kwargs.pop("logits_to_keep", None)
        _check_kwargs(kwargs, type(self).__name__)
        cache = _one_cache(cache, past_key_values, type(self).__name__)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if output_attentions:
            raise NotImplementedError(
                "output_attentions=True is not supported: attention runs in fused SDPA, which does not "
                "materialise the weights."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        B, T, _ = inputs_embeds.shape
        if self.gradient_checkpointing and self.training:
            if cache is not None:
                raise ValueError(
                    "A KV cache cannot be combined with gradient checkpointing in training (the recomputed "
                    "layers would update the cache twice); call model.eval() or disable checkpointing."
                )
            use_cache = False
        elif use_cache is None:
            # The cache is for inference: training forwards skip it unless given one or asked explicitly.
            use_cache = cache is not None or (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0
        max_position = None
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=inputs_embeds.device)[None]  # (1, T)
            max_position = past_len + T - 1
        position = self.config.position
        if position == "learned":
            top = max_position if max_position is not None else int(position_ids.max())
            if top >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {top} is past the learned position table (max_position_embeddings="
                    f"{self.config.max_position_embeddings}); learned positions cannot extrapolate.")
            inputs_embeds = inputs_embeds + self.embed_positions(position_ids)
        elif position == "sinusoidal":
            inputs_embeds = inputs_embeds + sinusoidal_positions(position_ids, self.config.hidden_size).to(
                inputs_embeds.dtype)
        pos = self._attention_inputs(inputs_embeds, attention_mask, position_ids, max_position, past_len)

        # A cache that was passed in is always read and extended.
        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        router_logits = []
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, router = layer(hidden_states, pos=pos, cache=cache)
            if router is not None:
                router_logits.append(router)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        out = MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            router_logits=tuple(router_logits) if router_logits and output_router_logits else None,
            **{CACHE_OUTPUT_FIELD: cache},
        )
        return out if return_dict is not False else out.to_tuple()


class _CrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy / denom with a two-pass backward.

    Same values and gradients as F.cross_entropy, but the backward turns the saved log-probabilities into
    softmax - onehot in place instead of materialising a one-hot gradient and running log_softmax's
    backward over it: about half the memory traffic over the (tokens, vocab) logits, which is a visible
    part of a small model's training step.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, denom: torch.Tensor, ignore_index: int):
        logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V) fp32
        valid = target != ignore_index  # (N,)
        safe = target.masked_fill(~valid, 0)
        picked = logp.gather(1, safe[:, None]).squeeze(1)  # (N,)
        loss = -(picked * valid).sum() / denom
        ctx.save_for_backward(logp, safe, valid, denom)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logp, safe, valid, denom = ctx.saved_tensors
        grad = logp.exp_()  # softmax, reusing the saved buffer (backward runs once)
        grad.scatter_add_(1, safe[:, None], -valid[:, None].to(grad.dtype))
        grad.mul_((valid.to(grad.dtype) * (grad_loss / denom))[:, None])  # ignored rows -> 0
        return grad.to(ctx.logits_dtype), None, None, None


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token cross-entropy in fp32; positions labelled ignore_index (-100) do not count.

    Mean over counted tokens, or, with `num_items_in_batch` (passed by HF/TRL trainers under gradient
    accumulation), the sum divided by that count, so accumulated micro-batches average over tokens.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # (B, T): token t predicts t+1
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    target = shift_labels.reshape(-1).to(flat.device)
    if num_items_in_batch is None:
        denom = (target != ignore_index).sum()  # 0 counted tokens -> nan, like F.cross_entropy
    else:
        denom = torch.as_tensor(num_items_in_batch, device=flat.device)
    return _CrossEntropy.apply(flat, target, denom.to(torch.float32), ignore_index)


def _new_token_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The padding mask of the T tokens this forward routed (a cached step routes only the new ones)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -T:]


def _router_terms(config: AlignlineConfig, router_logits: tuple[torch.Tensor, ...],
                  attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(unweighted balance loss, router_aux_loss_coef * balance + router_z_loss_coef * z) over the routed tokens."""
    T = router_logits[0].shape[0] // (attention_mask.shape[0] if attention_mask is not None else 1)
    balance, z = router_losses(router_logits, config.num_experts, config.num_experts_per_tok,
                               _new_token_mask(attention_mask, T))
    return balance, config.router_aux_loss_coef * balance + config.router_z_loss_coef * z


def moe_aux_loss(config: AlignlineConfig, router_logits: tuple[torch.Tensor, ...] | None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """router_aux_loss_coef * balance + router_z_loss_coef * z (see router_losses): what the model adds to its
    loss when given labels; None for a dense model. Training loops that compute their own loss from the
    logits add this (`outputs.aux_loss` is the unweighted balance loss, as in Mixtral)."""
    return _router_terms(config, router_logits, attention_mask)[1] if router_logits else None


class AlignlineForCausalLM(AlignlinePreTrainedModel, GenerationMixin):
    """Backbone + lm_head; `generate()` works through transformers' GenerationMixin with a DynamicCache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: AlignlineConfig):
        super().__init__(config)
        self.model = AlignlineModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values, type(self).__name__),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        # Only project the positions asked for: generate() needs the last one, GRPO the completion.
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)  # (B, T', V)
        loss = None
        if labels is not None or shift_labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels)
        aux_loss = None
        if outputs.router_logits:  # Mixtral's convention: aux_loss is the unweighted balance loss
            aux_loss, weighted = _router_terms(self.config, outputs.router_logits, attention_mask)
            if loss is not None:
                loss = loss + weighted.to(loss.device)
        out = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits,
            **{CACHE_OUTPUT_FIELD: getattr(outputs, CACHE_OUTPUT_FIELD)},
        )
        return out if return_dict is not False else out.to_tuple()


class AlignlineForSequenceClassification(AlignlinePreTrainedModel):
    """Backbone + `score` head read at the last non-pad token of each row (a reward model with num_labels=1).

    The last real token is found from `attention_mask` when given (works for left and right padding, and
    when pad == eos), otherwise from `input_ids != pad_token_id`.
    """

    def __init__(self, config: AlignlineConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = AlignlineModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def last_token_index(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                         batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
        """Index (B,) of the rightmost real token of each row."""
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask.to(device=device, dtype=torch.bool)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(device) != self.config.pad_token_id
        elif batch_size == 1:
            return torch.full((1,), seq_len - 1, device=device, dtype=torch.long)
        else:
            raise ValueError(
                "AlignlineForSequenceClassification needs attention_mask or config.pad_token_id to find the "
                "last real token of each row in a batch; pass attention_mask or set pad_token_id."
            )
        positions = torch.arange(seq_len, device=device)
        return torch.where(real, positions, -1).amax(dim=-1).clamp(min=0)  # rows with no real token -> 0

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        del output_router_logits  # accepted for HF/TRL callers (reward heads report no router loss)
        del num_items_in_batch  # classification losses are per-row means
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=_one_cache(cache, past_key_values, type(self).__name__),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, C)
        B, T, _ = hidden_states.shape
        last = self.last_token_index(input_ids, attention_mask, B, T, hidden_states.device)  # (B,)
        pooled = hidden_states[torch.arange(B, device=hidden_states.device), last]  # (B, C)
        logits = self.score(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device))
        out = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states,
            **{CACHE_OUTPUT_FIELD: getattr(outputs, CACHE_OUTPUT_FIELD)},
        )
        return out if return_dict is not False else out.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Same problem-type rules as transformers' sequence classifiers.
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        if problem == "regression":
            return F.mse_loss(logits.squeeze(-1).float(), labels.float().reshape(-1)) if self.num_labels == 1 \
                else F.mse_loss(logits.float(), labels.float())
        if problem == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


__all__ = [
    "AlignlineExperts",
    "AlignlineLayerNorm",
    "AlignlineSparseMoeBlock",
    "AlignlineTopKRouter",
    "AttentionInputs",
    "alibi_slopes",
    "deepnorm_constants",
    "expert_load",
    "infini_memory",
    "make_norm",
    "moe_aux_loss",
    "parameter_counts",
    "relative_position_bucket",
    "router_losses",
    "sinusoidal_positions",
    "AlignlineAttention",
    "AlignlineDecoderLayer",
    "AlignlineForCausalLM",
    "AlignlineForSequenceClassification",
    "AlignlineMLP",
    "AlignlineModel",
    "AlignlinePreTrainedModel",
    "AlignlineRMSNorm",
    "AlignlineRotaryEmbedding",
    "apply_rotary_pos_emb",
    "swap_halves",
    "build_attention_mask",
    "causal_lm_loss",
    "rope_inv_freq",
]
