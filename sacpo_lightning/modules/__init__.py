"""One LightningModule per alignment step, sharing :class:`AlignmentModule`, and the score models (reward and cost
models for evaluation), which share its training pieces through :class:`TrainableModuleMixin`."""

from sacpo_lightning.modules.base import AlignmentModule, OptimSettings, TrainableModuleMixin
from sacpo_lightning.modules.dpo import PairwiseModule, RewardDPO, SafetyDPO
from sacpo_lightning.modules.kto import KTOModule, RewardKTO, SafetyKTO
from sacpo_lightning.modules.score import CostModelModule, RewardModelModule, ScoreModelModule

__all__ = ["AlignmentModule", "CostModelModule", "KTOModule", "OptimSettings", "PairwiseModule", "RewardDPO",
           "RewardKTO", "RewardModelModule", "SafetyDPO", "SafetyKTO", "ScoreModelModule", "TrainableModuleMixin"]
