"""Training stages as LightningModules on one shared base (see ``base.py``).

``PretrainModule`` (paper section 2.2), ``SFTModule`` (section 3.1), ``RewardModule`` (section
3.2.2) and ``PPOModule`` (section 3.2.3) are here, each a short subclass of ``StageModule``.
``llama2-lit fit --config configs/<size>/<stage>.yaml`` runs them through the Lightning CLI
(``cli.py``).
"""

from llama2_lit.stages.base import NonFiniteLossError, StageModule, optimizer_param_groups, warmup_cosine_lr
from llama2_lit.stages.pretrain import PretrainModule, next_token_loss
from llama2_lit.stages.ppo import PPOModule
from llama2_lit.stages.reward import RewardModule
from llama2_lit.stages.sft import SFTModule

__all__ = [
    "NonFiniteLossError",
    "PPOModule",
    "PretrainModule",
    "RewardModule",
    "SFTModule",
    "StageModule",
    "next_token_loss",
    "optimizer_param_groups",
    "warmup_cosine_lr",
]
