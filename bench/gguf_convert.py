"""Peak memory of `mflux convert FILE.gguf`: a GGUF of the FLUX.1 transformer at full width (3072 wide,
MLP 12288, T5 context 4096) with a few blocks, written here, converted in a child process whose anonymous
memory (RssAnon in /proc/self/status, sampled every 2 ms) is reported above its baseline after imports.

    python bench/gguf_convert.py                      # 2 double and 2 single blocks: about 1 GB
    python bench/gguf_convert.py --dtype float32 --keep

The file mixes types as the shared ones do: Q4_K (random but valid blocks) for the single blocks'
linear1 and linear2, Q8_0 (random too) for every other weight, F32 for 1-D tensors. The text encoders,
VAE and tokenizers come from a tiny random base (tests/fixtures.py), so the figure is the transformer's.
The file's data is memory-mapped, so it counts in the page cache (RssFile), not in RssAnon.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import parser, report

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_gguf(path: Path, double: int, single: int) -> dict:
    import gguf

    from tests.test_convert import bfl_shapes
    from tests.test_gguf import close, random_blocks

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "flux", use_temp_file=True)
    types = {}
    for name, shape in bfl_shapes(3072, double, single, context=4096, pooled=768).items():
        if len(shape) == 1:
            types[name] = "F32"
            writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
        elif name.startswith("single_blocks.") and ".linear" in name:
            types[name] = "Q4_K"
            writer.add_tensor(
                name, random_blocks("Q4_K", shape, rng), raw_dtype=gguf.GGMLQuantizationType.Q4_K
            )
        else:
            types[name] = "Q8_0"
            writer.add_tensor(
                name, random_blocks("Q8_0", shape, rng), raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
    close(writer)
    return types


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--double", type=int, default=2, help="double blocks (default 2)")
    p.add_argument("--single", type=int, default=2, help="single blocks (default 2)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--keep", action="store_true", help="--keep-gguf-quantization")
    p.add_argument("--tmp", help="where the file and the store go (default: a temporary folder)")
    args = p.parse_args(argv)
    from tests.fixtures import build_tiny_pipeline
    from tests.test_gguf import measured_convert

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        path = tmp / "flux1-schnell-bench.gguf"
        types = write_gguf(path, args.double, args.single)
        base = build_tiny_pipeline(tmp / "FLUX.1-schnell", "schnell")
        env = {**os.environ, "MFLUX_HOME": str(tmp / "store"), "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        child = measured_convert(path, base, args.dtype, args.keep, env)
        report(
            what="gguf_convert",
            double=args.double,
            single=args.single,
            types=sorted(set(types.values())),
            dtype=args.dtype,
            keep=args.keep,
            file_gb=path.stat().st_size / 1e9,
            stored_gb=child["stored"] / 1e9,
            peak_anon_mb=(child["peak"] - child["baseline"]) / 1e6,
            baseline_anon_mb=child["baseline"] / 1e6,
            s=child["s"],
            wall_s=time.perf_counter() - start,
        )


if __name__ == "__main__":
    main()
