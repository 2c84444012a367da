"""Try a model: streaming generation and an interactive chat loop for any HF causal-LM checkpoint dir.

    from alignline.generation import SamplingOptions, load_model, stream_generate, chat_loop
    model, tok = load_model("runs/tiny/sft/checkpoint")
    for piece in stream_generate(model, tok, "What is 12+7?", SamplingOptions(temperature=0)):
        print(piece, end="", flush=True)

CLI: `alignline generate CKPT --prompt "..."` and `alignline chat CKPT` (alignline_cli/model_cmds.py).
The checkpoint's chat template is used when it has one (prompts become a user turn and the template's
generation prompt is appended); otherwise the prompt is fed as raw text. Tokens are streamed with
transformers' TextIteratorStreamer as they are produced; generation stops at the eos token.

Every generate() in alignline (rollouts, evaluation, policy pairs, this module) goes through
`decoding_config` + `generate_exactly`: the tokens come from exactly softmax(logits / T) with only the
top-k / top-p / repetition penalty asked for. In transformers 5.x a GenerationConfig field left None is
"unset" and is filled from the checkpoint's generation_config.json, then from library defaults (top_k=50),
so every knob is given an explicit neutral value and the model's own generation_config is hidden for
the call (fields whose only "off" value is None, e.g. suppress_tokens or min_p, can only be kept out so).
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SamplingOptions:
    """temperature 0 means greedy decoding; top_k 0 and top_p 1.0 disable those filters."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be > 0.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off).")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 = off).")

    def generation_config(self, eos_token_id, pad_token_id, bos_token_id=None):
        """The exact GenerationConfig these options mean (see `decoding_config`)."""
        return decoding_config(max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                               temperature=self.temperature or 1.0, top_k=self.top_k, top_p=self.top_p,
                               repetition_penalty=self.repetition_penalty, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, bos_token_id=bos_token_id)


# The value that switches each logits processor / decoding feature of transformers' generate() off.
# Used for greedy and sampling alike. min_new_tokens stays None: generate() turns any value into
# min_length = prompt length + value, a MinLengthLogitsProcessor (harmless at 0, but not "off").
_NEUTRAL = dict(
    min_length=0, num_beams=1, num_beam_groups=1, num_return_sequences=1,
    diversity_penalty=0.0, length_penalty=1.0, early_stopping=False, encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, guidance_scale=1.0, renormalize_logits=False,
    remove_invalid_values=False, token_healing=False, output_scores=False, output_logits=False,
    output_attentions=False, output_hidden_states=False, return_dict_in_generate=False, use_cache=True,
)
# Sampling-only warpers; transformers refuses them (strict validation) when do_sample is False, and
# greedy decoding never applies them, so they are set for sampling only.
_NEUTRAL_SAMPLING = dict(typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)


def decoding_config(
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    bos_token_id: int | None = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
):
    """A GenerationConfig built from scratch (never the model's): greedy, or sampling from exactly
    softmax(logits / temperature) restricted by top_k (0 = off) and top_p (1.0 = off); everything
    else neutral. Only the special token ids are taken from the caller. Use with `generate_exactly`."""
    from transformers import GenerationConfig

    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1]")
    fields = dict(_NEUTRAL, max_new_tokens=max_new_tokens, do_sample=do_sample, repetition_penalty=repetition_penalty,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id)
    if do_sample:
        # top_k=0, not None: None is "unset" and becomes transformers' default top_k=50.
        fields.update(_NEUTRAL_SAMPLING, temperature=temperature, top_k=top_k, top_p=top_p)
    return GenerationConfig(**fields)


