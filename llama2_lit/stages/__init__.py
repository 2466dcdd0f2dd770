"""Training stages as LightningModules on one shared base (see ``base.py``).

``PretrainModule`` (paper section 2.2) and ``SFTModule`` (section 3.1) are here; later stages
(reward models, PPO, ...) subclass ``StageModule`` the same way. ``llama2-lit fit --config
configs/<size>/<stage>.yaml`` runs them through the Lightning CLI (``cli.py``).
"""

from llama2_lit.stages.base import NonFiniteLossError, StageModule, optimizer_param_groups, warmup_cosine_lr
from llama2_lit.stages.pretrain import PretrainModule, next_token_loss
from llama2_lit.stages.ppo import PPOModule
from llama2_lit.stages.sft import SFTModule

__all__ = [
    "NonFiniteLossError",
    "PPOModule",
    "PretrainModule",
    "SFTModule",
    "StageModule",
    "next_token_loss",
    "optimizer_param_groups",
    "warmup_cosine_lr",
]
