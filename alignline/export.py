"""Export a checkpoint for other runtimes: transformers' Llama (an HF dir) and llama.cpp's GGUF, validated.

    from alignline.export import export_llama, export_gguf, validate_gguf
    export_llama("runs/tiny/sft/checkpoint", "out/llama")                 # LlamaForCausalLM dir
    export_gguf("runs/tiny/sft/checkpoint", "out/model.gguf", dtype="f32")  # f32 | f16 | bf16 | q8_0
    report = validate_gguf("runs/tiny/sft/checkpoint", "out/model.gguf", ["What is 3+4?"], max_new_tokens=16)

or `alignline export CKPT --format llama|gguf --out PATH [--dtype f32] [--no-validate]`.

The source is a save_pretrained dir of an alignline model with the LLaMA recipe (the default) or of a
`LlamaForCausalLM`. Variants without a Llama counterpart, explicit head_dim, dynamic-NTK rope and PEFT
adapters are refused with the reason (the checks of `alignline.model.convert`), before anything is
written. Outputs are written to a temporary sibling and renamed into place, so a failure leaves nothing.

GGUF layout (llama.cpp architecture "llama"): HF rotates query/key halves (rotate_half: dimension j pairs
with j + head_dim/2), llama.cpp's "llama" rope rotates adjacent pairs (2j, 2j+1), so the rows of q_proj and
k_proj are permuted per head (`rope_rows_to_interleaved`); norms stay f32; q8_0 quantizes the matrices
whose rows are a multiple of 32 values and keeps the others f16, as llama.cpp's own converter does. The
tokenizer is byte-level BPE ("gpt2") with llama.cpp's "smollm" pre-tokenizer, which is exactly ours
(one token per digit, then GPT-2's ByteLevel regex); any other pre-tokenizer is refused.

`gguf_generate` runs llama.cpp (the xllamacpp binding) greedily with an f32 KV cache; `validate_gguf`
compares its tokens with transformers' greedy tokens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from alignline.config import UserError

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
GgufDtype = Literal["f32", "f16", "bf16", "q8_0"]

# Our tokenizer's pre-tokenizer (alignline.tokenizer._pre_tokenizer) as tokenizer.json stores it; llama.cpp
# calls the same split "smollm" (\p{N} one by one, then GPT-2's regex). Only these fields change the split.
OUR_PRE_TOKENIZER = [{"type": "Digits", "individual_digits": True},
                     {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]

# HF parameter name (inside model.layers.N.) -> llama.cpp tensor name (inside blk.N.)
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

# HF-only template tags (they mark the assistant's tokens for training, render nothing): llama.cpp's
# jinja engine does not know them, so they are dropped from the GGUF's copy of the chat template.
_GENERATION_TAGS = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


class ExportError(UserError, ValueError):
    """A checkpoint, tokenizer or option that cannot be exported as asked (a user error: `error:`, exit 2)."""


# --------------------------------------------------------------------------- source checks


def _source_config(checkpoint: Path):
    """The checkpoint's config as a LlamaConfig, after every refusal that needs no weights."""
    from transformers import AutoConfig

    import alignline.model  # noqa: F401 - registers model_type "alignline" with the Auto classes
    from alignline.model.convert import ConversionError, alignline_to_llama_config, llama_to_alignline_config

    if (checkpoint / "adapter_config.json").is_file():
        # convert's wording: the stages write the merged model next to the adapter
        raise ConversionError(f"{checkpoint} is a PEFT adapter, not a model; export the merged model instead: the "
                              "lora, sft and reward stages write it to <stage dir>/checkpoint next to the adapter (or "
                              "merge it yourself with peft's merge_and_unload() and save_pretrained()).")
    if not (checkpoint / "config.json").is_file():
        hint = f"; {checkpoint}/checkpoint is one" if (checkpoint / "checkpoint" / "config.json").is_file() else ""
        raise ExportError(f"{checkpoint}/config.json not found: CKPT must be a checkpoint dir written by "
                          f"save_pretrained (e.g. runs/<run>/sft/checkpoint){hint}.")
    config = AutoConfig.from_pretrained(checkpoint)
    if config.model_type == "alignline":
        llama = alignline_to_llama_config(config)  # ConversionError naming each variant switch
    elif config.model_type == "llama":
        llama_to_alignline_config(config)  # ConversionError naming Llama features we do not reproduce
        llama = config
    else:
        raise ExportError(f"{checkpoint}/config.json has model_type={config.model_type!r}; export takes an "
                          "'alignline' or 'llama' checkpoint.")
    return llama


