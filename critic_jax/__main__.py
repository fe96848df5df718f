"""`python -m critic_jax` runs the command line (`critic-jax`)."""

import sys

from critic_jax.cli import main

sys.exit(main())
