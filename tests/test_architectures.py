"""The architecture lab's switches (norm, activation, position, MoE, sliding window, Infini-attention),
each against a closed form or its paper's definition, and every variant through save/load, the KV cache
and a few training steps.

    .venv/bin/pytest tests/test_architectures.py -q
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import alignline.model  # noqa: F401 - registers model_type "alignline"
from alignline.model import AlignlineConfig, AlignlineForCausalLM
from alignline.model.modeling import (
    CACHE_OUTPUT_FIELD,
    alibi_slopes,
    deepnorm_constants,
    infini_memory,
    relative_position_bucket,
    router_losses,
    sinusoidal_positions,
)

VOCAB = 101
BASE = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
# Every switch at a non-default value, alone and in the combinations the ablation runs.
VARIANTS = {
    "layernorm-gelu": dict(norm="layernorm", activation="gelu"),
    "post-norm": dict(norm_position="post"),
    "sandwich": dict(norm_position="sandwich"),
    "deepnorm": dict(norm="deepnorm"),
    "geglu": dict(activation="geglu"),
    "relu": dict(activation="relu"),
    "swish": dict(activation="swish"),
    "alibi": dict(position="alibi"),
    "sinusoidal": dict(position="sinusoidal"),
    "learned": dict(position="learned"),
    "t5-bias": dict(position="t5_bias", relative_attention_num_buckets=8, relative_attention_max_distance=12),
    "nope": dict(position="none"),
    "moe": dict(num_experts=4, num_experts_per_tok=2),
    "moe-shared-z": dict(num_experts=3, num_experts_per_tok=1, num_shared_experts=1, router_z_loss_coef=1e-3,
                         activation="gelu"),
    "sliding-window": dict(sliding_window=5),
    "infini-linear": dict(attention="infini", infini_segment_len=6),
    "infini-delta-alibi": dict(attention="infini", infini_segment_len=5, infini_update="delta", position="alibi"),
}


def model_of(**overrides) -> AlignlineForCausalLM:
    torch.manual_seed(0)
    model = AlignlineForCausalLM(AlignlineConfig(**{**BASE, **overrides}))
    with torch.no_grad():  # a visible memory/attention mix: the gate away from its init value
        for name, p in model.named_parameters():
            if name.endswith("memory_gate"):
                p.copy_(torch.linspace(-1.0, 1.5, p.numel()))
    return model.eval()


def _ids(batch=3, length=22, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _left_padded(ids, pads=(0, 3, 7)):
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


# --------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_cache_equals_recompute_with_left_padding(variant):
    model = model_of(**VARIANTS[variant])
    ids, mask = _left_padded(_ids())
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        out = model(ids[:, :7], attention_mask=mask[:, :7], position_ids=pos[:, :7], use_cache=True)
        cache, pieces = getattr(out, CACHE_OUTPUT_FIELD), [out.logits]
        out = model(ids[:, 7:12], attention_mask=mask[:, :12], position_ids=pos[:, 7:12], cache=cache)
        pieces.append(out.logits)
        for t in range(12, ids.shape[1]):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1], cache=cache)
            pieces.append(out.logits)
    incremental = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert torch.allclose(incremental[real], full[real], atol=2e-5, rtol=0), (incremental - full)[real].abs().max()
    # Left padding does not change a row's logits (positions count real tokens).
    with torch.no_grad():
        alone = model(ids[2:, 7:]).logits
    assert torch.allclose(full[2, 7:], alone[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_saves_loads_generates_and_trains(variant, tmp_path):
    model = model_of(**VARIANTS[variant])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AlignlineForCausalLM
    saved = {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"}
    assert saved == {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    ids, mask = _left_padded(_ids(length=12))
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)
    cached = loaded.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    fresh = loaded.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                            use_cache=False)
    assert torch.equal(cached, fresh)
    # training: every parameter gets a gradient and the loss on a fixed batch falls
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _ids(4, 16, seed=3)
    losses = []
    for step in range(12):
        loss = model(batch, labels=batch).loss
        loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, missing
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_default_config_is_unchanged_llama():
    cfg = AlignlineConfig(vocab_size=VOCAB, hidden_size=512)
    assert cfg.intermediate_size == 1408 and cfg.llama_incompatibilities() == []
    assert AlignlineConfig(vocab_size=VOCAB, hidden_size=64, activation="gelu").intermediate_size == 256  # 4x plain
    assert AlignlineConfig(vocab_size=VOCAB, hidden_size=64, activation="geglu").intermediate_size == 176
    cfg = AlignlineConfig(**{**BASE, "position": "alibi", "num_experts": 2})
    assert cfg.llama_incompatibilities() == ["position='alibi'", "num_experts=2"]


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(norm="batchnorm"), "norm"),
    (dict(norm="deepnorm", norm_position="pre"), "norm_position"),
    (dict(activation="tanh"), "activation"),
    (dict(position="rotary"), "position"),
    (dict(num_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
    (dict(num_shared_experts=1), "num_shared_experts"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(router_aux_loss_coef=0.01), "router_aux_loss_coef"),  # a dense model has no router
    (dict(output_router_logits=True), "output_router_logits"),
    (dict(attention="linear"), "attention"),
    (dict(attention="infini", infini_update="hebbian"), "infini_update"),
    (dict(position="alibi", rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_parameters"),
    (dict(relative_attention_num_buckets=32, relative_attention_max_distance=16), "relative_attention_max_distance"),
])
def test_bad_switch_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"AlignlineConfig\.{field}="):
        AlignlineConfig(**{**BASE, **overrides})


# --------------------------------------------------------------------------- norms


def test_deepnorm_constants_and_init():
    n = 6
    alpha, beta = deepnorm_constants(n)
    assert alpha == pytest.approx(12 ** 0.25) and beta == pytest.approx(48 ** -0.25)  # (2N)^1/4, (8N)^-1/4
    torch.manual_seed(0)
    cfg = AlignlineConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=n,
                          num_attention_heads=4, norm="deepnorm")
    model = AlignlineForCausalLM(cfg)
    layer = model.model.layers[0]
    assert layer.alpha == pytest.approx(alpha) and not hasattr(layer, "input_layernorm")

    def xavier(w):
        return math.sqrt(2.0 / (w.shape[0] + w.shape[1]))

    for name, gain in (("self_attn.q_proj", 1.0), ("self_attn.k_proj", 1.0), ("self_attn.v_proj", beta),
                       ("self_attn.o_proj", beta), ("mlp.up_proj", beta), ("mlp.down_proj", beta)):
        w = layer.get_submodule(name).weight
        assert w.std().item() == pytest.approx(gain * xavier(w), rel=0.05), name


@pytest.mark.parametrize("variant", ["post", "sandwich", "deepnorm"])
def test_norm_positions_follow_their_definition(variant):
    overrides = {"post": dict(norm_position="post"), "sandwich": dict(norm_position="sandwich"),
                 "deepnorm": dict(norm="deepnorm")}[variant]
    model = model_of(**overrides)
    layer = model.model.layers[0]
    x = torch.randn(2, 9, BASE["hidden_size"])
    pos = model.model._attention_inputs(x, None, torch.arange(9)[None], 8, 0)
    attn = lambda h: layer.self_attn(h, pos, None)  # noqa: E731
    with torch.no_grad():
        got, _ = layer(x, pos=pos)
        if variant == "sandwich":
            h = x + layer.post_attention_layernorm(attn(layer.input_layernorm(x)))
            want = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
        else:
            a = deepnorm_constants(BASE["num_hidden_layers"])[0] if variant == "deepnorm" else 1.0
            ln = torch.nn.functional.layer_norm if variant == "deepnorm" else None
            h = layer.post_attention_layernorm(a * x + attn(x))
            want = layer.post_feedforward_layernorm(a * h + layer.mlp(h))
            if ln is not None:  # DeepNorm's norm is LayerNorm (mean removed)
                assert isinstance(layer.post_attention_layernorm, torch.nn.LayerNorm)
    assert torch.allclose(got, want, atol=1e-6)


def test_activations_follow_their_definition():
    x = torch.randn(5, BASE["hidden_size"])
    for act, fn, gated in (("swiglu", F.silu, True), ("geglu", F.gelu, True), ("gelu", F.gelu, False),
                           ("relu", F.relu, False), ("swish", F.silu, False)):
        mlp = model_of(activation=act).model.layers[0].mlp
        with torch.no_grad():
            if gated:
                want = mlp.down_proj(fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T))
            else:
                assert not hasattr(mlp, "gate_proj")
                want = mlp.down_proj(fn(x @ mlp.up_proj.weight.T))
            assert torch.allclose(mlp(x), want, atol=1e-6), act


# --------------------------------------------------------------------------- positions


def test_alibi_slopes_match_the_paper_and_bloom():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0 ** -(2 * (i + 1)) for i in range(4)]))
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for heads in (5, 6, 12, 16):  # non-powers of two interleave the 2n sequence
        bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)  # (heads, 1, 2): slope * position
        assert torch.allclose(alibi_slopes(heads), bloom[:, 0, 1]), heads


def test_alibi_bias_is_minus_slope_times_distance():
    model = model_of(position="alibi")
    x = torch.zeros(1, 7, BASE["hidden_size"])
    mask = model.model._attention_inputs(x, None, torch.arange(7)[None], 6, 0).attn_mask  # (1, nh, 7, 7)
    slopes = alibi_slopes(BASE["num_attention_heads"])
    for h in range(BASE["num_attention_heads"]):
        for t in range(7):
            for s in range(7):
                want = -slopes[h] * (t - s) if s <= t else float("-inf")
                assert mask[0, h, t, s].item() == pytest.approx(want), (h, t, s)


def test_t5_buckets_match_t5():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = -torch.arange(0, 600)[None]  # key - query <= 0 for a causal decoder
    for buckets, distance in ((32, 128), (8, 12), (16, 50)):
        ours = relative_position_bucket(rel, buckets, distance)
        ref = T5Attention._relative_position_bucket(rel, bidirectional=False, num_buckets=buckets,
                                                    max_distance=distance)
        assert torch.equal(ours, ref), (buckets, distance)
    # closed form at the edges: exact below num_buckets/2, the last bucket from max_distance on
    b = relative_position_bucket(-torch.tensor([0, 15, 16, 127, 128, 10_000]), 32, 128)
    assert b.tolist()[:2] == [0, 15] and b[2] == 16 and b[3] == 31 and b[4] == 31 and b[5] == 31


def test_t5_bias_reads_the_shared_table_by_distance_bucket():
    model = model_of(position="t5_bias", relative_attention_num_buckets=8, relative_attention_max_distance=12)
    x = torch.zeros(1, 20, BASE["hidden_size"])
    mask = model.model._attention_inputs(x, None, torch.arange(20)[None], 19, 0).attn_mask  # (1, nh, 20, 20)
    table = model.model.relative_attention_bias.weight  # (buckets, nh), one for all layers
    buckets = {0: 0, 1: 1, 3: 3, 4: 4, 6: 5, 8: 6, 11: 7, 19: 7}  # T5's causal buckets for 8 / 12, by distance
    for distance, bucket in buckets.items():
        t = 19
        assert torch.equal(mask[0, :, t, t - distance], table[bucket]), distance
    assert torch.isinf(mask[0, 0, 3, 4])  # the future stays masked


def test_sinusoidal_table_values():
    pe = sinusoidal_positions(torch.arange(50), 16)
    for p in (0, 1, 7, 49):
        for i in range(8):
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 16)), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 16)), abs=1e-6)


def test_learned_positions_refuse_past_their_table():
    model = model_of(position="learned")
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.ones(1, 65, dtype=torch.long))
    # learned and sinusoidal models depend on absolute position, NoPE only through causality
    shifted = torch.arange(3, 13)[None]
    for position, depends in (("learned", True), ("sinusoidal", True), ("none", False)):
        m, ids = model_of(position=position), _ids(1, 10)
        with torch.no_grad():
            a, b = m(ids).logits, m(ids, position_ids=shifted).logits
        assert torch.allclose(a, b, atol=1e-6) != depends, position


def test_sliding_window_mask_and_equivalence():
    model = model_of(sliding_window=3)
    x = torch.zeros(1, 8, BASE["hidden_size"])
    mask = model.model._attention_inputs(x, None, torch.arange(8)[None], 7, 0).attn_mask[0, 0]
    want = torch.tensor([[0 <= t - s < 3 for s in range(8)] for t in range(8)])
    assert torch.equal(mask, want)
    # a window as long as the input is plain causal attention (same weights)
    wide, plain = model_of(sliding_window=22), model_of()
    plain.load_state_dict(wide.state_dict())
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(wide(ids).logits, plain(ids).logits, atol=1e-5)
        assert not torch.allclose(model(ids).logits, plain(ids).logits, atol=1e-3)


# --------------------------------------------------------------------------- mixture of experts


def test_moe_routing_invariants_and_dense_reference():
    model = model_of(num_experts=4, num_experts_per_tok=2)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 9, BASE["hidden_size"])
    flat = x.reshape(-1, x.shape[-1])
    logits, gates, index = block.gate(flat)
    assert index.shape == (18, 2) and (index[:, 0] != index[:, 1]).all()  # k distinct experts per token
    assert torch.allclose(gates.sum(-1), torch.ones(18))  # gates renormalised over the chosen k
    probs = torch.softmax(logits, -1)
    assert torch.allclose(gates, probs.gather(1, index) / probs.gather(1, index).sum(-1, keepdim=True))
    # each token = the gate-weighted sum of its k experts' SwiGLU MLPs, computed one token at a time
    with torch.no_grad():
        out, _ = block(x)
        e = block.experts
        want = torch.zeros_like(flat)
        for n in range(18):
            for slot in range(2):
                i = index[n, slot]
                g, u = (e.gate_up_proj[i] @ flat[n]).chunk(2)
                want[n] += gates[n, slot] * (e.down_proj[i] @ (F.silu(g) * u))
    assert torch.allclose(out.reshape(-1, out.shape[-1]), want, atol=1e-5)
    # An expert no token chose still has a (zero) gradient: its weights are slices of one stacked tensor, so
    # DDP and FSDP see every parameter used on every rank.
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[:2] = 10.0  # every token prefers experts 0 and 1
    block(torch.ones(1, 5, BASE["hidden_size"]))[0].sum().backward()
    grads = block.experts.down_proj.grad
    assert grads[:2].abs().sum() > 0 and torch.equal(grads[2:], torch.zeros_like(grads[2:]))


def test_router_losses_match_mixtral_and_are_minimal_at_uniform_load():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layers = tuple(torch.randn(40, 6) for _ in range(3))
    mask = torch.ones(4, 10)
    mask[0, :3] = 0
    for attention_mask in (None, mask):
        balance, _ = router_losses(layers, 6, 2, attention_mask)
        ref = load_balancing_loss_func(layers, 6, 2, attention_mask)
        assert balance.item() == pytest.approx(ref.item(), rel=1e-5)
    # uniform load (each expert gets the same share, equal probabilities over the chosen) -> k; skewed -> more
    uniform = torch.eye(4).repeat(8, 1) * 5.0  # token n prefers expert n % 4
    skewed = torch.zeros(32, 4)
    skewed[:, 0] = 5.0
    assert router_losses((uniform,), 4, 1)[0].item() == pytest.approx(1.0, rel=1e-6)
    assert router_losses((skewed,), 4, 1)[0].item() > 2.0
    # z-loss: mean squared logsumexp of the router logits
    _, z = router_losses(layers, 6, 2)
    assert z.item() == pytest.approx((torch.logsumexp(torch.cat(layers), -1) ** 2).mean().item(), rel=1e-6)


def test_moe_loss_adds_the_weighted_router_losses():
    from alignline.model.modeling import moe_aux_loss

    model = model_of(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    ids = _ids()
    out = model(ids, labels=ids, output_router_logits=True)  # the flag TRL passes is accepted
    balance, z = router_losses(out.router_logits, 4, 2)
    assert len(out.router_logits) == BASE["num_hidden_layers"]
    assert out.aux_loss.item() == pytest.approx(balance.item(), rel=1e-6)  # Mixtral's convention: unweighted
    weighted = moe_aux_loss(model.config, out.router_logits)
    assert weighted.item() == pytest.approx((0.5 * balance + 0.1 * z).item(), rel=1e-6)
    plain = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(plain.item() + weighted.item(), rel=1e-5)
    assert model_of(num_experts=2).config.router_aux_loss_coef == 0.01


def test_output_router_logits_follows_the_argument_then_the_config():
    """Mixtral's protocol, which TRL and transformers' tests rely on: the forward argument wins, else the
    config's flag; off means no router logits, no aux_loss and a plain cross-entropy loss."""
    model = model_of(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    ids = _ids()
    assert model.config.output_router_logits is True  # MoE default: the router losses train unless turned off
    with torch.no_grad():
        on = model(ids, labels=ids)
        off = model(ids, labels=ids, output_router_logits=False)
        model.config.output_router_logits = False
        from_config = model(ids, labels=ids)
        explicit = model(ids, labels=ids, output_router_logits=True)
    assert on.router_logits and on.aux_loss is not None and explicit.router_logits
    for out in (off, from_config):
        assert out.router_logits is None and out.aux_loss is None
        plain = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        assert out.loss.item() == pytest.approx(plain.item(), rel=1e-5)
    assert on.loss.item() > off.loss.item()
    assert explicit.loss.item() == pytest.approx(on.loss.item(), rel=1e-6)


def test_a_dense_config_has_no_router_attributes_like_llama():
    """TRL (and transformers' MoE tests) treat a config with `output_router_logits` as an MoE: TRL then asks
    for router logits and adds `coef * aux_loss`, which a dense model cannot give. Checkpoints saved before
    this rule (router_aux_loss_coef 0.0, output_router_logits false in config.json) still load."""
    dense = AlignlineConfig(**BASE)
    assert not hasattr(dense, "output_router_logits") and not hasattr(dense, "router_aux_loss_coef")
    assert "output_router_logits" not in dense.to_dict()
    old = AlignlineConfig(**BASE, router_aux_loss_coef=0.0, output_router_logits=False)
    assert not hasattr(old, "output_router_logits") and not hasattr(old, "router_aux_loss_coef")
    moe = AlignlineConfig.from_dict(AlignlineConfig(**BASE, num_experts=2, output_router_logits=False,
                                                    router_aux_loss_coef=0.2).to_dict())
    assert (moe.output_router_logits, moe.router_aux_loss_coef) == (False, 0.2)


# --------------------------------------------------------------------------- Infini-attention


def _elu1(x):
    return F.elu(x) + 1


def _infini_reference(q, k, v, seg_len, update, gate, scale):
    """The paper's algorithm for one row and one head, segment by segment with explicit loops.
    q, k, v: (N, d) position-free. Returns (N, d)."""
    N, d = q.shape
    M, z = torch.zeros(d, d), torch.zeros(d)
    out = torch.zeros(N, d)
    for start in range(0, N, seg_len):
        Q, K, V = q[start:start + seg_len], k[start:start + seg_len], v[start:start + seg_len]
        n = Q.shape[0]
        scores = (Q @ K.T) * scale + torch.triu(torch.full((n, n), float("-inf")), 1)
        local = torch.softmax(scores, -1) @ V
        if start == 0:
            out[start:start + n] = local
        else:
            memory = torch.stack([(_elu1(Q[i]) @ M) / (_elu1(Q[i]) @ z) for i in range(n)])
            out[start:start + n] = gate * memory + (1 - gate) * local
        sK = _elu1(K)
        if update == "delta" and start > 0:
            V = V - torch.stack([(sK[i] @ M) / (sK[i] @ z) for i in range(n)])
        for i in range(n):
            M = M + torch.outer(sK[i], V[i])
        z = z + sK.sum(0)
    return out


@pytest.mark.parametrize("update", ["linear", "delta"])
def test_infini_attention_matches_a_step_by_step_reference(update):
    cfg = dict(BASE, num_attention_heads=2, num_key_value_heads=2, hidden_size=16, num_hidden_layers=1,
               position="none", attention="infini", infini_segment_len=4, infini_update=update)
    model = model_of(**cfg)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 11, 16)  # 3 segments, the last one partial
    pos = model.model._attention_inputs(x, None, torch.arange(11)[None], 10, 0)
    with torch.no_grad():
        got = attn(x, pos, None)
        q = attn.q_proj(x).view(11, 2, 8).transpose(0, 1)
        k = attn.k_proj(x).view(11, 2, 8).transpose(0, 1)
        v = attn.v_proj(x).view(11, 2, 8).transpose(0, 1)
        gates = torch.sigmoid(attn.memory_gate)
        heads = [_infini_reference(q[h], k[h], v[h], 4, update, gates[h], 8 ** -0.5) for h in range(2)]
        want = attn.o_proj(torch.stack(heads, 1).reshape(1, 11, 16))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the memory on its own, for the first query of the third segment
    mem, has = infini_memory(q[None], k[None], v[None], (torch.arange(11) // 4)[None], (torch.arange(11) // 4)[None],
                             torch.ones(1, 11, dtype=torch.bool), update)
    assert has[0, 0, :4].sum() == 0 and has[0, 0, 4:].all()


def test_infini_rope_numbers_queries_like_keys_without_position_ids():
    """Left-padded rows without position_ids: queries and (unrotated, cached) keys are rotated by the same
    real-token positions, so the row's logits match the unpadded row."""
    model = model_of(attention="infini", infini_segment_len=6)
    ids, mask = _left_padded(_ids(length=20))
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[2:, 7:]).logits
    assert torch.allclose(padded[2, 7:], alone[0], atol=2e-5)


