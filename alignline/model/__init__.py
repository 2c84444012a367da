"""The alignline decoder (LLaMA-style) as transformers classes; `import alignline` registers them.

    from alignline.model import AlignlineConfig, AlignlineForCausalLM, AlignlineForSequenceClassification
    from alignline.model.convert import convert_checkpoint   # alignline <-> LlamaForCausalLM
"""

from alignline.model.configuration import AlignlineConfig
from alignline.model.modeling import (
    AlignlineForCausalLM,
    AlignlineForSequenceClassification,
    AlignlineModel,
    AlignlinePreTrainedModel,
)

__all__ = [
    "AlignlineConfig",
    "AlignlineForCausalLM",
    "AlignlineForSequenceClassification",
    "AlignlineModel",
    "AlignlinePreTrainedModel",
]
