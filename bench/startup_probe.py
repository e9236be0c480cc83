"""How long a semi-PD engine takes to start on the GPU, and its latency profile on the full and quick grids.

    python3 bench/startup_probe.py MODEL_DIR
"""

from __future__ import annotations

import logging
import sys
import time

from actors.slo.profiler import ProfileConfig, profile_engine
from cluster.bench.engine_bench import make_core


def main(model_dir: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    core = make_core(model_dir, "semi-pd")
    print(f"semi-pd engine built in {time.perf_counter() - t0:.1f} s; splits {core.partitioner.splits}", flush=True)
    for name, grid in (("full", ProfileConfig()), ("quick", ProfileConfig.quick())):
        t0 = time.perf_counter()
        profile_engine(core, grid)
        print(f"{name}-grid latency profile in {time.perf_counter() - t0:.1f} s", flush=True)
    core.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
