"""Reading a component onto the GPU faster than one thread on MLX's default stream can.

- Several threads (`Tuning.load_threads`), each over a run of the layers: one thread moved about 2 GB/s
  from the page cache onto an H200, eight 4.4 GB/s. MLX evaluates an array only on the thread that
  built its graph, so each thread builds its own lazy copy of the weights.
- Where a component's load is the read alone (MLX-native shards, or the Hugging Face text encoders, in
  the dtype asked for, not quantized now) and its files are at least `Tuning.cpu_read_min_bytes`, it is
  read on MLX's CPU stream (about twice the GPU stream's rate) into managed memory, moved to the GPU in
  bulk by the driver (`driver.prefetch`), and copied into the device's own memory (`_device_copy`).
  Whether it is is decided from the headers first: never take the host pointer of an array the GPU
  computed, since MLX then moves its buffer into managed memory.
- `overlaps`: the transformer may be read while the prompts encode, where memory holds both.
"""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx

from mflux.runtime import loader
from mflux.runtime.cuda import driver, tuning
from mflux.runtime.weights import DTYPE_NAMES, TensorSource

# the Hugging Face layout's components whose weights are the files' tensors renamed (`converters.diffusers`)
RENAMED_ONLY = {"text_encoder", "text_encoder_2"}
OVERLAPPED = ("text_encoder", "text_encoder_2", "transformer")


def overlaps(folder, quantize) -> bool:
    """Whether to read the transformer while the prompts encode: the tuning says so, nothing is
    quantized (stored or now: who quantizes asks for memory) and the device's memory is at least twice
    the files of T5, CLIP and the transformer, which are then held at once."""
    if not tuning().overlap_load or quantize is not None or folder.quantization:
        return False
    info = mx.device_info()
    total = info.get("total_memory") or info.get("memory_size") or 0
    files = sum(f.stat().st_size for c in OVERLAPPED for f in (folder.path / c).glob("*.safetensors"))
    return 0 < 2 * files <= total


def read(weights: dict, lazy_weights, where: Path, component: str, fmt: str, dtype, spec) -> dict:
    """`weights` (name -> lazy array) evaluated by `Tuning.load_threads` threads, each over a contiguous
    run of the layers (a layer's weight, scales and biases in one run). Each thread calls
    `lazy_weights(stream)` for its own lazy copy (headers read and renamed again: milliseconds)."""
    on_cpu = reads_on_cpu(where, component, fmt, dtype, spec)
    layers: dict[str, list[str]] = {}
    for name in weights:
        layers.setdefault(name.rpartition(".")[0], []).append(name)
    sizes = [sum(weights[n].nbytes for n in names) for names in layers.values()]
    runs = _split(list(layers.values()), sizes, tuning().load_threads)

    def read_run(run: list[list[str]]) -> dict:
        mine = lazy_weights(mx.cpu if on_cpu else None)
        out = {n: mine.pop(n) for names in run for n in names}
        del mine  # `out` holds its run's only references, so each original goes once copied
        return evaluate(out, on_cpu)

    result = {}
    with ThreadPoolExecutor(len(runs), thread_name_prefix="mflux-load") as pool:
        for part in pool.map(read_run, runs):  # re-raises a thread's error here
            result.update(part)
    return {n: result[n] for n in weights}  # the order the module's loading expects


def reads_on_cpu(where: Path, component: str, fmt: str, dtype, spec) -> bool:
    """Whether the component is read on MLX's CPU stream: the load only reads (MLX-native shards or
    the HF layout's `RENAMED_ONLY`, not quantized now, every float stored in `dtype` already), and
    its files hold at least `Tuning.cpu_read_min_bytes`."""
    floor = tuning().cpu_read_min_bytes
    if floor is None or spec is not None:
        return False
    if not (fmt == "mlx" or (fmt == "hf" and component in RENAMED_ONLY)):
        return False
    source = TensorSource([where]) if Path(where).is_file() else loader.folder_source(where)
    if sum(f.path.stat().st_size for f in source.files) < floor:
        return False
    stored = {getattr(mx, DTYPE_NAMES[source.dtype(name)]) for name in source.keys()}
    return all(d == dtype or not mx.issubdtype(d, mx.floating) for d in stored)


def evaluate(weights: dict, on_cpu: bool) -> dict:
    """`loader.groups` evaluated one after another; read on the CPU stream (`on_cpu`), each group is
    moved onto the device and copied into its own memory, and this returns once all are there."""
    out = {}
    for group in loader.groups(weights):
        arrays = list(group.values())
        mx.eval(arrays)
        if on_cpu:
            if not driver.prefetch(arrays):
                _move_to_device(arrays)
            driver.prefetch_wait()  # the copies read device pages, not host pages by faults
            group = {n: _device_copy(a) for n, a in group.items()}
            mx.eval(list(group.values()))
        out.update(group)
    return out


def _device_copy(a: mx.array) -> mx.array:
    """A bit-exact copy of `a` made on the default stream (on CUDA, in the device's own memory): an
    integer view OR 0, which no backend rewrites or gives the source's buffer (the source is alive)."""
    if not a.size:
        return a
    raw = a.view({1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.itemsize])
    return mx.bitwise_or(raw, mx.array(0, raw.dtype)).view(a.dtype)


def _move_to_device(arrays: list) -> None:
    """Read every array once on the GPU (a reduction each), where the driver can't move them in bulk."""
    mx.eval([mx.max(a) for a in arrays if a.size])


def _split(items: list, sizes: list[int], n: int) -> list[list]:
    """`items` cut into at most n contiguous runs of about equal total size."""
    total = sum(sizes)
    runs, run, done = [], [], 0
    for item, size in zip(items, sizes):
        run.append(item)
        done += size
        if done >= total * (len(runs) + 1) / n and len(runs) < n - 1:
            runs.append(run)
            run = []
    return [r for r in [*runs, run] if r]
