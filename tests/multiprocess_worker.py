"""One process of a multi-process CPU training run (started by test_multiprocess.py).

usage: python multiprocess_worker.py LOCAL_DEVICES CONFIG_JSON
The coordinator address, process count and id come from JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, as on a cluster.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))
jax.config.update("jax_cpu_collectives_implementation", "gloo")

from critic_jax import config as config_lib  # noqa: E402
from critic_jax import train as train_lib  # noqa: E402

cfg = config_lib.from_dict(config_lib.TrainConfig, json.loads(sys.argv[2]))
summary = train_lib.train(cfg)
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), **summary}))
