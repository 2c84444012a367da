"""Behaviour of the alignline decoder against references: HF Llama logits and tokens, causality,
KV-cache == full recompute, save/load bit-identity, gradient checkpointing, config errors.

    .venv/bin/pytest tests/test_model.py -q
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes
from alignline.model import AlignlineConfig, AlignlineForCausalLM, AlignlineForSequenceClassification
from alignline.model.convert import to_llama
from alignline.model.modeling import CACHE_OUTPUT_FIELD
from alignline.model.tiny import tiny_config, tiny_model

VOCAB = 128
GENERATE_TESTS = pytest.mark.usefixtures("cache_convention")  # generate() under both KV-cache names

PARITY_CASES = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-untied": dict(num_attention_heads=4, num_key_value_heads=1),
    "linear-rope": dict(num_key_value_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "yarn-rope": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                       "rope_theta": 500.0}),
    "dynamic-rope-long": dict(max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
    "head-dim-explicit": dict(hidden_size=64, num_attention_heads=2, head_dim=16, num_key_value_heads=1),
}


def _ids(batch=3, length=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _left_padded(ids, pads=(0, 5, 9), pad_id=0):
    ids, mask = ids.clone(), torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_llama_after_conversion(case):
    model = tiny_model(**PARITY_CASES[case]).eval()
    llama = to_llama(model).eval()
    ids = _ids()
    with torch.no_grad():
        ours, ref = model(ids).logits, llama(ids).logits
        assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
        padded, mask = _left_padded(ids)
        ours, ref = model(padded, attention_mask=mask).logits, llama(padded, attention_mask=mask).logits
    real = mask.bool()
    assert torch.allclose(ours[real], ref[real], atol=1e-5, rtol=0), (ours[real] - ref[real]).abs().max()
    assert torch.isfinite(ours).all()  # fully masked (pad) query rows must not produce NaN


@GENERATE_TESTS
@pytest.mark.parametrize("case", ["mha-untied", "gqa-tied", "linear-rope"])
def test_greedy_generate_matches_llama_with_left_padding(case):
    model = tiny_model(**PARITY_CASES[case]).eval()
    llama = to_llama(model).eval()
    ids, mask = _left_padded(_ids(length=12), pads=(0, 3, 6))
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kw), llama.generate(ids, **kw))


@GENERATE_TESTS
def test_batched_left_padded_generate_equals_one_by_one():
    model = tiny_model().eval()
    prompts = [_ids(1, n, seed=n)[0] for n in (9, 5, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(ids, attention_mask=mask, **kw)[:, width:]
    for row, p in enumerate(prompts):
        alone = model.generate(p[None], **kw)[0, len(p):]
        assert torch.equal(batched[row], alone), row


@GENERATE_TESTS
def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model().eval()
    ids = _ids(2, 6)
    kw = dict(do_sample=True, temperature=1.3, top_k=5, max_new_tokens=6, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(7)
    a = model.generate(ids, **kw)
    torch.manual_seed(7)
    b = model.generate(ids, **kw)
    assert torch.equal(a, b)
    # every sampled token is among the top-5 of the full recompute at its step
    with torch.no_grad():
        logits = model(a).logits
    for t in range(ids.shape[1], a.shape[1]):
        top5 = logits[:, t - 1].topk(5).indices
        assert (top5 == a[:, t:t + 1]).any(-1).all()


def test_causality_later_tokens_never_change_earlier_logits():
    model = tiny_model().eval()
    ids = _ids(2, 20)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % VOCAB
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("cache_name", ["cache", "past_key_values"])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_incremental_decode_equals_full_recompute(padded, cache_name):
    model = tiny_model(num_key_value_heads=1).eval()
    ids = _ids(3, 16)
    mask = torch.ones_like(ids)
    if padded:
        ids, mask = _left_padded(ids, pads=(0, 2, 4))
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        # prefill 6, then a chunk of 4 (past + several new tokens), then one token at a time
        out = model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], use_cache=True)
        cache, pieces = getattr(out, CACHE_OUTPUT_FIELD), [out.logits]
        out = model(ids[:, 6:10], attention_mask=mask[:, :10], position_ids=pos[:, 6:10],
                    use_cache=True, **{cache_name: cache})
        pieces.append(out.logits)
        assert cache.get_seq_length() == 10  # the chunk extended the cache passed under either name
        for t in range(10, 16):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                        use_cache=True, **{cache_name: cache})
            pieces.append(out.logits)
    incremental = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert torch.allclose(incremental[real], full[real], atol=1e-5, rtol=0)


def test_save_and_from_pretrained_bit_identical(tmp_path):
    model = tiny_model(tie_word_embeddings=True).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AlignlineForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tying survives the round trip
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_reward_head_loads_backbone_from_causal_checkpoint(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    lm = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(rm) is AlignlineForSequenceClassification
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, rm.model.state_dict()[k])
    assert rm.score.weight.shape == (1, 64) and rm.score.weight.abs().sum() > 0


def test_gradient_checkpointing_gives_same_grads():
    def grads(checkpointing):
        model = tiny_model(seed=3).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        calls, mlp = [], model.model.layers[0].mlp
        mlp_forward = mlp.forward
        mlp.forward = lambda x: calls.append(1) or mlp_forward(x)  # count (re)computations
        ids = _ids(2, 16)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    (plain, plain_calls), (ckpt, ckpt_calls) = grads(False), grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # checkpointing really recomputed the layer in backward
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6, rtol=1e-5), name


def test_loss_ignores_minus_100_and_matches_manual_cross_entropy():
    model = tiny_model().eval()
    ids = _ids(2, 10)
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, 3:-1].reshape(-1, VOCAB), ids[:, 4:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)
    # the summed form used under gradient accumulation
    with torch.no_grad():
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(5)).loss
    assert torch.allclose(summed, manual * 12 / 5, atol=1e-5)


def test_init_scales_residual_projections():
    model = tiny_model(num_hidden_layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    std = model.config.initializer_range
    q = model.model.layers[0].self_attn.q_proj.weight.std().item()
    o = model.model.layers[0].self_attn.o_proj.weight.std().item()
    down = model.model.layers[3].mlp.down_proj.weight.std().item()
    assert abs(q - std) < 0.1 * std
    assert abs(o - std / 4) < 0.1 * std / 4 and abs(down - std / 4) < 0.1 * std / 4  # 1/sqrt(2*8) = 1/4
    assert torch.equal(model.model.norm.weight, torch.ones(256))


def test_sequence_classification_scores_last_non_pad_token():
    torch.manual_seed(0)
    model = AlignlineForSequenceClassification(tiny_config(num_labels=1)).eval()
    ids = _ids(3, 10)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    ids[mask == 0] = 0
    with torch.no_grad():
        scores = model(ids, attention_mask=mask).logits  # (3, 1)
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
        by_pad_id = model(ids).logits  # no mask: found from pad_token_id
    manual = torch.stack([model.score(hidden[0, 6]), model.score(hidden[1, 9]), model.score(hidden[2, 9])])
    assert scores.shape == (3, 1)
    assert torch.allclose(scores, manual, atol=1e-6)
    # without a mask the right-padded row differs (pad tokens are attended) but the index rule is the same
    with torch.no_grad():
        hidden_nomask = model.model(ids).last_hidden_state
    assert torch.allclose(by_pad_id[0], model.score(hidden_nomask[0, 6]), atol=1e-6)


def test_packed_rows_do_not_attend_across_documents():
    model = tiny_model().eval()
    a, b = _ids(1, 7, seed=3), _ids(1, 5, seed=4)
    packed = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        together = model(packed, position_ids=pos).logits
        alone = torch.cat([model(a).logits, model(b).logits], dim=1)
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(hidden_size=64, num_attention_heads=5), "num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(rope_parameters={"rope_type": "ntk-by-parts"}), "rope_type"),
        (dict(rope_parameters={"rope_type": "linear"}), "'factor'"),
        (dict(rope_parameters={"rope_type": "linear", "factor": 0.5}), "'factor'"),
        (dict(rope_parameters={"rope_type": "default", "beta_fast": 3}), "beta_fast"),
        (dict(head_dim=15, hidden_size=64, num_attention_heads=4), "head_dim"),
        (dict(pad_token_id=500), "pad_token_id"),
        (dict(attention_dropout=1.5), "attention_dropout"),
    ],
)
def test_bad_config_names_the_field(fields, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        tiny_config(**fields)


def test_legacy_rope_spelling_folds_into_rope_parameters():
    cfg = AlignlineConfig(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert cfg.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    assert cfg.rope_theta == 5000.0
    assert AlignlineConfig.from_dict(cfg.to_dict()).rope_parameters == cfg.rope_parameters


def test_unsupported_forward_kwargs_are_refused():
    model = tiny_model()
    with pytest.raises(TypeError, match="cu_seq_lens_q"):
        model(_ids(1, 4), cu_seq_lens_q=torch.tensor([0, 4]))


def test_cache_under_both_names_at_once_is_refused():
    model = tiny_model().eval()
    with torch.no_grad():
        cache = getattr(model(_ids(1, 4), use_cache=True), CACHE_OUTPUT_FIELD)
        with pytest.raises(ValueError, match="both `cache` and `past_key_values`"):
            model(_ids(1, 1), cache=cache, past_key_values=cache)


def test_output_field_is_the_one_installed_transformers_reads():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model = tiny_model().eval()
    with torch.no_grad():
        out = model(_ids(1, 4), use_cache=True)
    assert CACHE_OUTPUT_FIELD in CausalLMOutputWithPast.__dataclass_fields__
    assert getattr(out, CACHE_OUTPUT_FIELD).get_seq_length() == 4


@pytest.mark.parametrize("via", ["argument", "config"])
def test_hidden_states_match_llama(via):
    # output_hidden_states is honoured both as a forward argument and as the config flag (transformers'
    # common tests set the flag), with Llama's layout: embeddings, each layer's output, final norm last.
    model = tiny_model().eval()
    llama = to_llama(model).eval()
    ids, mask = _left_padded(_ids(length=12), pads=(0, 2, 5))
    kw = {"output_hidden_states": True} if via == "argument" else {}
    if via == "config":
        model.config.output_hidden_states = llama.config.output_hidden_states = True
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, **kw).hidden_states
        ref = llama(ids, attention_mask=mask, **kw).hidden_states
        backbone = model.model(ids, attention_mask=mask, **kw).hidden_states
    assert ours is not None and len(ours) == len(ref) == model.config.num_hidden_layers + 1
    real = mask.bool()
    for i, (a, b, c) in enumerate(zip(ours, ref, backbone)):
        assert torch.allclose(a[real], b[real], atol=1e-5, rtol=0), (i, (a[real] - b[real]).abs().max())
        assert torch.equal(a, c), i
    with torch.no_grad():
        model.config.output_hidden_states = False
        assert model(ids, attention_mask=mask).hidden_states is None


def test_rope_parameters_assigned_after_construction_are_standardised():
    # Llama fills yarn's original_max_position_embeddings from max_position_embeddings when it reads a dict
    # that lacks it; ours used to raise KeyError('original_max_position_embeddings').
    model = tiny_model(max_position_embeddings=32).eval()
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0}
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)  # modules read the config when built
    llama = to_llama(model).eval()
    assert llama.config.rope_parameters["original_max_position_embeddings"] == 32
    ids = _ids(2, 40)  # past max_position_embeddings: yarn's extrapolated range
    with torch.no_grad():
        ours, ref = model(ids).logits, llama(ids).logits
    assert model.config.rope_parameters["original_max_position_embeddings"] == 32
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
    # the legacy `type` key and a missing rope_theta are filled the same way; bad values still name the field
    model.config.rope_parameters = {"type": "linear", "factor": 2.0}
    assert model.config.validated_rope_parameters() == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        type(model.model.rotary_emb)(model.config)


def test_past_key_values_name_warns_where_transformers_renamed_it():
    # transformers >= 5.24 deprecates `past_key_values` for `cache` (Llama's forwards warn); older ones pass it.
    model = tiny_model().eval()
    with torch.no_grad():
        cache = getattr(model(_ids(1, 4), use_cache=True), CACHE_OUTPUT_FIELD)
        if CACHE_OUTPUT_FIELD == "cache":
            with pytest.warns(FutureWarning, match="`past_key_values` is deprecated"):
                model(_ids(1, 1), past_key_values=cache)
        else:
            model(_ids(1, 1), past_key_values=cache)
    assert cache.get_seq_length() == 5
