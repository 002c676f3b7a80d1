"""One process of a 2-process M4 run on loopback (started by test_m4_stream.py).

    python tests/m4_process.py PROCESS_ID PORT SHARD_DIR OUT.npz
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=2 "
                           "--xla_backend_optimization_level=0")  # as conftest.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main():
  pid, port, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=pid, initialization_timeout=120)
  from tests.test_m4_stream import distributed_config  # pylint: disable=g-import-not-at-top
  from siglip_fair.balance import stream  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == 2 and len(jax.devices()) == 4
  result = stream.balance_stream(folder, distributed_config(), jax.random.key(5))
  np.savez(out, q=result.q, keep=result.keep, rows=result.rows,
           card=np.array(json.dumps(result.card)), devices=result.card["solved_on"]["n"])
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
