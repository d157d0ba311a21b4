"""One LightningModule per alignment step, sharing :class:`AlignmentModule`."""

from sacpo_lightning.modules.base import AlignmentModule, OptimSettings
from sacpo_lightning.modules.dpo import PairwiseModule, RewardDPO, SafetyDPO
from sacpo_lightning.modules.kto import KTOModule, RewardKTO, SafetyKTO

__all__ = ["AlignmentModule", "KTOModule", "OptimSettings", "PairwiseModule", "RewardDPO", "RewardKTO", "SafetyDPO",
           "SafetyKTO"]