def test_infini_attention_is_plain_attention_within_one_segment():
    infini = model_of(attention="infini", infini_segment_len=32)
    plain = model_of()
    missing = plain.load_state_dict(infini.state_dict(), strict=False)
    assert all(k.endswith("memory_gate") for k in missing.unexpected_keys) and not missing.missing_keys
    ids = _ids()  # 22 tokens: one segment, empty memory
    with torch.no_grad():
        assert torch.allclose(infini(ids).logits, plain(ids).logits, atol=1e-5)
        longer = _ids(length=40)  # a second segment reads the memory, so the outputs part
        assert not torch.allclose(infini(longer).logits[:, 32:], plain(longer).logits[:, 32:], atol=1e-3)
        assert torch.allclose(infini(longer).logits[:, :32], plain(longer).logits[:, :32], atol=1e-5)


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(("to", "overrides"), [
    ("mixtral", dict(num_experts=4, num_experts_per_tok=2)),
    ("mistral", dict(sliding_window=5)),
])
def test_variants_with_an_exact_counterpart_convert_and_match(to, overrides, tmp_path):
    from alignline.model.convert import convert_checkpoint

    model = model_of(**overrides)
    model.save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "out", to=to)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.model_type == to
    ids, mask = _left_padded(_ids(length=20))
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-5), (ours - ref)[real].abs().max()
    ours_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_tokens, hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                                pad_token_id=0))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("moe", "sliding-window")])
