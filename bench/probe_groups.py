"""The loader's group size against its read (issue 12, target 2): each component of an MLX-native model
loaded with `loader.LOAD_STREAM` gpu and cpu-copy, the latter with several `loader.EVAL_GROUP_BYTES`,
twice each, as JSON lines (seconds, GB/s, MLX's peak).

    python bench/probe_groups.py MODEL_FOLDER [--mib 16,64,256]
"""

import argparse
import json
import time

import mlx.core as mx

from mflux.folders import open_folder
from mflux.runtime import loader
from mflux.runtime.device import backend
from mflux.runtime.folder import COMPONENTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--mib", default="16,64,256")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    folder = open_folder(args.folder)
    ways = [("default", 16)] + [("cpu-copy", int(m)) for m in args.mib.split(",")]
    for _ in range(args.repeat):
        for how, mib in ways:
            loader.LOAD_STREAM[backend()], loader.EVAL_GROUP_BYTES = how, mib * 2**20
            mx.clear_cache()
            mx.reset_peak_memory()
            line = {"what": "groups", "stream": how, "group_mib": mib}
            total_s = total_b = 0.0
            for c in COMPONENTS:
                size = sum(f.stat().st_size for f in (folder.path / c).glob("*.safetensors"))
                t = time.perf_counter()
                module = loader.load_component(folder, c, mx.bfloat16)
                mx.synchronize()
                s = time.perf_counter() - t
                del module
                line[f"{c}_s"] = round(s, 3)
                total_s, total_b = total_s + s, total_b + size
            line |= {"s": round(total_s, 3), "gb_per_s": round(total_b / 1e9 / total_s, 2)}
            line["peak_gb"] = round(mx.get_peak_memory() / 1e9, 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
