"""The critic model: a Llama-family decoder in Flax NNX, value heads, Hugging Face import/export.

Three ways to start a critic:

    critic = Critic(ModelConfig.tiny(vocab_size=256), rngs=nnx.Rngs(0))   # random, V = 0
    critic = critic_from_hf("path/to/reward_model")   # ...ForSequenceClassification: trunk + score
    critic = critic_from_hf("path/to/sft_model")      # ...ForCausalLM: trunk, fresh zero head
    config = ModelConfig.from_preset("llama3.2-1b", num_layers=2, dtype="bfloat16", remat="full")

Trainers take the parameters with `graphdef, params = nnx.split(critic, nnx.Param)`.
"""

from critic_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from critic_jax.models.config import PRESETS, REMAT_POLICIES, ModelConfig
from critic_jax.models.critic import ActorCritic, Critic, HLGaussHead, ValueHead
from critic_jax.models.hf import actor_critic_from_hf, config_from_hf, critic_from_hf, critic_to_hf
from critic_jax.models.transformer import Transformer

__all__ = (
    "ATTENTION_IMPLEMENTATIONS",
    "PRESETS",
    "REMAT_POLICIES",
    "ActorCritic",
    "Critic",
    "HLGaussHead",
    "ModelConfig",
    "Transformer",
    "ValueHead",
    "actor_critic_from_hf",
    "config_from_hf",
    "critic_from_hf",
    "critic_to_hf",
)
