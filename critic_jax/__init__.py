"""critic_jax: the critic (value model) of PPO-style RLHF for language models, in JAX.

The pure functions below take arrays with the time axis last (`[..., T]`), aligned to token
positions, and a mask that is nonzero on action tokens. They work under `jax.jit`, `jax.vmap` and
`jax.grad`, return float32, and ignore whatever is stored at masked positions.
"""

from critic_jax.advantages import compute_gae, decoupled_gae, length_adaptive_lam, td_errors
from critic_jax.losses import hl_gauss_loss, hl_gauss_probs, value_loss
from critic_jax.masking import masked_mean, masked_var, masked_whiten
from critic_jax.metrics import explained_variance, value_metrics
from critic_jax.rewards import kl_penalty, token_rewards

__version__ = "0.1.0"

__all__ = (
    "compute_gae",
    "decoupled_gae",
    "explained_variance",
    "hl_gauss_loss",
    "hl_gauss_probs",
    "kl_penalty",
    "length_adaptive_lam",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "td_errors",
    "token_rewards",
    "value_loss",
    "value_metrics",
)