def check_exportable(checkpoint: str | Path, formats: Sequence[str] = ("llama", "gguf")) -> None:
    """Every refusal `export_llama` / `export_gguf` would raise for `checkpoint`, without writing or loading
    weights: for callers (the export stage) that must fail before they create anything."""
    llama = _source_config(Path(checkpoint))
    if "gguf" in formats:
        _rope_metadata(llama)
        _tokenizer_metadata(Path(checkpoint), llama.vocab_size)


def _atomic_dir(out: Path):
    """A temp dir next to `out` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


# --------------------------------------------------------------------------- Llama (HF)


def export_llama(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write `checkpoint` (alignline or llama) as a transformers `LlamaForCausalLM` dir `out_dir`; returns it.

    alignline checkpoints go through `convert_checkpoint(..., to="llama")` (weights bit for bit, tokenizer,
    chat template and generation config copied); a llama checkpoint is copied. `out_dir` must not exist.
    """
    from alignline.model.convert import convert_checkpoint

    src, out = Path(checkpoint), Path(out_dir)
    if out.exists():
        raise ExportError(f"--out {out} exists; choose a new path (export never overwrites).")
    _source_config(src)  # every refusal before anything is written
    tmp = _atomic_dir(out)
    try:
        if _model_type(src) == "llama":
            for path in src.iterdir():  # weights, tokenizer, templates; no sub-dirs (optimizer state etc.)
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        else:
            convert_checkpoint(src, tmp, to="llama")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _model_type(checkpoint: Path) -> str:
    return json.loads((checkpoint / "config.json").read_text()).get("model_type", "")


# --------------------------------------------------------------------------- GGUF


def rope_rows_to_interleaved(weight, n_heads: int):
    """Rows of an HF q_proj/k_proj weight (out = n_heads * head_dim, in) reordered for llama.cpp's rope.

    HF rotates the pairs (j, j + head_dim/2) of each head; llama.cpp's "llama" rope rotates (2j, 2j+1).
    Row j of the first half goes to 2j, row j of the second half to 2j+1, so q.k (hence attention) is
    unchanged while each rotated pair sits where llama.cpp expects it. Works on numpy arrays and tensors.
    """
    out_features = weight.shape[0]
    head_dim = out_features // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_name(hf_name: str) -> str | None:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if m and m.group(2) in LAYER_TENSORS:
        return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}.weight"
    return None


def _rope_metadata(llama) -> list[tuple[str, Any]]:
    """(writer method, value) pairs for the rope; ExportError for a scaling llama.cpp does not implement."""
    import gguf

    rp = dict(llama.rope_parameters or {})
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    items: list[tuple[str, Any]] = [("add_rope_freq_base", float(rp.get("rope_theta", 10000.0)))]
    if rope_type == "default":
        return items
    if rope_type == "linear":
        return items + [("add_rope_scaling_type", gguf.RopeScalingType.LINEAR),
                        ("add_rope_scaling_factor", float(rp["factor"]))]
    if rope_type == "yarn":
        # llama.cpp derives yarn's attention scale from the factor (0.1 ln(factor) + 1), as transformers
        # does by default; explicit scales are another formula, so they are refused rather than dropped.
        custom = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if rp.get(k) is not None]
        if rp.get("truncate") is False:
            custom.append("truncate=False")
        if custom:
            raise ExportError(f"rope_parameters sets {custom} for yarn; llama.cpp's yarn uses the default "
                              "attention scale only. Export a checkpoint without them.")
        items += [("add_rope_scaling_type", gguf.RopeScalingType.YARN),
                  ("add_rope_scaling_factor", float(rp["factor"])),
                  ("add_rope_scaling_orig_ctx_len",
                   int(rp.get("original_max_position_embeddings") or llama.max_position_embeddings))]
        if rp.get("beta_fast") is not None:
            items.append(("add_rope_scaling_yarn_beta_fast", float(rp["beta_fast"])))
        if rp.get("beta_slow") is not None:
            items.append(("add_rope_scaling_yarn_beta_slow", float(rp["beta_slow"])))
        return items
    raise ExportError(f"rope_parameters.rope_type={rope_type!r} has no GGUF counterpart (llama.cpp's llama "
                      "architecture implements default, linear and yarn rope scaling).")


