"""The Python API: `Flux1` loads a model once and generates many images; `Config` holds one image's settings."""

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mflux.backend import default_precision, import_mlx
from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime import pipeline, sampler
from mflux.runtime.loader import ModelFolder, check_quantize, load_component, load_tokenizers, open_folder
from mflux.runtime.quantization import AFFINE_BITS, QuantSpec

PRECISIONS = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_QUANT_NAME = re.compile(r"^(?P<base>.+)-q(?P<bits>\d)$")


@dataclass
class Config:
    num_inference_steps: int | None = None  # None: the model's default (schnell 4, dev 25)
    height: int = 1024
    width: int = 1024
    guidance: float = 3.5  # dev only; schnell has no guidance embedder
    max_sequence_length: int | None = None  # None: the model's default (schnell 256, dev 512)

    def __post_init__(self):
        for side in ("height", "width"):
            v = getattr(self, side)
            if not isinstance(v, int) or v <= 0 or v % 16:
                raise InvalidArgument(f"{side} must be a positive multiple of 16, got {v!r}")
        if self.num_inference_steps is not None and (
            not isinstance(self.num_inference_steps, int) or self.num_inference_steps <= 0
        ):
            raise InvalidArgument(f"steps must be a positive integer, got {self.num_inference_steps!r}")
        if self.max_sequence_length is not None and not 0 < self.max_sequence_length <= 512:
            raise InvalidArgument(f"max_sequence_length must be in 1..512, got {self.max_sequence_length}")


@dataclass
class GeneratedImage:
    image: Image.Image
    metadata: dict = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)  # phase -> bytes, MLX's allocator peak

    def save(self, path: str | Path, export_json_metadata: bool = False, overwrite: bool = True) -> Path:
        from mflux.metadata import save_png

        return save_png(self.image, Path(path), self.metadata, export_json_metadata, overwrite)


