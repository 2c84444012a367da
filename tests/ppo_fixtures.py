"""Shared pieces of the PPO tests (no tests here): tiny HF Llama policy / critic / reward models built
in code, and an in-memory collective that lets threads stand in for torchrun ranks.

    from tests.ppo_fixtures import llama_config, make_models, ThreadCollective
"""

from __future__ import annotations

import copy
import threading

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification


def llama_config(vocab_size: int, pad: int, eos: int, bos: int, *, hidden_size: int = 32, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, **kw) -> LlamaConfig:
    """A tiny untied Llama with distinct pad / eos / bos ids (RLHF masking needs pad != eos)."""
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=64, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos,
                       tie_word_embeddings=False, **kw)


def make_models(cfg, seed: int = 0):
    """(policy, reference = a copy of the policy, value model = a copy of the RM, reward model)."""
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(cfg())
    rm = LlamaForSequenceClassification(cfg(num_labels=1))
    return policy, copy.deepcopy(policy), copy.deepcopy(rm), rm


class ThreadCollective:
    """`exchange(rank, value)` -> every rank's value of the same call, in rank order: an all-gather
    for `world` threads that stand in for torchrun ranks, so no process group is needed."""

    def __init__(self, world: int = 2):
        self.world, self.barrier, self.slots = world, threading.Barrier(world), {}

    def exchange(self, rank: int, value):
        call = self.slots.setdefault(("n", rank), 0)
        self.slots[("n", rank)] = call + 1
        self.slots[(call, rank)] = value
        self.barrier.wait()
        out = [self.slots[(call, r)] for r in range(self.world)]
        self.barrier.wait()
        return out