def _tokenizer_metadata(checkpoint: Path, vocab_size: int) -> dict[str, Any]:
    """Everything llama.cpp needs to tokenize like the HF tokenizer; ExportError if it cannot."""
    import gguf
    from transformers import AutoTokenizer

    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{path} not found: GGUF export needs the checkpoint's (fast, byte-level BPE) tokenizer "
                          "saved next to the weights.")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: tokenizer model {model.get('type')!r}; GGUF export supports byte-level BPE.")
    pre = spec.get("pre_tokenizer") or {}
    found = [{k: p.get(k) for k in want} for p, want in zip(pre.get("pretokenizers") or [], OUR_PRE_TOKENIZER,
                                                          strict=False)]
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers") or []) != 2 or found != OUR_PRE_TOKENIZER \
            or spec.get("normalizer") is not None:
        # llama.cpp tokenizes with a hard-coded regex per named pre-tokenizer; a different split would give
        # different token ids without any error at run time, so only our exact split is accepted.
        raise ExportError(
            f"{path}: pre-tokenizer {json.dumps(pre)} (normalizer {json.dumps(spec.get('normalizer'))}) is not "
            "alignline's Digits(individual_digits=True) + ByteLevel(add_prefix_space=False) split, the only one "
            "exported (as llama.cpp's 'smollm'); llama.cpp would tokenize differently.")
    tok = AutoTokenizer.from_pretrained(checkpoint)
    vocab: dict[str, int] = dict(model["vocab"])
    types = {i: gguf.TokenType.NORMAL for i in vocab.values()}
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}.")
    by_id = {i: t for t, i in vocab.items()}
    # Rows of the embedding no token uses (vocab_size rounded up) get placeholder names, as in llama.cpp.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    # add_bos/add_eos: what the tokenizer itself adds to plain text (ours adds nothing; the template does).
    plain, special = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    add_bos = tok.bos_token_id is not None and special[:1] == [tok.bos_token_id] and plain[:1] != special[:1]
    add_eos = tok.eos_token_id is not None and special[-1:] == [tok.eos_token_id] and plain[-1:] != special[-1:]
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    return {
        "tokens": tokens, "token_types": token_types, "merges": merges, "add_bos": add_bos, "add_eos": add_eos,
        "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id,
        "chat_template": _GENERATION_TAGS.sub("", template) if template else None,
    }


