"""critic_jax: the critic (value model) of PPO-style RLHF for language models, in JAX.

The pure functions below take arrays with the time axis last (`[..., T]`), aligned to token
positions, and a mask that is nonzero on action tokens. They work under `jax.jit`, `jax.vmap` and
`jax.grad`, return float32, and ignore whatever is stored at masked positions.
"""

import importlib

# Where each public name lives. The names load on first use, so that `critic-jax` can install its
# signal handlers before JAX starts (a Ctrl-C during JAX's import must not crash the process).
_EXPORTS = {
    "compute_gae": "advantages",
    "decoupled_gae": "advantages",
    "length_adaptive_lam": "advantages",
    "td_errors": "advantages",
    "hl_gauss_loss": "losses",
    "hl_gauss_probs": "losses",
    "value_loss": "losses",
    "masked_mean": "masking",
    "masked_var": "masking",
    "masked_whiten": "masking",
    "explained_variance": "metrics",
    "value_metrics": "metrics",
    "kl_penalty": "rewards",
    "token_rewards": "rewards",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"critic_jax.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'critic_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


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
