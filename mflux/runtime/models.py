"""The modules of one model folder, as the engine asks for them: each loaded on first use, freed on request.

`Flux1`, the server's workers (through `Flux1`) and the trainer hold one. On CUDA the first load starts
the warm-up's children (`cuda.warmup`), a generation runs uncompiled until they are done, and the
transformer may be read in a thread while the prompts encode (`cuda.load.overlaps`).
"""

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn

from mflux.runtime import device, engine, trace
from mflux.runtime.folder import ModelFolder
from mflux.runtime.loader import check_quantize, load_component
from mflux.runtime.quantization import QuantSpec

LOW_MEMORY_T5_BITS = 4  # low memory's T5: 2.7 GB instead of 9.5 GB at bf16
# MLX's cache of freed buffers under low memory: small, so what one component frees is given back before
# the next loads (MLX's default keeps up to the memory limit)
LOW_MEMORY_CACHE_BYTES = 256 * 2**20


class Models:
    def __init__(
        self,
        folder: ModelFolder,
        dtype: mx.Dtype,
        quantize: QuantSpec | None = None,
        lora_paths: list | None = None,
        lora_scales: list[float] | None = None,
        low_memory: bool = False,
    ):
        check_quantize(folder, quantize)
        self.folder, self.dtype, self.quantize = folder, dtype, quantize
        self.low_memory = low_memory  # T5 at no more than 4 bits; nothing read ahead
        self.lora_paths, self.lora_scales = list(lora_paths or []), list(lora_scales or [])
        self.modules: dict[str, nn.Module] = {}
        self.loading = 0.0  # seconds spent loading so far, which callers keep apart from their phases
        self._tokenizers = None
        self._pending: Future | None = None  # the transformer being read in a thread (`prefetch`)
        self._warmup = None  # CUDA's warm-up, once asked for (False: none runs)

    def get(self, component: str) -> nn.Module:
        if component not in self.modules:
            cuda = device.cuda()
            if cuda and self._warmup is None:  # children build the compiled graphs' kernels meanwhile
                self._warmup = cuda.warmup.start(self.dtype) or False
            start = time.perf_counter()
            if component == "transformer" and self._pending is not None:
                pending, self._pending = self._pending, None
                module = pending.result()  # re-raises the thread's error here
            else:
                module = self._load(component)
            self.modules[component] = module
            self.loading += time.perf_counter() - start
            if component == "transformer":  # the last of the weights a step needs (the VAE is small)
                trace.mark("weights ready")
        return self.modules[component]

    def _load(self, component: str) -> nn.Module:
        module = load_component(self.folder, component, self.dtype, self.spec(component))
        # LoRAs go on each component as it loads: the text encoders load lazily, and again after freeing
        if self.lora_paths:
            from mflux.runtime.lora import apply_loras

            apply_loras({component: module}, self.lora_paths, self.lora_scales)
        return module

    def spec(self, component: str) -> QuantSpec | None:
        """The quantization a component loads with: low memory takes an unquantized or wider T5 to 4 bits
        (9.5 GB -> 2.7 GB at full size); a stored quantized T5 stays as stored."""
        stored = (self.folder.quantization or {}).get(component)
        if self.low_memory and component == "text_encoder_2" and stored is None:
            if self.quantize is None or self.quantize.bits > LOW_MEMORY_T5_BITS:
                return QuantSpec(LOW_MEMORY_T5_BITS)
        return self.quantize

    def tokenizers(self) -> tuple:
        if self._tokenizers is None:
            from mflux.runtime.tokenizers import load_tokenizers

            self._tokenizers = load_tokenizers(self.folder.path)
        return self._tokenizers

    def prefetch(self) -> None:
        """Where the CUDA tuning overlaps them, load the text encoders, then start reading the
        transformer in a thread, so that the read overlaps the prompt encoding."""
        cuda = device.cuda()
        if self.low_memory or not (cuda and cuda.load.overlaps(self.folder, self.quantize)):
            return
        if "transformer" in self.modules or self._pending is not None:
            return
        self.get("text_encoder")
        self.get("text_encoder_2")
        pool = ThreadPoolExecutor(1, thread_name_prefix="mflux-prefetch")
        self._pending = pool.submit(self._load, "transformer")
        pool.shutdown(wait=False)

    def free(self, *components: str) -> None:
        for c in components:
            self.modules.pop(c, None)
        mx.clear_cache()

    def generate(self, request: engine.Request) -> Iterator:
        """`engine.generate` over these modules; on CUDA each event is made uncompiled while the warm-up's
        children still build (decided again before each, so it compiles from the step after they end)."""
        events = engine.generate(self, request)
        cuda = device.cuda()
        if cuda:
            events = cuda.warmup.compile_when_ready_each(events, lambda: self._warmup)
        return events


def default_batch_size(n_images: int) -> int:
    """Images denoised at once when the caller does not say: 1 where batching gains nothing (a CPU) or
    memory is tight (a Mac's unified memory); the CUDA tuning's batch size there."""
    cuda = device.cuda()
    return min(n_images, cuda.TUNING.batch_size) if cuda else 1
