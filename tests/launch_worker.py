"""main_jit.py with a delay put into one rank, for the timeout tests of test_launch.py (under torchrun):

launch_worker.py slow_save SECONDS MAIN_ARGS...   rank 0's checkpoint writes each take SECONDS more
launch_worker.py stuck SECONDS MAIN_ARGS...       rank 1 stops for SECONDS before its first step
launch_worker.py slow_steps SECONDS MAIN_ARGS...  every step takes SECONDS more (a run that lasts)
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine_jit  # noqa: E402
import main_jit  # noqa: E402
from util import checkpoint  # noqa: E402

mode, seconds, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
rank = int(os.environ.get("RANK", 0))
if mode == "slow_save":
    real_save = checkpoint.save

    def slow_save(state, path):
        time.sleep(seconds)
        real_save(state, path)

    checkpoint.save = slow_save
elif mode == "slow_steps":
    real_step = engine_jit.train_step

    def slow_step(*args, **kwargs):
        time.sleep(seconds)
        return real_step(*args, **kwargs)

    engine_jit.train_step = slow_step
elif mode == "stuck" and rank == 1:
    real_step = engine_jit.train_step

    def stuck_once(*args, **kwargs):
        engine_jit.train_step = real_step
        time.sleep(seconds)
        return real_step(*args, **kwargs)

    engine_jit.train_step = stuck_once
sys.exit(main_jit.cli(argv))