class Flux1:
    """FLUX.1 schnell or dev, from a store model or a folder (Hugging Face layout or MLX-native)."""

    def __init__(
        self,
        folder: ModelFolder,
        precision: str | None = None,
        quantize: int | None = None,
        lora_paths: list[str] | None = None,
        lora_scales: list[float] | None = None,
    ):
        import_mlx()
        precision = precision or default_precision()
        if precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if quantize is not None and quantize not in AFFINE_BITS:
            raise InvalidArgument(
                f"quantize must be one of {', '.join(map(str, AFFINE_BITS))}, got {quantize}"
            )
        self.folder = folder
        self.precision = precision
        self.dtype = getattr(mx, precision)
        self.quantize = QuantSpec(quantize) if quantize is not None else None
        check_quantize(folder, self.quantize)
        self.lora_paths = list(lora_paths or [])
        self.lora_scales = _lora_scales(self.lora_paths, lora_scales)
        self._modules: dict = {}
        self._tokenizers = None
        self._cache: tuple | None = None  # (key, txt, pooled): the last prompt's conditioning
        self._mods: tuple | None = None  # (key, modulations): the last image's, reused by the next seed
        # False: drop the transformer's conditioning layers (3.2B parameters at full size) once an image's
        # modulations are computed; a later prompt or schedule reloads the transformer.
        self.keep_modulation_weights = True

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> "Flux1":
        return cls(open_folder(path), **kwargs)

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "Flux1":
        """A store model by name; `<base>-q<bits>` quantizes a stored `<base>` at load time. Never downloads."""
        from mflux.store import Store

        store = Store()
        if not store.exists(name):
            m = _QUANT_NAME.match(name)
            if m and store.exists(m["base"]):
                if kwargs.get("quantize") not in (None, int(m["bits"])):
                    raise InvalidArgument(f"{name} means {m['bits']}-bit, but quantize={kwargs['quantize']}")
                kwargs["quantize"] = int(m["bits"])
                name = m["base"]
            else:
                _missing(store, name)
        return cls(open_folder(store.path(name), name=name), **kwargs)

    @classmethod
    def from_alias(cls, alias: str, **kwargs) -> "Flux1":
        return cls.from_name(alias, **kwargs)

    @property
    def variant(self) -> str:
        return self.folder.variant

    @property
    def model_name(self) -> str:
        return self.folder.name + (f"-q{self.quantize.bits}" if self.quantize else "")

    def load(self) -> float:
        """Load the transformer and the VAE now (else the first image does), in seconds. Weights load
        lazily so that a caller can encode its prompts and free T5 and CLIP first: peak memory is then
        the larger of the two halves, not their sum (what lets a 16 GB Mac run schnell-q8)."""
        return self._load(("transformer", "vae"))

    def _load(self, components) -> float:
        start = time.perf_counter()
        loaded = {}
        for c in components:
            if c not in self._modules:
                self._modules[c] = loaded[c] = load_component(self.folder, c, self.dtype, self.quantize)
        # LoRAs go on each component as it loads: the text encoders load lazily, and again after freeing.
        if self.lora_paths and loaded:
            from mflux.runtime.lora import apply_loras

            apply_loras(loaded, self.lora_paths, self.lora_scales)
        return time.perf_counter() - start

    def _modulations(self, pooled: mx.array, sigmas: list[float], guidance: float | None) -> mx.array:
        key = (self._cache[0] if self._cache else None, tuple(sigmas), guidance)
        if self._mods and self._mods[0] == key:
            return self._mods[1]
        if not self.keep_modulation_weights and "time_in" not in self._modules["transformer"]:
            # freed after an earlier image: a new prompt or schedule needs them back
            self._modules.pop("transformer")
            self._load(("transformer",))
        mods = pipeline.modulations(self._modules["transformer"], pooled, sigmas, guidance)
        mx.eval(mods)
        self._mods = (key, mods)
        if not self.keep_modulation_weights:
            self._modules["transformer"].free_modulation_weights()
            mx.clear_cache()
        return mods

    def free_text_encoders(self) -> None:
        """Drop T5 and CLIP (about 10 GB at bf16); a later prompt reloads them."""
        self._modules.pop("text_encoder", None)
        self._modules.pop("text_encoder_2", None)
        mx.clear_cache()

    def encode(self, prompt: str, max_sequence_length: int) -> tuple[mx.array, mx.array]:
        key = (prompt, max_sequence_length)
        if self._cache and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        from mflux.runtime.tokenizers import clip_ids, t5_ids

        self._load(("text_encoder", "text_encoder_2"))
        if self._tokenizers is None:
            self._tokenizers = load_tokenizers(self.folder)
        clip_tok, t5_tok = self._tokenizers
        txt, pooled = pipeline.encode_prompt(
            self._modules["text_encoder"],
            self._modules["text_encoder_2"],
            clip_ids(clip_tok, [prompt]),
            t5_ids(t5_tok, [prompt], max_sequence_length),
            self.dtype,
        )
        mx.eval(txt, pooled)
        self._cache = (key, txt, pooled)
        return txt, pooled

    def generate_image(
        self,
        seed: int,
        prompt: str,
        config: Config | None = None,
        latents: np.ndarray | None = None,
        progress=None,
    ) -> GeneratedImage:
        """One image. `latents` are diffusers' packed initial latents (1, H*W/256, 64); else noise from `seed`.

        `progress(step, total)`, if given, is called after each denoising step.
        """
        config = config or Config()
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidArgument("prompt must be a non-empty string")
        d = self.folder.defaults
        steps = config.num_inference_steps or d["steps"]
        seq_len = config.max_sequence_length or d["max_sequence_length"]
        h, w = config.height, config.width
        shape = (1, (h // 16) * (w // 16), 64)
        if latents is None:
            x = sampler.noise(seed, h, w)
        else:
            latents = np.asarray(latents)
            if latents.shape != shape:
                raise InvalidArgument(f"latents must have shape {shape} for {w}x{h}, got {latents.shape}")
            x = mx.array(latents.astype(np.float32))
        x = x.astype(self.dtype)

        phases = Phases()
        with phases("text_encoding"):
            txt, pooled = self.encode(prompt, seq_len)

        self._load(("transformer", "vae"))
        sched = self.folder.architecture["scheduler"]
        sigmas = sampler.sigmas(
            steps,
            shape[1],
            shift=bool(sched.get("use_dynamic_shifting")),
            base_seq_len=sched.get("base_image_seq_len", 256),
            max_seq_len=sched.get("max_image_seq_len", 4096),
            base_shift=sched.get("base_shift", 0.5),
            max_shift=sched.get("max_shift", 1.15),
        )
        guidance = config.guidance if self.variant == "dev" else None
        with phases("denoising"):
            mods = self._modulations(pooled, sigmas, guidance)
            steps_iter = pipeline.denoise(
                self._modules["transformer"], txt, pooled, x, sigmas, h, w, guidance, mods
            )
            for i, x in enumerate(steps_iter, 1):
                mx.eval(x)
                if progress:
                    progress(i, steps)
        with phases("decoding"):
            pixels = pipeline.decode(self._modules["vae"], x, h, w)
        metadata = {
            "prompt": prompt,
            "model": self.model_name,
            "variant": self.variant,
            "seed": seed,
            "steps": steps,
            "guidance": guidance,
            "height": h,
            "width": w,
            "precision": self.precision,
            "quantization": self.quantization_summary(),
            "lora_paths": [str(p) for p in self.lora_paths],
            "lora_scales": self.lora_scales,
            "timings": {k: round(v, 3) for k, v in phases.seconds.items()},
        }
        return GeneratedImage(Image.fromarray(pixels[0]), metadata, phases.peak_bytes)

    def quantization_summary(self) -> str | None:
        if self.quantize:
            return f"{self.quantize.bits}-bit affine (group size {self.quantize.group_size}, at load time)"
        q = self.folder.quantization
        if not q:
            return None
        parts = sorted({f"{v['bits']}-bit {v.get('mode', 'affine')}" for v in q.values()})
        return ", ".join(parts) + " (stored)"


class Phases:
    """Times and peak memory of named phases: `with phases("decoding"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextmanager
    def __call__(self, name: str):
        mx.reset_peak_memory()
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.peak_bytes[name] = mx.get_peak_memory()


def _lora_scales(paths: list, scales: list[float] | None) -> list[float]:
    if scales is None or len(scales) == 0:
        return [1.0] * len(paths)
    if len(scales) != len(paths):
        raise InvalidArgument(
            f"got {len(paths)} LoRA paths but {len(scales)} scales; give one scale per LoRA"
        )
    return [float(s) for s in scales]


def _missing(store, name: str) -> None:
    from mflux.catalog import catalog

    m = _QUANT_NAME.match(name)
    base = m["base"] if m else name
    if base in catalog():
        raise MfluxError(f"model {name!r} is not in the store (get it with: mflux pull {base})")
    store.get(name)  # the unknown-model error, with close names
    raise MfluxError(f"model {name!r} is not in the store (get it with: mflux pull)")