def _state_dict(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's weights by HF name as float32 torch tensors (safetensors read directly)."""
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ExportError(f"no *.safetensors weights in {checkpoint}; save the model with save_pretrained().")
    weights: dict[str, Any] = {}
    for file in files:
        weights.update(load_file(file))
    return {name: t.float() for name, t in weights.items()}


def _encode(name: str, data, dtype: str):
    """(array, raw GGML type or None) for one tensor in the requested dtype; 1-D tensors (norms) stay f32."""
    import gguf
    import numpy as np

    if data.ndim == 1 or dtype == "f32":
        return data.astype(np.float32), None
    if dtype == "f16":
        return data.astype(np.float16), None
    if dtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    # q8_0 blocks are 32 consecutive values of a row; a row of another length stays f16 (llama.cpp's fallback)
    if data.shape[-1] % 32:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def export_gguf(checkpoint: str | Path, out_file: str | Path, dtype: GgufDtype = "f32") -> Path:
    """Write `checkpoint` (alignline or llama) as a llama.cpp GGUF file `out_file` in `dtype`; returns it.

    dtype: f32 (exact), f16, bf16 or q8_0 (norms always f32). Raises ExportError / ConversionError (both
    user errors) for what GGUF or llama.cpp cannot represent; an existing `out_file` is replaced atomically.
    """
    import gguf

    src, out = Path(checkpoint), Path(out_file)
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"dtype={dtype!r}: choose one of {', '.join(GGUF_DTYPES)}.")
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; GGUF export writes one file (e.g. {out}/model.gguf).")
    llama = _source_config(src)
    rope = _rope_metadata(llama)
    tok = _tokenizer_metadata(src, llama.vocab_size)
    weights = _state_dict(src)
    tied = bool(llama.tie_word_embeddings)

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(src.resolve().parent.name if src.name == "checkpoint" else src.name)
        writer.add_context_length(llama.max_position_embeddings)
        writer.add_embedding_length(llama.hidden_size)
        writer.add_block_count(llama.num_hidden_layers)
        writer.add_feed_forward_length(llama.intermediate_size)
        writer.add_head_count(llama.num_attention_heads)
        writer.add_head_count_kv(llama.num_key_value_heads)
        writer.add_rope_dimension_count(llama.hidden_size // llama.num_attention_heads)
        writer.add_layer_norm_rms_eps(llama.rms_norm_eps)
        writer.add_vocab_size(llama.vocab_size)
        for method, value in rope:
            getattr(writer, method)(value)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["token_types"])
        writer.add_token_merges(tok["merges"])
        for key, method in (("bos", "add_bos_token_id"), ("eos", "add_eos_token_id"), ("pad", "add_pad_token_id"),
                            ("unk", "add_unk_token_id")):
            if tok[key] is not None:
                getattr(writer, method)(tok[key])
        writer.add_add_bos_token(tok["add_bos"])
        writer.add_add_eos_token(tok["add_eos"])
        if tok["chat_template"]:
            writer.add_chat_template(tok["chat_template"])

        for hf_name, tensor in weights.items():
            name = _tensor_name(hf_name)
            if name is None:
                raise ExportError(f"{src}: weight {hf_name!r} has no place in llama.cpp's llama architecture.")
            if name == "output.weight" and tied:
                continue  # llama.cpp reuses token_embd when output is absent
            if name.endswith("attn_q.weight"):
                tensor = rope_rows_to_interleaved(tensor, llama.num_attention_heads)
            elif name.endswith("attn_k.weight"):
                tensor = rope_rows_to_interleaved(tensor, llama.num_key_value_heads)
            data, raw_dtype = _encode(name, tensor.numpy(), dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# --------------------------------------------------------------------------- llama.cpp (xllamacpp)


class LlamaCpp:
    """One GGUF loaded by llama.cpp's server (xllamacpp, in-process, listening on 127.0.0.1 only).

    Greedy decoding in f32 by default: an f32 KV cache (llama.cpp's default f16 cache already changes greedy
    tokens of small models) and no flash attention; no prompt cache reuse and one slot, so every request
    is computed from scratch alike.
    """

    def __init__(self, gguf_path: str | Path, n_ctx: int = 512, threads: int = 1, kv_cache: str = "f32",
                 flash_attn: bool = False):
        import xllamacpp as xlc

        if not Path(gguf_path).is_file():
            raise ExportError(f"{gguf_path} not found: pass a .gguf file written by `alignline export --format gguf`.")
        params = xlc.CommonParams()
        params.model.path = str(gguf_path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.n_batch = params.n_ubatch = n_ctx  # the whole prompt in one batch
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        cache = {"f32": xlc.ggml_type.GGML_TYPE_F32, "f16": xlc.ggml_type.GGML_TYPE_F16}[kv_cache]
        params.cache_type_k = params.cache_type_v = cache
        params.cache_prompt = False
        # llama.cpp's CPU flash attention rounds through f16 (log-probs off by ~1e-3 on the tiny SFT model,
        # ~1e-5 without it); it is the default of llama.cpp/Ollama, so it stays selectable.
        params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn \
            else xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.warmup = False
        params.port = 0  # any free port: several exports/tests may run at once
        params.verbosity = -1
        self.server = xlc.Server(params)

    def _post(self, endpoint: str, body: dict) -> dict:
        # The native endpoints over loopback: the binding's handle_completions() speaks the OpenAI format,
        # whose per-token entries merge tokens that end inside a UTF-8 character, so ids are lost.
        import urllib.request

        req = urllib.request.Request(self.server.listening_address + endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            return json.loads(resp.read())

    def complete(self, prompt_ids: Sequence[int], max_new_tokens: int, n_probs: int = 0,
                 ignore_eos: bool = False) -> dict:
        """llama.cpp's /completion on token ids: greedy, nothing added to the prompt, stops at end-of-generation
        (ignore_eos: end-of-generation tokens are never chosen instead). The result's "tokens" are the new
        ids; with n_probs, "completion_probabilities" has the top log-probs (over the unbiased logits)."""
        return self._post("/completion", {
            "prompt": list(prompt_ids), "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
            "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True, "stream": False,
            "n_probs": n_probs, "post_sampling_probs": False, "ignore_eos": ignore_eos})

    def tokenize(self, text: str, parse_special: bool = True) -> list[int]:
        """llama.cpp's token ids for `text` (no bos/eos added); special tokens are parsed when asked."""
        tokens = self._post("/tokenize", {"content": text, "add_special": False, "parse_special": parse_special})
        return [t if isinstance(t, int) else t["id"] for t in tokens["tokens"]]

    def close(self) -> None:
        self.server = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut(tokens: Sequence[int], eos_token_ids: Sequence[int]) -> list[int]:
    stop = next((i for i, t in enumerate(tokens) if t in set(eos_token_ids)), len(tokens) - 1)
    return list(tokens[: stop + 1])


def _llama_cpp_for(gguf_path, prompts_token_ids, max_new_tokens, kv_cache, flash_attn, threads, n_ctx) -> LlamaCpp:
    longest = max((len(p) for p in prompts_token_ids), default=0) + max_new_tokens
    return LlamaCpp(gguf_path, n_ctx=n_ctx or max(64, longest), threads=threads, kv_cache=kv_cache,
                    flash_attn=flash_attn)


def gguf_generate(gguf_path: str | Path, prompts_token_ids: Sequence[Sequence[int]], max_new_tokens: int, *,
                  eos_token_ids: Sequence[int] = (), ignore_eos: bool = False, kv_cache: str = "f32",
                  flash_attn: bool = False, threads: int = 1, n_ctx: int | None = None) -> list[list[int]]:
    """Greedy new token ids from llama.cpp for each prompt (token ids, used as given: no bos added).

    Each list is cut after the first of `eos_token_ids` (kept), like `alignline.evaluation.greedy_responses`;
    llama.cpp also stops by itself at the GGUF's end-of-generation tokens; with ignore_eos they are never
    chosen (the next most likely token is), so every list is max_new_tokens long. kv_cache "f32" and no flash
    attention (the defaults) compute in f32 throughout; kv_cache="f16", flash_attn=True are llama.cpp's own.
    """
    with _llama_cpp_for(gguf_path, prompts_token_ids, max_new_tokens, kv_cache, flash_attn, threads, n_ctx) as cpp:
        return [_cut(cpp.complete(ids, max_new_tokens, ignore_eos=ignore_eos)["tokens"], eos_token_ids)
                for ids in prompts_token_ids]


def _prompt_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A conversation goes through the chat template (as the evaluate stage does); a string is raw text."""
    from alignline.chat import prompt_ids

    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt_ids(tokenizer, [prompt])[0]


def _hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int], pad_id: int | None,
               ignore_eos: bool) -> list[int]:
    """transformers' greedy new tokens for one prompt (no padding: the computation llama.cpp does), cut after
    the eos (kept); ignore_eos suppresses the eos logits instead, as llama.cpp's ignore_eos does."""
    import torch

    from alignline.generation import decoding_config, generate_exactly

    config = decoding_config(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                             pad_token_id=pad_id if pad_id is not None else eos_ids[0])
    if ignore_eos:
        config.suppress_tokens = list(eos_ids)
    with torch.inference_mode():
        out = generate_exactly(model, config, input_ids=torch.tensor([prompt_ids]))[0, len(prompt_ids):].tolist()
    return _cut(out, eos_ids)


def _source(checkpoint: str | Path, loaded: tuple | None) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, eos ids) of the source: `loaded` (a (model, tokenizer) the caller already holds, so
    validating two formats loads it once), else loaded from `checkpoint` on the CPU."""
    from alignline.generation import load_model

    model, tokenizer = loaded if loaded is not None else load_model(checkpoint, device="cpu")
    eos = model.generation_config.eos_token_id
    eos_ids = [tokenizer.eos_token_id] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return model, tokenizer, eos_ids


def validate_gguf(checkpoint: str | Path, gguf_path: str | Path, prompts: Sequence[str | list[dict]],
                  max_new_tokens: int = 16, *, ignore_eos: bool = False, kv_cache: str = "f32",
                  flash_attn: bool = False, n_probs: int = 5, loaded: tuple | None = None) -> dict[str, Any]:
    """Greedy tokens of transformers (`checkpoint`, on CPU) vs llama.cpp (`gguf_path`) on each prompt.

    prompts: raw strings (no special tokens added), or conversations ([{role, content}, ...]) rendered with
    the chat template as the evaluate stage does. Both stop after the eos, or with ignore_eos never pick it
    (so each compares exactly max_new_tokens tokens). kv_cache / flash_attn: see `gguf_generate`. Returns
        {"matched": k, "total": n, "all_matched": bool, "max_new_tokens", "ignore_eos", "kv_cache",
         "flash_attn", "max_abs_logprob_diff": float, "prompts": [{"prompt", "prompt_tokens", "hf", "gguf",
          "matched", "first_divergence" (None when matched), "match_prefix", "max_abs_logprob_diff"}]}
    max_abs_logprob_diff: over llama.cpp's top-`n_probs` log-probabilities at every step it generated,
    against transformers' on the same context (prompt + llama.cpp's tokens so far).
    """
    import torch

    model, tokenizer, eos_ids = _source(checkpoint, loaded)
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    rows = []
    with _llama_cpp_for(gguf_path, ids, max_new_tokens, kv_cache, flash_attn, 1, None) as cpp:
        for prompt, p_ids in zip(prompts, ids, strict=True):
            a = _hf_greedy(model, p_ids, max_new_tokens, eos_ids, tokenizer.pad_token_id, ignore_eos)
            result = cpp.complete(p_ids, max_new_tokens, n_probs=n_probs, ignore_eos=ignore_eos)
            b = _cut(result["tokens"], eos_ids)
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(torch.tensor([p_ids + b])).logits[0].float(), -1)
            diff, step = 0.0, 0
            # llama.cpp leaves out the entry of a token that ends inside a UTF-8 character (and merges it into
            # the next), so entries are matched to steps by token id.
            for entry in result.get("completion_probabilities", []):
                while step < len(b) and b[step] != entry["id"]:
                    step += 1
                if step == len(b):
                    break
                for top in entry["top_logprobs"]:
                    diff = max(diff, abs(top["logprob"] - logprobs[len(p_ids) + step - 1, top["id"]].item()))
                step += 1
            prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            rows.append({"prompt": prompt, "prompt_tokens": len(p_ids), "hf": a, "gguf": b, "matched": a == b,
                         "first_divergence": None if a == b else prefix, "match_prefix": prefix,
                         "max_abs_logprob_diff": diff})
    n_matched = sum(r["matched"] for r in rows)
    return {"matched": n_matched, "total": len(rows), "all_matched": n_matched == len(rows),
            "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos, "kv_cache": kv_cache,
            "flash_attn": flash_attn,
            "max_abs_logprob_diff": max((r["max_abs_logprob_diff"] for r in rows), default=0.0), "prompts": rows}


def validate_llama(checkpoint: str | Path, llama_dir: str | Path, prompts: Sequence[str | list[dict]],
                   max_new_tokens: int = 16, *, loaded: tuple | None = None) -> dict[str, Any]:
    """Greedy tokens of `checkpoint` vs its Llama export `llama_dir` (loaded as `LlamaForCausalLM`, on CPU): the
    same weights, so every prompt must match. Returns {"matched", "total", "all_matched", "prompts": [...]}.
    loaded: the source's (model, tokenizer) when the caller holds them already."""
    from transformers import LlamaForCausalLM

    model, tokenizer, eos_ids = _source(checkpoint, loaded)
    llama = LlamaForCausalLM.from_pretrained(str(llama_dir), dtype=model.dtype).eval()
    rows = []
    for prompt in prompts:
        ids = _prompt_ids(tokenizer, prompt)
        a, b = (_hf_greedy(m, ids, max_new_tokens, eos_ids, tokenizer.pad_token_id, True) for m in (model, llama))
        rows.append({"prompt": prompt, "source": a, "llama": b, "matched": a == b})
    n_matched = sum(r["matched"] for r in rows)
    return {"matched": n_matched, "total": len(rows), "all_matched": n_matched == len(rows), "prompts": rows}


__all__ = [
    "GGUF_DTYPES",
    "ExportError",
    "check_exportable",
    "LlamaCpp",
    "export_gguf",
    "export_llama",
    "gguf_generate",
    "rope_rows_to_interleaved",
    "validate_gguf",
    "validate_llama",
]
