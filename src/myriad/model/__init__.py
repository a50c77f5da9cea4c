"""Pure ``nn.Module`` definitions of Myriad's MoE language model; no engine or trainer code."""

from myriad.model.config import AttnReuseConfig, ModelConfig, MoEConfig
from myriad.model.moe import MoEFeedForward, MoEOutput
from myriad.model.params import ParamCounts, count_parameters
from myriad.model.transformer import IGNORE_INDEX, LMOutput, MoETransformerLM

__all__ = [
    "AttnReuseConfig",
    "IGNORE_INDEX",
    "LMOutput",
    "ModelConfig",
    "MoEConfig",
    "MoEFeedForward",
    "MoEOutput",
    "MoETransformerLM",
    "ParamCounts",
    "count_parameters",
]