@contextmanager
def _hidden_generation_config(model, generation_config):
    """Swap every generation_config the model (or a wrapper such as PEFT's) owns for a blank one
    holding only the special ids: generate() fills each unset field from it, and a checkpoint's value
    for a field whose only "off" value is None (suppress_tokens, min_p, forced_bos_token_id, ...) would
    otherwise come back."""
    from transformers import GenerationConfig

    ids = {k: getattr(generation_config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    owners = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in owners]
    try:
        for m in owners:
            m.generation_config = GenerationConfig(**ids)
        yield
    finally:
        for m, cfg in zip(owners, saved):
            m.generation_config = cfg


def generate_exactly(model, generation_config, **inputs):
    """model.generate(**inputs, generation_config=generation_config) with nothing from the model's own
    generation_config (generation_config.json) mixed in. The model's config is restored afterwards; do
    not run other generate() calls on the same model concurrently."""
    with _hidden_generation_config(model, generation_config):
        return model.generate(**inputs, generation_config=generation_config)


def load_model(checkpoint: str | Path, device: str | None = None, dtype: str = "auto"):
    """(model, tokenizer) from a save_pretrained dir holding both; model in eval mode on `device`."""
    from transformers import AutoTokenizer

    from alignline.distributed import pick_device
    from alignline.models import load_causal_lm

    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}/config.json not found: CKPT must be a checkpoint dir written by save_pretrained "
            "(e.g. runs/<run>/sft/checkpoint)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"no tokenizer in {path} ({err}); save the tokenizer next to the weights "
            "(tokenizer.save_pretrained(CKPT))."
        ) from err
    device = device or pick_device()
    model = load_causal_lm(path, dtype=dtype, device=device).eval()
    return model, tokenizer


def encode_prompt(tokenizer, messages_or_text: list[dict] | str, use_chat_template: bool = True):
    """Token ids (1, T) for a conversation (list of {role, content}) or a plain string.

    With a chat template (and use_chat_template) the string becomes a user turn; without one a
    conversation is refused rather than flattened in some made-up format.
    """
    has_template = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if isinstance(messages_or_text, str):
        if not has_template:
            return tokenizer(messages_or_text, return_tensors="pt")["input_ids"]
        messages_or_text = [{"role": "user", "content": messages_or_text}]
    if not has_template:
        raise ValueError(
            "this tokenizer has no chat template, so a conversation cannot be rendered; use a checkpoint "
            "saved with a chat template (alignline tokenizer stage) or pass plain text."
        )
    import torch

    from alignline.chat import prompt_ids

    return torch.tensor(prompt_ids(tokenizer, [messages_or_text]))


def stream_generate(
    model,
    tokenizer,
    prompt: list[dict] | str,
    options: SamplingOptions | None = None,
    use_chat_template: bool = True,
) -> Iterator[str]:
    """Yield decoded text pieces as generate() produces them (special tokens skipped)."""
    import torch
    from transformers import TextIteratorStreamer

    options = options or SamplingOptions()
    input_ids = encode_prompt(tokenizer, prompt, use_chat_template).to(model.device)
    if options.seed is not None:
        torch.manual_seed(options.seed)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen_cfg = options.generation_config(eos, pad, model.generation_config.bos_token_id)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                generate_exactly(model, gen_cfg, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 streamer=streamer)
        except BaseException as err:  # re-raised in the caller's thread below
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def generate_text(model, tokenizer, prompt: list[dict] | str, options: SamplingOptions | None = None,
                  use_chat_template: bool = True, echo: Callable[[str], None] | None = None) -> str:
    """The full completion as a string; `echo` (e.g. print without newline) sees each piece as it arrives."""
    pieces = []
    for piece in stream_generate(model, tokenizer, prompt, options, use_chat_template):
        if echo is not None:
            echo(piece)
        pieces.append(piece)
    return "".join(pieces)


def chat_loop(model, tokenizer, options: SamplingOptions | None = None, system: str | None = None,
              read: Callable[[str], str] = input, write: Callable[[str], None] | None = None) -> list[dict]:
    """Interactive multi-turn chat; returns the conversation. `/reset` clears it, `/exit` or EOF ends it."""
    if write is None:
        def write(text: str) -> None:
            print(text, end="", flush=True)

    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat needs a tokenizer with a chat template; use `alignline generate` for raw text.")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            user = read("you> ")
        except EOFError:
            write("\n")
            return history
        if user.strip() in ("/exit", "/quit"):
            return history
        if user.strip() == "/reset":
            history = history[:1] if system else []
            write("(conversation cleared)\n")
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        write("assistant> ")
        reply = generate_text(model, tokenizer, history, options, echo=write)
        write("\n")
        history.append({"role": "assistant", "content": reply})


__all__ = ["SamplingOptions", "chat_loop", "decoding_config", "encode_prompt", "generate_exactly", "generate_text",
           "load_model", "stream_generate"]
