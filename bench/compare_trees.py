"""One schnell image (1024x1024, 4 steps, seed 7) and the median transformer step of whichever mflux is
importable, as a JSON line: the image's sha256 says whether two trees (or two runs of one) give the same
bits. `bash bench/gpu.sh compare DIR` installs another tree beside this one and runs both, interleaved.

    PYTHONPATH=/tmp/site-old python bench/compare_trees.py --folder /var/tmp/flux-random --label old
    PYTHONPATH=/tmp/site-new python bench/compare_trees.py --folder /var/tmp/flux-random --label new -q 8

Run each tree in its own process, with a warm kernel cache (a first run per tree and quantization fills
it). `--time-steps N` adds an N-step generation timed step by step (each step's latents are evaluated
before the callback); the median leaves out the first.
"""

import argparse
import hashlib
import json
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", required=True, help="a model folder (Hugging Face layout or MLX-native)")
    p.add_argument("--label", default="", help="a name for this tree in the output")
    p.add_argument("-q", "--quantize", type=int, default=None, help="bits to quantize to at load time")
    p.add_argument("--time-steps", type=int, default=0, help="also time an N-step generation, step by step")
    p.add_argument("--side", type=int, default=1024, help="the image's width and height (default 1024)")
    p.add_argument("--png", help="where to save the image")
    a = p.parse_args()

    start = time.perf_counter()
    import mlx.core as mx

    import mflux
    from mflux import Config, Flux1

    flux = Flux1.from_path(a.folder, quantize=a.quantize)
    image = flux.generate_image(
        7, "a lighthouse at dusk", Config(num_inference_steps=4, height=a.side, width=a.side)
    )
    pixels = np.array(image.image)
    record = {
        "label": a.label,
        "mflux": str(mflux.__file__),
        "quant": f"q{a.quantize}" if a.quantize else "bf16",
        "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
        "image_s": round(time.perf_counter() - start, 2),
        "timings": image.metadata.get("timings"),
    }
    if a.png:
        image.image.save(a.png)
    if a.time_steps:
        marks = []

        def mark(step, total):
            mx.synchronize()
            marks.append(time.perf_counter())

        cfg = Config(num_inference_steps=a.time_steps, height=a.side, width=a.side)
        flux.generate_image(8, "a lighthouse at dusk", cfg, progress=mark)
        steps = np.diff(marks)
        record.update(
            step_median_s=round(float(np.median(steps)), 5), steps_s=[round(float(s), 4) for s in steps]
        )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
