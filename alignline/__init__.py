"""alignline: the library behind the `alignline` command (model, tokenizer, data, training helpers).

Importing the package registers the alignline decoder with transformers' Auto classes, so

    import alignline
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/tiny/pretrain/checkpoint")

loads our checkpoints without trust_remote_code. The import pulls in torch and transformers' modeling
code (needed to register) but never trl, peft or prefect.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from alignline.model import (
    AlignlineConfig,
    AlignlineForCausalLM,
    AlignlineForSequenceClassification,
    AlignlineModel,
)

__version__ = "0.1.0"


def _register() -> None:
    # exist_ok: re-importing (e.g. importlib.reload in tests) must not fail.
    AutoConfig.register(AlignlineConfig.model_type, AlignlineConfig, exist_ok=True)
    AutoModel.register(AlignlineConfig, AlignlineModel, exist_ok=True)
    AutoModelForCausalLM.register(AlignlineConfig, AlignlineForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(AlignlineConfig, AlignlineForSequenceClassification, exist_ok=True)


_register()

__all__ = [
    "AlignlineConfig",
    "AlignlineForCausalLM",
    "AlignlineForSequenceClassification",
    "AlignlineModel",
    "__version__",
]
