"""`python -m critic_jax` runs the command line (`critic-jax`)."""

# `_signal`, not `signal`: importing `signal` builds its enums, which takes long enough for an
# early Ctrl-C to land inside it. The handlers are set before anything else is imported.
import _signal
import os


def _exit_on_signal(signum, frame):  # until the CLI installs its own handlers
    os.write(2, b"critic-jax: interrupted during start-up; nothing was saved\n")
    os._exit(128 + signum)


for _sig in (_signal.SIGINT, _signal.SIGTERM):
    _signal.signal(_sig, _exit_on_signal)

import sys  # noqa: E402

from critic_jax.cli import main  # noqa: E402 - after the handlers, so JAX's import is covered

sys.exit(main())
