"""The Python API: `Flux1`, a facade over the runtime's `Models` (a model folder's modules) and engine;
`Config` holds the settings images share.

    flux = Flux1.from_name("schnell")
    image = flux.generate_image(seed=1, prompt="Luxury food photograph", config=Config(height=512, width=512))
    image.save("food.png")

The generation arguments that diffusers' pipelines take (`negative_prompt`, `true_cfg_scale`, `image`,
`mask_image`, `strength`) go on `generate_image`, `generate_images` and `generate`, with diffusers'
meanings. Store names and `-q<bits>` are resolved by the store (`Store.resolve`); the runtime only sees
the folder.
"""

import io
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from mflux.backend import default_precision, import_mlx
from mflux.errors import InvalidArgument, MfluxError
from mflux.folders import open_folder
from mflux.manifest import remake_hint
from mflux.runtime import engine, trace
from mflux.runtime.folder import VARIANTS, ModelFolder
from mflux.runtime.models import Models, default_batch_size
from mflux.runtime.quantization import AFFINE_BITS, QuantSpec

# the limits and defaults the CLI checks too (mflux.settings says why these)
from mflux.settings import DEFAULT_STRENGTH, MAX_PIXELS, MAX_SEED, MAX_SIDE, not_utf8, open_image, sha256

PRECISIONS = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass
class Config:
    num_inference_steps: int | None = None  # None: the model's default (schnell 4, dev 25)
    height: int = 1024
    width: int = 1024
    guidance: float | None = None  # None: the model's default (dev 3.5, kontext 2.5, fill 30); not schnell
    max_sequence_length: int | None = None  # None: the model's default (schnell 256, dev 512)

    def __post_init__(self):
        for side in ("height", "width"):
            v = getattr(self, side)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % 16:
                raise InvalidArgument(f"{side} must be a positive multiple of 16, got {v!r}")
            if v > MAX_SIDE:
                raise InvalidArgument(f"{side} {v} is above the maximum of {MAX_SIDE} pixels")
        if self.height * self.width > MAX_PIXELS:
            raise InvalidArgument(
                f"{self.width}x{self.height} is {self.width * self.height / 1e6:.1f} MP, above the maximum of "
                f"{MAX_PIXELS / 1e6:.1f} MP (2048x2048)"
            )
        if self.num_inference_steps is not None and (
            not isinstance(self.num_inference_steps, int) or self.num_inference_steps <= 0
        ):
            raise InvalidArgument(f"steps must be a positive integer, got {self.num_inference_steps!r}")
        if self.guidance is not None and (not np.isfinite(self.guidance) or self.guidance < 0):
            raise InvalidArgument(f"guidance must be a finite number, 0 or more, got {self.guidance}")
        if self.max_sequence_length is not None and not 0 < self.max_sequence_length <= 512:
            raise InvalidArgument(f"max_sequence_length must be in 1..512, got {self.max_sequence_length}")


@dataclass
class GeneratedImage:
    image: Image.Image
    metadata: dict = field(default_factory=dict)
    peak_memory: dict = field(default_factory=dict)  # phase -> bytes, MLX's allocator peak

    def save(self, path: str | Path, export_json_metadata: bool = False, overwrite: bool = False) -> Path:
        """Write a PNG with the generation settings inside; returns the path written. Like the CLI it
        never replaces a file: an existing name gets the first free `<stem>_N.png`, unless `overwrite`."""
        from mflux.metadata import save_png

        return save_png(self.image, Path(path), self.metadata, export_json_metadata, overwrite)

    def png_bytes(self) -> bytes:
        """The PNG file `save` would write, in memory."""
        from mflux.metadata import png_info

        buf = io.BytesIO()
        self.image.save(buf, format="PNG", pnginfo=png_info(self.metadata))
        return buf.getvalue()


@dataclass
class StepEvent:
    step: int  # 1-based
    total: int
    indices: list[int]  # the images being denoised, as positions in the seeds given
    previews: list[Image.Image] | None = None  # this step's latents decoded, when asked for
    latents: mx.array | None = (
        None  # (B, L, 64) packed latents after this step, as diffusers' callback sees them
    )


@dataclass
class ImageEvent:
    index: int  # position in the seeds given
    image: GeneratedImage
    batch: list[int]  # the images denoised together with this one (its metadata's timings are theirs)


