"""Print images per second per variant from a ``benchmarks/run.py`` JSON file (used by gpu_check.sh)."""
from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    r = json.load(open(path))["steps"]
    for label, v in r["variants"].items():
        mem = f", peak {v['peak_gpu_mem_mib']:.0f} MiB" if "peak_gpu_mem_mib" in v else ""
        print(f"{label:>7}: {v['images_per_s']:8.1f} images/s  step {1000 * v['median_s']:7.1f} ms  "
              f"x sup {v['ratio_vs_sup']:.2f}  data wait {100 * v['data_wait_share']:.1f}%{mem}")


if __name__ == "__main__":
    main(sys.argv[1])
