"""Training stages as LightningModules on one shared base (see ``base.py``).

``PretrainModule`` (paper section 2.2), ``SFTModule`` (section 3.1) and ``RewardModule``
(section 3.2.2) are here; later stages (PPO, ...) subclass ``StageModule`` the same way. ``llama2-lit fit --config
configs/<size>/<stage>.yaml`` runs them through the Lightning CLI (``cli.py``).
"""

from llama2_lit.stages.base import NonFiniteLossError, StageModule, optimizer_param_groups, warmup_cosine_lr
from llama2_lit.stages.pretrain import PretrainModule, next_token_loss
from llama2_lit.stages.reward import RewardModule
from llama2_lit.stages.sft import SFTModule

__all__ = [
    "NonFiniteLossError",
    "PretrainModule",
    "RewardModule",
    "SFTModule",
    "StageModule",
    "next_token_loss",
    "optimizer_param_groups",
    "warmup_cosine_lr",
]
