"""The alignline decoder (LLaMA-style) as transformers classes. Importing this package registers
them with transformers' Auto classes (AutoConfig, AutoModel, AutoModelForCausalLM,
AutoModelForSequenceClassification), so `from_pretrained` loads alignline checkpoints.

    import alignline.model                                    # registers model_type "alignline"
    from alignline.model import AlignlineConfig, AlignlineForCausalLM, AlignlineForSequenceClassification
    from alignline.model.convert import convert_checkpoint   # alignline <-> LlamaForCausalLM
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from alignline.model.configuration import AlignlineConfig
from alignline.model.modeling import (
    AlignlineForCausalLM,
    AlignlineForSequenceClassification,
    AlignlineModel,
    AlignlinePreTrainedModel,
)


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
    "AlignlinePreTrainedModel",
]