def test_other_variants_refuse_conversion_naming_the_field(variant, tmp_path):
    from alignline.model.convert import ConversionError, convert_checkpoint

    model_of(**VARIANTS[variant]).save_pretrained(tmp_path / "src")
    field = {"deepnorm": "norm=", "post-norm": "norm_position=", "sandwich": "norm_position=",
             "moe-shared-z": "activation=", "infini-linear": "attention=", "infini-delta-alibi": "attention="}
    needle = field.get(variant) or next(f"{k}=" for k in VARIANTS[variant] if k != "num_experts_per_tok")
    for to in ("llama", "mixtral", "mistral"):
        with pytest.raises(ConversionError, match=needle):
            convert_checkpoint(tmp_path / "src", tmp_path / to, to=to)
        assert not (tmp_path / to).exists()
    with pytest.raises(ConversionError, match=r"num_experts=4.*num_experts converts with --to mixtral"):
        from alignline.model.convert import to_llama

        to_llama(model_of(num_experts=4))
    with pytest.raises(ConversionError, match=r"num_shared_experts=1 \(Mixtral has no shared experts\)"):
        to_llama(model_of(num_experts=2, num_shared_experts=1), "mixtral")


# --------------------------------------------------------------------------- PPO


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["alibi-moe-layernorm", "infini-t5-sandwich-window", "learned-relu-post"])
def test_ppo_raises_reward_on_variant_models(arch, one_thread):
    """Our PPO trainer on an alignline variant policy, critic and reward model: the mean RM score rises."""
    import copy

    from alignline.model import AlignlineForSequenceClassification
    from alignline.rl.ppo import KLArgs, PPOTrainer
    from tests.test_ppo_trainer import BOS, EOS, PAD, args, prompts

    overrides = {"alibi-moe-layernorm": dict(position="alibi", num_experts=4, norm="layernorm"),
                 "infini-t5-sandwich-window": dict(attention="infini", infini_segment_len=4, position="t5_bias",
                                                   norm_position="sandwich", sliding_window=6),
                 "learned-relu-post": dict(position="learned", activation="relu", norm_position="post")}[arch]
    cfg = dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS,
               bos_token_id=BOS, **overrides)
    torch.manual_seed(4)
    policy = AlignlineForCausalLM(AlignlineConfig(**cfg))
    rm = AlignlineForSequenceClassification(AlignlineConfig(**cfg, num_labels=1))
    t = PPOTrainer(args(kl=KLArgs(beta=0.0), optim={"lr": 2e-2, "weight_decay": 0.0}), policy,
                   copy.deepcopy(rm), rm, ref_policy=copy.deepcopy(policy), eos_id=EOS, pad_id=PAD)
    torch.manual_seed(4)
    ps = prompts(16, seed=4)
    scores = [t.step(ps)["score"] for _ in range(6)]
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.3, scores


def test_cli_convert_names_the_switch_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from alignline_cli.main import app

    model_of(position="alibi").save_pretrained(tmp_path / "alibi")
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "alibi"), "--to", "llama", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "position='alibi'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()
    model_of(num_experts=2).save_pretrained(tmp_path / "moe")
    res = CliRunner().invoke(app, ["convert", str(tmp_path / "moe"), "--to", "mixtral", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config.num_local_experts == 2

