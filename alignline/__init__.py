"""alignline: the library behind the `alignline` command (model, tokenizer, data, training helpers).

`import alignline` is light: no torch, no transformers, so the config, CLI and stage contract load
in a fraction of a second. The model lives in `alignline.model`; importing it registers the alignline
decoder with transformers' Auto classes, so

    import alignline.model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/tiny/pretrain/checkpoint")

loads our checkpoints without trust_remote_code. `alignline.model` pulls in torch and transformers'
modeling code (needed to register) but never trl, peft or prefect.
"""

__version__ = "0.1.0"

_MODEL_NAMES = ("AlignlineConfig", "AlignlineForCausalLM", "AlignlineForSequenceClassification", "AlignlineModel")


def __getattr__(name: str):
    # `alignline.AlignlineConfig` etc. still work: the model package (and the registration) loads on first use.
    if name in _MODEL_NAMES:
        import alignline.model

        return getattr(alignline.model, name)
    raise AttributeError(f"module 'alignline' has no attribute {name!r}")


__all__ = [*_MODEL_NAMES, "__version__"]