class Flux1:
    """FLUX.1 schnell or dev, from a store model or a folder (Hugging Face layout or MLX-native)."""

    def __init__(
        self,
        folder: ModelFolder,
        precision: str | None = None,
        quantize: int | None = None,
        lora_paths: list[str] | None = None,
        lora_scales: list[float] | None = None,
        low_memory: bool = False,
    ):
        """`low_memory`: load one component at a time and free each after use (T5 and CLIP, then the
        transformer, then the VAE), T5 at 4 bits (unless stored quantized, or -q asks for fewer), the
        VAE decoded in row bands, MLX's buffer cache kept small. Its images equal the default path's at
        the same quantization of every component (e.g. both at quantize=4)."""
        import_mlx()
        precision = precision or default_precision()
        if precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if quantize is not None and quantize not in AFFINE_BITS:
            raise InvalidArgument(
                f"quantize must be one of {', '.join(map(str, AFFINE_BITS))}, got {quantize}"
            )
        self.folder = folder
        self.model_path: str | None = None  # the folder given to from_path, recorded in each image
        self.precision = precision
        self.dtype = getattr(mx, precision)
        self.quantize = QuantSpec(quantize) if quantize is not None else None
        self.lora_paths = [_lora_file(p) for p in lora_paths or []]
        self.lora_scales = _lora_scales(self.lora_paths, lora_scales)
        self.control_loras = _control_loras(self.lora_paths, folder)
        self.low_memory = low_memory
        self.models = Models(
            folder, self.dtype, self.quantize, self.lora_paths, self.lora_scales, low_memory=low_memory
        )

    @classmethod
    def from_path(
        cls, path: str | Path, variant: str | None = None, verify: bool = False, **kwargs
    ) -> "Flux1":
        """Any model folder; `variant` only where its architecture can't tell (see mflux.runtime.folder).
        Its images record the folder, so `mflux run --from` finds the same model again."""
        flux = cls(open_folder(path, variant=variant, verify=verify), **kwargs)
        flux.model_path = str(flux.folder.path.resolve())
        return flux

    @classmethod
    def from_name(cls, name: str, verify: bool = False, **kwargs) -> "Flux1":
        """A store model by name; `<base>-q<bits>` quantizes a stored `<base>` at load time. Never
        downloads. Its files' sizes and mtimes are checked against the manifest; `verify` re-hashes them."""
        from mflux.store import Store

        found = Store().resolve(name)
        if found.bits is not None:
            if kwargs.get("quantize") not in (None, found.bits):
                raise InvalidArgument(f"{name} means {found.bits}-bit, but quantize={kwargs['quantize']}")
            kwargs["quantize"] = found.bits
        return cls(open_folder(found.path, name=found.name, verify=verify), **kwargs)

    @classmethod
    def from_alias(cls, alias: str, **kwargs) -> "Flux1":
        return cls.from_name(alias, **kwargs)

    @property
    def variant(self) -> str:
        return self.folder.variant

    @property
    def condition(self) -> str:
        """What the engine feeds the transformer besides the prompt (engine.Request.condition): the
        variant's, or "control" where a Control LoRA widened dev's input to take a control image."""
        return "control" if self.control_loras else VARIANTS[self.variant].condition

    @property
    def model_name(self) -> str:
        return self.folder.name + (f"-q{self.quantize.bits}" if self.quantize else "")

    # -- modules: the engine asks for them by name; each loads on first use ------------------------

    def get(self, component: str):
        with self._files():
            return self.models.get(component)

    def tokenizers(self) -> tuple:
        with self._files():
            return self.models.tokenizers()

    @contextmanager
    def _files(self):
        """Reading the folder: a folder removed meanwhile (`mflux rm` in another shell) or a file gone
        is one clear error."""
        try:
            yield
        except (FileNotFoundError, MfluxError) as e:
            if not self.folder.path.exists():
                raise MfluxError(
                    f"{self.folder.name} was removed while in use ({self.folder.path} is gone); "
                    "pull, convert or quantize it again"
                ) from None
            if isinstance(e, FileNotFoundError):
                raise MfluxError(
                    f"{e.filename}: missing from {self.folder.name} (check it with: mflux inspect "
                    f"{self.folder.name} --verify, then {remake_hint(self.folder.path)})"
                ) from None
            raise

    def load(self) -> float:
        """Load the transformer and the VAE now (else the first image does), in seconds. Weights load
        lazily so that a caller can encode its prompts and free T5 and CLIP first: peak memory is then
        the larger of the two halves, not their sum (what lets a 16 GB Mac run schnell-q8)."""
        start = time.perf_counter()
        self.get("transformer")
        self.get("vae")
        return time.perf_counter() - start

    def free_text_encoders(self) -> None:
        """Drop T5 and CLIP (about 10 GB at bf16); a later prompt reloads them."""
        self.models.free("text_encoder", "text_encoder_2")

    def free_transformer(self) -> None:
        """Drop the transformer (23.8 GB at bf16), e.g. before decoding the last image; reloaded when needed."""
        self.models.free("transformer")

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        seeds: Iterable[int],
        prompt: str | list[str],
        config: Config | None = None,
        *,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        image=None,
        mask_image=None,
        strength: float | None = None,
        expand: tuple[int, int, int, int] | None = None,
        auto_resize: bool = True,
        control_image=None,
        prompt_embeds: "PromptEmbeds | None" = None,
        latents: np.ndarray | None = None,
        batch_size: int | None = None,
        previews: bool | Iterable[int] = False,
        free_text_encoders: bool = False,
        free_modulation_weights: bool = False,
        sequence_parallel=None,
        free_transformer: bool = False,
    ) -> Iterator[StepEvent | ImageEvent]:
        """Images for `seeds` (one prompt for all, or one per seed), `batch_size` at a time, as events:
        a StepEvent after every step of a batch and an ImageEvent per finished image. Stopping the
        iteration cancels what is left.

        - `negative_prompt` with `true_cfg_scale` > 1: true CFG, two transformer passes a step (one
          batched pass of twice the rows), `v = v_neg + scale * (v_pos - v_neg)` as diffusers.
        - `image` (PIL image, path or uint8 array): img2img at `strength` (0, 1], default 0.6; 1.0
          starts from pure noise. With `mask_image`, inpainting: white is repainted. An image of another
          size is scaled to cover the target size and centre-cropped.
        - Fill (`FluxFillPipeline`): `image` and `mask_image` (white repaints), `strength` default 1.0;
          or `expand=(left, top, right, bottom)` pixels (multiples of 16) to outpaint: the image is
          padded and the border is the mask (set the config's size to the padded size).
        - Kontext (`FluxKontextPipeline`): `image` is the reference to edit by the prompt's instruction;
          it is resized to the preferred Kontext resolution nearest its aspect ratio unless
          `auto_resize=False` (diffusers' `_auto_resize`), which keeps its size floored to 16.
        - Canny, Depth (`FluxControlPipeline`): `control_image`, an edge or depth map, resized to the
          output size (Lanczos, as diffusers' image processor).
        - `prompt_embeds`: what a `ReduxPrior` made (Redux), in place of `prompt` (give prompt=None).
        - `latents`: the packed initial noise (B, L, 64), instead of noise drawn from each seed.
        - `previews`: True decodes every step's latents, or an iterable of 1-based steps to decode.
        - `free_text_encoders` drops T5 and CLIP once the prompts are encoded; `free_modulation_weights`
          computes every batch's modulations first and then drops the transformer's conditioning layers
          (3.2B parameters at full size); the next generation that needs them reloads the transformer;
          `free_transformer` drops the transformer once the last batch is denoised, before its decode.
        - `sequence_parallel`: a `mflux.runtime.parallel.SequenceParallel`; every rank of its group
          calls `generate` with the same arguments and each transformer pass is spread over them.
        """
        config = config or Config()
        images = dict(image=image, mask=mask_image, strength=strength, expand=expand, auto_resize=auto_resize)
        request, records = self._request(
            list(seeds),
            prompt,
            config,
            negative=negative_prompt,
            true_cfg=true_cfg_scale,
            latents=latents,
            batch_size=batch_size,
            prompt_embeds=prompt_embeds,
            images=dict(images, control=control_image),
        )
        request.sequence_parallel = sequence_parallel
        if self.low_memory:
            free_text_encoders = free_modulation_weights = free_transformer = True
            request.banded_decode = True
        if free_modulation_weights:
            request.precompute_modulations = True
            modules = self.models.modules
            if "transformer" in modules and "time_in" not in modules["transformer"]:
                self.free_transformer()  # freed by an earlier call: this one's modulations need them back
        want = set() if previews is False else (None if previews is True else set(previews))
        # Each phase's seconds and MLX allocator peak; loading modules is its own phase, whenever it happens.
        timings = {"load": 0.0, "text_encoding": 0.0, "denoising": 0.0, "decoding": 0.0}
        peaks: dict[str, int] = {}
        mx.reset_peak_memory()
        phase, phase_start, loaded = "text_encoding", time.perf_counter(), self.models.loading

        def close(next_phase: str) -> None:
            nonlocal phase, phase_start, loaded
            now, load = time.perf_counter(), self.models.loading - loaded
            timings["load"] += load
            timings[phase] += now - phase_start - load
            peaks[phase] = max(peaks.get(phase, 0), mx.get_peak_memory())
            mx.reset_peak_memory()
            phase, phase_start, loaded = next_phase, now, self.models.loading

        with self._files(), self._cache_limit():  # a file gone meanwhile is one clear error
            self.models.prefetch()
            for event in self.models.generate(request):
                if isinstance(event, engine.Conditioned):
                    trace.mark("prompts encoded")
                    close("denoising")
                    if free_text_encoders:
                        self.free_text_encoders()
                elif isinstance(event, engine.Denoised):
                    if free_transformer:
                        self.free_transformer()
                elif isinstance(event, engine.Modulated):
                    self.models.modules["transformer"].free_modulation_weights()
                    mx.clear_cache()
                elif isinstance(event, engine.Step):
                    trace.mark("first step")
                    shown = None
                    if want is None or event.step in want:
                        vae = self.get("vae")
                        shown = [
                            Image.fromarray(p)
                            for p in engine.decode(
                                vae, event.latents, config.height, config.width, self.low_memory
                            )
                        ]
                    if event.step == event.total:
                        close("decoding")
                    yield StepEvent(event.step, event.total, event.indices, shown, event.latents)
                elif isinstance(event, engine.Decoded):
                    close("denoising")
                    if self.low_memory:  # the pixels are numpy now; the next batch loads it again
                        self.models.free("vae")
                    for row, pixels in zip(event.indices, event.pixels):
                        meta = {**records[row], "timings": {k: round(v, 3) for k, v in timings.items()}}
                        yield ImageEvent(
                            row, GeneratedImage(Image.fromarray(pixels), meta, dict(peaks)), event.indices
                        )
                    timings.update(denoising=0.0, decoding=0.0)  # each batch reports its own

    @contextmanager
    def _cache_limit(self):
        """Under low memory, MLX's cache of freed buffers kept small for the generation, then put back."""
        if not self.low_memory:
            yield
            return
        from mflux.runtime.models import LOW_MEMORY_CACHE_BYTES

        before = mx.set_cache_limit(LOW_MEMORY_CACHE_BYTES)
        mx.set_cache_limit(min(before, LOW_MEMORY_CACHE_BYTES))  # lowered, never raised
        try:
            yield
        finally:
            mx.set_cache_limit(before)

    def generate_images(
        self, seeds: Iterable[int], prompt: str | list[str], config: Config | None = None, **kwargs
    ):
        """The images of `generate`, as a list in the order of `seeds`."""
        out = {}
        for event in self.generate(seeds, prompt, config, **kwargs):
            if isinstance(event, ImageEvent):
                out[event.index] = event.image
        return [out[i] for i in sorted(out)]

    def generate_image(
        self,
        seed: int,
        prompt: str,
        config: Config | None = None,
        latents: np.ndarray | None = None,
        progress=None,
        **kwargs,
    ) -> GeneratedImage:
        """One image. `latents` are diffusers' packed initial noise (1, H*W/256, 64); else noise from
        `seed`. `progress(step, total)`, if given, is called after each denoising step. Takes the
        keywords of `generate`."""
        for event in self.generate([seed], prompt, config, latents=latents, **kwargs):
            if isinstance(event, StepEvent) and progress:
                progress(event.step, event.total)
            elif isinstance(event, ImageEvent):
                return event.image
        raise MfluxError("no image was generated")

    def _request(
        self, seeds, prompt, config, *, negative, true_cfg, latents, batch_size, prompt_embeds, images
    ):
        """Check every argument, then the engine's Request and each image's metadata record. `images`: the
        keywords of `_inputs`."""
        if not seeds:
            raise InvalidArgument("give at least one seed")
        for s in seeds:
            check_seed(s)
        if prompt_embeds is not None:
            prompt = self._check_embeds(prompt_embeds, prompt, negative)
        prompts = _per_image("prompt", prompt, len(seeds))  # "" is a prompt, as in diffusers
        negatives = _per_image("negative_prompt", negative, len(seeds)) if negative else None
        scale = 1.0 if true_cfg_scale_off(true_cfg) else float(true_cfg)
        if not np.isfinite(scale):
            raise InvalidArgument(f"true_cfg_scale must be a finite number, got {true_cfg}")
        d = self.folder.defaults
        h, w = config.height, config.width
        inputs = self._inputs(**images, w=w, h=h)
        if latents is not None:
            latents = np.asarray(latents)
            shape = (len(seeds), (h // 16) * (w // 16), 64)
            if latents.shape != shape:
                raise InvalidArgument(f"latents must have shape {shape} for {w}x{h}, got {latents.shape}")
        steps = config.num_inference_steps or d["steps"]
        if inputs.image is not None:  # img2img, inpainting, Fill: the strength cuts the schedule
            check_img2img_steps(steps, inputs.strength)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidArgument(f"batch_size must be a positive integer, got {batch_size!r}")
        guidance = None
        if self.folder.architecture["transformer"].get("guidance_embeds"):
            guidance = d.get("guidance", 3.5) if config.guidance is None else config.guidance
        request = engine.Request(
            prompts=prompts,
            seeds=list(seeds),
            height=h,
            width=w,
            steps=steps,
            guidance=guidance,
            max_sequence_length=config.max_sequence_length or d["max_sequence_length"],
            shift=d if d.get("use_dynamic_shifting") else None,
            negative_prompts=negatives,
            true_cfg_scale=scale,
            image=inputs.image,
            mask=inputs.mask,
            strength=inputs.strength,
            condition=inputs.condition,
            reference=inputs.reference,
            control=inputs.control,
            prompt_embeds=None if prompt_embeds is None else (prompt_embeds.txt, prompt_embeds.pooled),
            noise=latents,
            batch_size=batch_size or default_batch_size(len(seeds)),
            dtype=self.dtype,
        )
        base = {
            "model": self.model_name,
            "variant": self.variant,
            "steps": request.steps,
            "guidance": guidance,
            "height": h,
            "width": w,
            "precision": self.precision,
            "quantization": self.quantization_summary(),
            "lora_paths": [str(p) for p in self.lora_paths],
            "lora_scales": self.lora_scales,
            "batch_size": request.batch_size,
        }
        if self.model_path:
            base["model_path"] = self.model_path
        if request.true_cfg:
            base["true_cfg_scale"] = scale
        base.update(inputs.record)
        if prompt_embeds is not None:
            base.update(prompt_embeds.record)
        records = []
        for i, seed in enumerate(seeds):
            r = {**base, "prompt": prompts[i], "seed": seed}
            if negatives:
                r["negative_prompt"] = negatives[i]
            records.append(r)
        return request, records

    def _check_embeds(self, embeds: "PromptEmbeds", prompt, negative) -> str:
        """The prompt the records show for images made from `embeds` (Redux's): the one they were made with."""
        if not isinstance(embeds, PromptEmbeds):
            raise InvalidArgument("prompt_embeds must be what ReduxPrior returns (a PromptEmbeds)")
        if prompt is not None:
            raise InvalidArgument(
                "give prompt= or prompt_embeds=, not both (the prompt goes to the ReduxPrior)"
            )
        if negative is not None:
            raise InvalidArgument(
                "prompt_embeds= with negative_prompt= (true CFG with Redux) is not supported yet"
            )
        width = self.folder.architecture["transformer"].get("pooled_projection_dim", 768)
        if embeds.pooled.shape[-1] != width:
            raise InvalidArgument(
                f"prompt_embeds has pooled width {embeds.pooled.shape[-1]}; this model takes {width}"
            )
        return embeds.record.get("prompt", "")

    def encode_prompt(self, prompt: str, max_sequence_length: int = 512) -> tuple[mx.array, mx.array]:
        """The prompt as the transformer reads it: (T5's tokens (1, S, 4096), CLIP's pooled (1, 768))."""
        with self._files():
            return engine.encode_prompts(self.models, [prompt], max_sequence_length, self.dtype)[prompt]

    def _inputs(self, image, mask, strength, expand, auto_resize, w: int, h: int, control=None) -> "_Inputs":
        """The image arguments as this variant reads them (each checked), for a w x h output:
        schnell, dev, krea: img2img at `strength`, inpainting with `mask`; fill: `image` and `mask`
        (or `expand`) as Fill's channels, `strength` default 1.0; kontext: `image` is the reference;
        canny, depth: `control` only."""
        condition = self.condition
        if (control is not None) != (condition == "control"):
            if control is None:
                follows = "with a Control LoRA " if self.control_loras else ""
                raise InvalidArgument(f"{self.variant} {follows}follows a control image: give control_image=")
            raise InvalidArgument(
                f"control_image= needs a canny or depth model; {self.variant} takes none "
                "(or load a Control LoRA on dev: lora_paths=['canny-lora'])"
            )
        if condition == "control":
            if any(v is not None for v in (image, mask, strength, expand)):
                raise InvalidArgument(
                    f"{self.variant} with image=, mask_image=, strength= or expand= (diffusers' "
                    "FluxControlImg2ImgPipeline and FluxControlInpaintPipeline) is not supported yet"
                )
            source = _open_image(control).convert("RGB")
            resized = source if source.size == (w, h) else source.resize((w, h), Image.LANCZOS)
            inputs = _Inputs(condition="control", control=np.asarray(resized))
            inputs.record = _source("control", control)
            return inputs
        original = image
        if expand is not None:
            if condition != "fill":
                raise InvalidArgument(f"expand= outpaints with a fill model; {self.variant} can't")
            if mask is not None:
                raise InvalidArgument("give mask_image= or expand=, not both (expand makes the mask)")
            if image is None:
                raise InvalidArgument("expand= needs the image to extend (image=...)")
            image, mask = expanded(_open_image(image), expand)
        if condition == "kontext":
            return self._kontext_inputs(image, mask, strength, auto_resize)
        if image is None and (mask is not None or strength is not None):
            raise InvalidArgument("mask_image and strength need an init image (image=...)")
        if condition == "fill" and (image is None or mask is None):
            raise InvalidArgument(
                "fill repaints the white area of mask_image= in image= (or extends it with expand=); "
                "give both"
            )
        if image is None:
            return _Inputs()
        default = 1.0 if condition == "fill" else DEFAULT_STRENGTH  # FluxFillPipeline's default is 1.0
        strength = default if strength is None else strength
        if not (isinstance(strength, int | float) and 0 < strength <= 1):
            raise InvalidArgument(f"strength must be in (0, 1] (1.0 is pure noise), got {strength!r}")
        source = _open_image(image)
        inputs = _Inputs(image=np.asarray(fit_image(source, w, h, "RGB")), strength=float(strength))
        inputs.record = {"strength": inputs.strength, **_source("image", original)}
        if condition == "fill":
            inputs.condition = "fill"
            if expand is not None:
                inputs.record["expand"] = list(expand)
        if mask is not None:
            mask_source = _open_image(mask)
            if mask_source.size != source.size:
                raise InvalidArgument(
                    f"the mask is {mask_source.size[0]}x{mask_source.size[1]} but the image is "
                    f"{source.size[0]}x{source.size[1]}; give a mask of the image's size"
                )
            inputs.mask = np.asarray(fit_image(mask_source, w, h, "L")) >= 128  # diffusers binarizes at 0.5
            if not inputs.mask.any():
                raise InvalidArgument(
                    "the mask is all black: nothing to repaint (white marks what to repaint)"
                )
            inputs.record.update(_source("mask", mask))
        return inputs

    def _kontext_inputs(self, image, mask, strength, auto_resize: bool) -> "_Inputs":
        if mask is not None:
            raise InvalidArgument("kontext takes no mask_image yet; a fill model inpaints")
        if strength is not None:
            raise InvalidArgument("kontext takes no strength: it edits the whole image by instruction")
        if image is None:
            return _Inputs()  # FluxKontextPipeline without an image: text-to-image
        reference = kontext_reference(_open_image(image), auto_resize)
        inputs = _Inputs(condition="kontext", reference=np.asarray(reference))
        inputs.record = {"reference_size": list(reference.size), **_source("image", image)}
        return inputs

    def quantization_summary(self) -> str | None:
        if self.quantize:
            return f"{self.quantize.bits}-bit affine (group size {self.quantize.group_size}, at load time)"
        q = self.folder.quantization
        if not q:
            return None
        parts = sorted({f"{v['bits']}-bit {v.get('mode', 'affine')}" for v in q.values()})
        return ", ".join(parts) + " (stored)"


@dataclass
class PromptEmbeds:
    """Prompt embeddings made outside the text encoders (diffusers' `prompt_embeds`, `pooled_prompt_embeds`):
    what `ReduxPrior` returns, for `Flux1.generate(prompt_embeds=...)`; `record`, what an image's metadata
    says of them."""

    txt: mx.array  # (1, S, 4096)
    pooled: mx.array  # (1, 768)
    record: dict = field(default_factory=dict)


class ReduxPrior:
    """FLUX.1 Redux as diffusers' FluxPriorReduxPipeline: images (and a prompt) -> PromptEmbeds. A folder laid
    out as black-forest-labs/FLUX.1-Redux-dev (image_encoder, image_embedder, feature_extractor).

        prior = ReduxPrior.from_path("FLUX.1-Redux-dev")
        embeds = prior(flux, "ref.png")  # or several images, a prompt, scales
        image = flux.generate_image(1, None, config, prompt_embeds=embeds)
    """

    def __init__(self, path: str | Path, precision: str | None = None):
        import_mlx()
        self.path = Path(path).expanduser()
        if not (self.path / "image_embedder").is_dir():
            raise MfluxError(f"{self.path}: not a FLUX.1 Redux folder (it has no image_embedder/)")
        precision = precision or default_precision()
        if precision not in PRECISIONS:
            raise InvalidArgument(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.dtype = getattr(mx, precision)
        self._redux = None

    @classmethod
    def from_path(cls, path: str | Path, **kwargs) -> "ReduxPrior":
        return cls(path, **kwargs)

    def __call__(
        self,
        flux: "Flux1",
        image,
        prompt: str | None = None,
        prompt_embeds_scale: float | list[float] = 1.0,
        pooled_prompt_embeds_scale: float | list[float] = 1.0,
    ) -> PromptEmbeds:
        """The embeddings for `image` (one, or a list whose sequences are scaled and summed), after
        `prompt`'s T5 tokens encoded by `flux` at 512 tokens (None: zeros, as diffusers without text
        encoders, not the encoding of an empty prompt)."""
        from mflux.runtime.loader import load_redux

        images = list(image) if isinstance(image, list | tuple) else [image]
        if not images:
            raise InvalidArgument("give at least one image to Redux")
        scales = _per_image_scale("prompt_embeds_scale", prompt_embeds_scale, len(images))
        pooled_scales = _per_image_scale(
            "pooled_prompt_embeds_scale", pooled_prompt_embeds_scale, len(images)
        )
        if prompt is not None:
            prompt = _per_image("prompt", prompt, 1)[0]
        opened = [_open_image(i) for i in images]
        if self._redux is None:
            self._redux = load_redux(self.path, self.dtype)
        tokens = self._redux(opened)
        encoded = None if prompt is None else flux.encode_prompt(prompt, 512)
        width = flux.folder.architecture["transformer"].get("pooled_projection_dim", 768)
        txt, pooled = engine.redux_embeds(tokens, scales, pooled_scales, encoded, width)
        mx.eval(txt, pooled)
        record = {"redux_scales": scales, "redux_pooled_scales": pooled_scales}
        sources = [_source("redux", i) for i in images]  # each file hashed once
        record["redux_images"] = [source.get("redux_path") for source in sources]
        record["redux_sha256"] = [source.get("redux_sha256") for source in sources]
        if prompt is not None:
            record["prompt"] = prompt
        record["redux_prompt"] = prompt is not None  # False: zeros, which an empty prompt's encoding is not
        return PromptEmbeds(txt, pooled, record)


def _per_image_scale(name: str, value, n: int) -> list[float]:
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n or not all(isinstance(v, int | float) and np.isfinite(v) for v in values):
        raise InvalidArgument(f"{name} takes one finite number, or one per image ({n})")
    return [float(v) for v in values]


@dataclass
class _Inputs:
    """A request's image inputs as the engine takes them, and what the metadata records of them."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float = 1.0
    condition: str = "text"
    reference: np.ndarray | None = None
    control: np.ndarray | None = None
    record: dict = field(default_factory=dict)


# FluxKontextPipeline's PREFERRED_KONTEXT_RESOLUTIONS, (width, height): the sizes Kontext was trained at.
KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
]  # fmt: skip


def kontext_size(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution (width, height) nearest in aspect ratio to width x height."""
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return w, h


def kontext_reference(img: Image.Image, auto_resize: bool = True) -> Image.Image:
    """The reference as FluxKontextPipeline prepares it: its size floored to a multiple of 16, or with
    `auto_resize` the preferred resolution nearest in aspect ratio, then resized (Lanczos) in RGB."""
    img = img.convert("RGB")
    w, h = img.width // 16 * 16, img.height // 16 * 16
    if w == 0 or h == 0:
        raise InvalidArgument(f"the image is {img.width}x{img.height}; Kontext needs at least 16x16")
    if auto_resize:
        w, h = kontext_size(w, h)
    return img if img.size == (w, h) else img.resize((w, h), Image.LANCZOS)


def expanded(img: Image.Image, margins) -> tuple[Image.Image, Image.Image]:
    """Outpainting: the image padded by `margins` (left, top, right, bottom; pixels, multiples of 16),
    the new border filled with the nearest edge's pixels, and the mask that repaints the border."""
    margins = tuple(margins)
    if len(margins) != 4 or any(not isinstance(m, int) or m < 0 or m % 16 for m in margins):
        raise InvalidArgument(
            f"expand takes 4 margins LEFT,TOP,RIGHT,BOTTOM in pixels, each a multiple of 16, got {margins!r}"
        )
    if not any(margins):
        raise InvalidArgument("expand margins are all 0: nothing to outpaint")
    left, top, right, bottom = margins
    w, h = img.width + left + right, img.height + top + bottom
    if max(w, h) > MAX_SIDE or w * h > MAX_PIXELS:
        raise InvalidArgument(
            f"the expanded image would be {w}x{h}, above the limits ({MAX_SIDE} a side, "
            f"{MAX_PIXELS / 1e6:.1f} MP); expand less"
        )
    pixels = np.pad(np.asarray(img.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((h, w), 255, dtype=np.uint8)
    mask[top : top + img.height, left : left + img.width] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)


def check_img2img_steps(steps: int, strength: float, name: str = "strength") -> None:
    """Refuse a strength so small that img2img runs no step at `steps` (the image would come back as given)."""
    if engine.img2img_start(steps, strength) >= steps:
        raise InvalidArgument(
            f"{name} {strength:g} gives zero steps at this step count ({steps}): img2img runs "
            f"steps x strength of them, rounded; raise the strength"
        )


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed <= MAX_SEED:
        raise InvalidArgument(f"seed must be an integer in 0..{MAX_SEED} (2**64 - 1), got {seed!r}")
    return int(seed)


def true_cfg_scale_off(scale) -> bool:
    return scale is None or scale == 1


def fit_image(source, width: int, height: int, mode: str) -> Image.Image:
    """An image (PIL, path or uint8 array) in `mode`, scaled to cover width x height and centre-cropped."""
    img = _open_image(source).convert(mode)
    if img.size == (width, height):
        return img
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(size, Image.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return img.crop((left, top, left + width, top + height))


def _open_image(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    return open_image(source)


def _source(key: str, source) -> dict:
    """The metadata of an init image or mask: its path and sha256 where it came from a file."""
    if isinstance(source, str | Path):
        return {f"{key}_path": str(Path(source).resolve()), f"{key}_sha256": sha256(source)}
    return {}


def _per_image(name: str, value, n: int) -> list[str]:
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n:
        raise InvalidArgument(f"got {len(values)} values for {name} but {n} seeds; give one, or one per seed")
    for v in values:
        if not isinstance(v, str):
            raise InvalidArgument(f"{name} must be a string")
        bad = not_utf8(v)
        if bad:
            raise InvalidArgument(f"{name} is not valid text: {bad}")
    return values


def _lora_file(path) -> str:
    """A LoRA path as given, or the file of a LoRA stored by that name (`lora_paths=["canny-lora"]`)."""
    if Path(path).is_file():
        return path
    from mflux.store import Store

    found = Store().lora_file(str(path))
    return str(found) if found is not None else path  # a missing file is refused where it is read


def _control_loras(paths: list, folder: ModelFolder) -> list[str]:
    """The Control LoRAs among `paths` (their img_in takes the control channels too), read from their
    headers; refused on a model other than dev's architecture with text conditioning (dev, krea)."""
    from mflux.runtime.lora import control_width

    transformer = folder.architecture["transformer"]
    in_channels = int(transformer.get("in_channels", 64))
    found = [str(p) for p in paths if (control_width(p) or 0) > in_channels]
    variant = VARIANTS[folder.variant]
    if found and not (variant.condition == "text" and variant.guidance_embeds):
        raise InvalidArgument(
            f"{found[0]} is a Control LoRA for FLUX.1 dev (its x_embedder takes the control image's "
            f"channels); {folder.variant} can't take it (use dev: -m dev)"
        )
    return found


def _lora_scales(paths: list, scales: list[float] | None) -> list[float]:
    if scales is None or len(scales) == 0:
        return [1.0] * len(paths)
    if len(scales) != len(paths):
        raise InvalidArgument(
            f"got {len(paths)} LoRA paths but {len(scales)} scales; give one scale per LoRA"
        )
    return [float(s) for s in scales]
