"""Test-wide setup: 8 fake CPU devices, so sharding tests run on any machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Must happen before any JAX computation; single-device tests simply use device 0.
jax.config.update("jax_num_cpu_devices", 8)
