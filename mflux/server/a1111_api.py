"""The AUTOMATIC1111 web UI's API (/sdapi/v1), which Open WebUI, SillyTavern and webuiapi speak.

The request models copy A1111's `StableDiffusionTxt2ImgProcessingAPI` and `...Img2Img...` field names
(plus Forge's `distilled_cfg_scale`); fields that mean nothing for FLUX (hires fix, face restore,
subseeds, scripts) are accepted and ignored, so a client's full default payload validates. LoRAs come
as A1111 writes them, `<lora:NAME:SCALE>` inside the prompt, by name from --lora-dir.
"""

import io
import json
import re
import time

from fastapi import APIRouter, Request
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, model_validator

from mflux import __version__
from mflux.flux1 import kontext_size
from mflux.server.core import ApiError, b64, off_loop, seed_run, utf8_text
from mflux.server.worker import Job, Result
from mflux.settings import a1111_cfg  # the CFG table shared with `mflux run --from` and the PNG metadata

router = APIRouter(prefix="/sdapi/v1")

SAMPLER = "Euler"  # FLUX's flow-matching Euler: the only sampler mflux has
SCHEDULER = "simple"
MAX_MASK_BLUR = 64  # pixels, the top of A1111's slider; a blur radius past the image's size is pointless
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-+0-9.eE]+))?>")
_TITLE_HASH = re.compile(r"^(?P<name>.+?)(?:\.safetensors)? \[[0-9a-f]+\]$")
PREVIEW_OPTIONS = ("live_previews_enable", "show_progress_every_n_steps")  # A1111's, as options or overrides


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    _text = model_validator(mode="after")(utf8_text)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None  # None: the model's default (A1111's is 50, too many for schnell)
    cfg_scale: float = 7.0
    distilled_cfg_scale: float | None = None  # Forge: FLUX dev's guidance
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict | None = None
    override_settings_restore_afterwards: bool = True
    enable_hr: bool = False
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = {}
    script_name: str | None = None
    script_args: list = []


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = []
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    denoising_strength: float = 0.75
    mask: str | None = None  # white is repainted (unless inpainting_mask_invert)
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    images: list[str]  # base64 PNGs, with their metadata
    parameters: dict
    info: str  # a JSON string: seeds, the A1111 infotexts and notes


class SDModel(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None
    mflux: dict | None = None  # mflux's: {"variant": "fill", "edits": ["inpaint"]}, what img2img does


class Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict


class Scheduler(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float = -1
    need_inner_model: bool = False


class Lora(BaseModel):
    name: str
    alias: str
    path: str  # the file name inside the server's --lora-dir, never a path on the server
    metadata: dict = {}


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


@router.post("/txt2img")
async def txt2img(request: Request, body: Txt2ImgRequest) -> GenerationResponse:
    server = request.app.state.server
    job = _job(server, body)
    server.check_text_only(job.model, "override_settings")
    return await _generate(request, body, job)


@router.post("/img2img")
async def img2img(request: Request, body: Img2ImgRequest) -> GenerationResponse:
    server = request.app.state.server
    job = _job(server, body)
    if not body.init_images:
        raise ApiError(400, "init_images needs one image (base64 or a data: URL)", "init_images")
    check_mask_blur(body)
    mode = server.edit_mode(job.model, bool(body.mask))
    sent = body.model_fields_set
    notes = []
    if mode == "instruction" and "denoising_strength" in sent:
        notes.append("denoising_strength ignored: a kontext model edits by instruction")
    elif not 0 < body.denoising_strength <= 1:
        raise ApiError(
            400, f"denoising_strength must be in (0, 1], got {body.denoising_strength}", "denoising_strength"
        )
    job.image, job.mask = await off_loop(_img2img_images, server, body)
    variant = server.model_variant(job.model)
    if not {"width", "height"} & sent and variant in ("kontext", "fill"):  # A1111's 512x512 fits neither
        size = kontext_size(*job.image.size) if variant == "kontext" else job.image.size
        job.width, job.height = server.check_size(size[0] // 16 * 16, size[1] // 16 * 16, "width")
    if mode == "instruction":
        job.strength = None  # the image is the reference to edit
    elif variant == "fill" and "denoising_strength" not in sent:
        job.strength = None  # FluxFillPipeline's 1.0, not A1111's default 0.75
    else:
        job.strength = body.denoising_strength
    return await _generate(request, body, job, notes)


def check_mask_blur(body: Img2ImgRequest) -> None:
    for name in ("mask_blur", "mask_blur_x", "mask_blur_y"):
        value = getattr(body, name)
        if value is not None and not 0 <= value <= MAX_MASK_BLUR:
            raise ApiError(400, f"{name} must be in 0..{MAX_MASK_BLUR} pixels, got {value}", name)


def _img2img_images(server, body: Img2ImgRequest) -> tuple[Image.Image, Image.Image | None]:
    """The init image as RGB and the mask as mflux's; run off the event loop."""
    image = server.decode_image(body.init_images[0], "init_images").convert("RGB")
    mask = a1111_mask(server.decode_image(body.mask, "mask"), body, image.size) if body.mask else None
    return image, mask


def a1111_mask(mask: Image.Image, body: Img2ImgRequest, size: tuple[int, int]) -> Image.Image:
    """A1111's mask as mflux's, at the init image's size: white is repainted, after the invert and the
    blur A1111 applies (the engine then repaints where the result is at least half white)."""
    if mask.mode in ("RGBA", "LA"):
        mask = Image.alpha_composite(Image.new("RGBA", mask.size, "black"), mask.convert("RGBA"))
    mask = mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.LANCZOS)
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
    return mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask


@router.get("/sd-models")
def sd_models(request: Request) -> list[SDModel]:
    server = request.app.state.server
    return [_sd_model(server, name) for name in server.model_names()]


@router.get("/options")
def get_options(request: Request) -> dict:
    server = request.app.state.server
    name = server.worker.model_name
    return {
        "sd_model_checkpoint": _title(server, name) if name else None,
        "sd_checkpoint_hash": server.model_hash(name) if name and server.store.exists(name) else None,
        "samples_format": "png",
        "live_previews_enable": True,
        **server.a1111_options,  # show_progress_every_n_steps only once set: unset, mflux picks a stride
    }


@router.post("/options")
async def set_options(request: Request, body: dict) -> None:
    """The live preview options are kept for later requests; sd_model_checkpoint loads that model now
    (through the queue), by title or name. Other options are ignored."""
    server = request.app.state.server
    previews = _preview_options(body, "options")
    title = body.get("sd_model_checkpoint")
    if title is not None and not isinstance(title, str):
        raise ApiError(
            400,
            "sd_model_checkpoint must be a model title from GET /sdapi/v1/sd-models",
            "sd_model_checkpoint",
        )
    name = server.check_model(_name_from_title(title), "sd_model_checkpoint") if title is not None else None
    server.a1111_options.update(previews)  # once every option given is known good
    if name is not None:
        await server.run(Job(model=name, load_only=True), request)
    return None


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False) -> ProgressResponse:
    worker = request.app.state.server.worker
    job = worker.current
    step, total = job.progress if job else (0, 0)
    done = step / total if total else 0.0
    elapsed = time.monotonic() - job.started if job and job.started else 0.0
    eta = elapsed / done - elapsed if done > 0 else 0.0
    state = ProgressState(
        interrupted=bool(job and job.cancelled.is_set()),
        job=job.id if job else "",
        job_count=worker.job_count(),
        sampling_step=step,
        sampling_steps=total,
    )
    preview = job.preview if job and not skip_current_image else None
    return ProgressResponse(
        progress=done, eta_relative=eta, state=state, current_image=b64(preview) if preview else None
    )


@router.post("/interrupt")
def interrupt(request: Request) -> dict:
    request.app.state.server.worker.interrupt()  # every running job: A1111's interrupt names none
    return {}


@router.post("/skip")
def skip(request: Request) -> dict:
    request.app.state.server.worker.interrupt()  # one job is one batch here: skipping it is stopping it
    return {}


@router.get("/samplers")
def samplers() -> list[Sampler]:
    return [Sampler(name=SAMPLER, aliases=["euler", "k_euler", "flow_match_euler"], options={})]


@router.get("/schedulers")
def schedulers() -> list[Scheduler]:
    return [Scheduler(name=SCHEDULER, label="Simple (FLUX flow-matching sigmas)")]


@router.get("/loras")
def loras(request: Request) -> list[Lora]:
    files = request.app.state.server.lora_files()
    return [Lora(name=name, alias=name, path=p.name) for name, p in files.items()]


@router.get("/scripts")
def scripts() -> dict:
    return {"txt2img": [], "img2img": []}


def _job(server, body: Txt2ImgRequest) -> Job:
    prompt, lora_names = _lora_tags(body.prompt)
    server.check_prompt(prompt)
    server.check_prompt(body.negative_prompt, "negative_prompt", empty_ok=True)
    for name in ("batch_size", "n_iter"):  # each, or -1 * -1 passes as one image
        if getattr(body, name) < 1:
            raise ApiError(400, f"{name} must be at least 1, got {getattr(body, name)}", name)
    n = server.check_count(body.batch_size * body.n_iter, "batch_size * n_iter")
    width, height = server.check_size(body.width, body.height, "width")
    cfg = a1111_cfg(body.cfg_scale, body.distilled_cfg_scale, body.negative_prompt)
    model = (body.override_settings or {}).get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise ApiError(
            400,
            "override_settings.sd_model_checkpoint must be a model title from GET /sdapi/v1/sd-models",
            "override_settings",
        )
    options = {**server.a1111_options, **_preview_options(body.override_settings or {}, "override_settings")}
    return Job(
        prompt=prompt,
        seeds=seed_run(None if body.seed == -1 else body.seed, n),
        model=server.check_model(_name_from_title(model), "override_settings") if model else None,
        width=width,
        height=height,
        steps=server.check_steps(body.steps),
        guidance=cfg.guidance,
        negative_prompt=body.negative_prompt or None,
        true_cfg_scale=cfg.true_cfg,
        loras=server.resolve_loras(lora_names, "prompt"),
        preview_every=_preview_every(options),
    )


def _preview_options(settings: dict, param: str) -> dict:
    """The live preview options among A1111 `settings`, checked: a bool and a whole number from -1."""
    out = {k: settings[k] for k in PREVIEW_OPTIONS if k in settings}
    if not isinstance(out.get("live_previews_enable", True), bool):
        raise ApiError(400, "live_previews_enable must be true or false", param)
    n = out.get("show_progress_every_n_steps", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < -1:
        raise ApiError(
            400, f"show_progress_every_n_steps must be a whole number from -1 (no previews), got {n!r}", param
        )
    return out


def _preview_every(options: dict) -> int | None:
    """A1111's live preview options as the job's preview stride: every n-th step (0, like 1, is every
    step; -1 or previews off: none); unset, None lets the worker pick a stride for the step count."""
    n = options.get("show_progress_every_n_steps")
    if not options.get("live_previews_enable", True) or n == -1:
        return 0
    if n is None:
        return None
    return max(n, 1)


async def _generate(request: Request, body: Txt2ImgRequest, job: Job, notes=()) -> GenerationResponse:
    server = request.app.state.server
    results, end = await server.run(job, request)
    info = _info(server, body, job, results, interrupted=end.status == "cancelled", notes=notes)
    images = [b64(r.png) for r in results] if body.send_images else []
    return GenerationResponse(
        images=images, parameters=body.model_dump(exclude={"init_images", "mask"}), info=json.dumps(info)
    )


def _info(server, body: Txt2ImgRequest, job: Job, results: list[Result], interrupted: bool, notes=()) -> dict:
    notes = list(notes)
    for field, value, known in (
        ("sampler_name", body.sampler_name, SAMPLER),
        ("scheduler", body.scheduler, SCHEDULER),
    ):
        if value and value.lower() not in (known.lower(), "automatic"):
            notes.append(f"{field} {value!r} ignored: mflux samples FLUX with flow-matching Euler")
        elif value and value.lower() == "automatic":
            notes.append(f"{field} 'automatic': FLUX's flow-matching Euler")
    note = a1111_cfg(body.cfg_scale, body.distilled_cfg_scale, body.negative_prompt).note
    if note:
        notes.append(note)
    infotexts = [_infotext(r.png) for r in results]
    name = job.model or server.worker.model_name
    return {
        "prompt": job.prompt,
        "all_prompts": [job.prompt] * len(results),
        "negative_prompt": body.negative_prompt,
        "seed": job.seeds[0],
        "all_seeds": [r.seed for r in results],
        "subseed": -1,
        "width": job.width,
        "height": job.height,
        "sampler_name": SAMPLER,
        "cfg_scale": body.cfg_scale,
        "steps": results[0].metadata.get("steps") if results else job.steps,
        "batch_size": body.batch_size,
        "sd_model_name": name,
        "sd_model_hash": server.model_hash(name) if name and server.store.exists(name) else None,
        # the strength the images were made at (Fill's default when none was sent); None for a kontext edit
        "denoising_strength": results[0].metadata.get("strength") if results else job.strength,
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "version": f"mflux {__version__}",
        "interrupted": interrupted,
        "notes": notes,
    }


def _infotext(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as im:
        return im.text.get("parameters", "")


def _lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """`a cat <lora:ink:0.7>` -> ("a cat", [("ink", 0.7)]), as A1111's extra networks write them."""
    if not isinstance(prompt, str):
        return prompt, []
    found = [(m[1], m[2] or 1.0) for m in _LORA_TAG.finditer(prompt)]  # scales checked with the names
    return " ".join(_LORA_TAG.sub(" ", prompt).split()) if found else prompt, found


def _title(server, name: str) -> str:
    # A1111's titles are "<file> [<short hash>]"; clients send the title back to choose a model
    return f"{name} [{server.model_hash(name)}]" if server.store.exists(name) else name


def _name_from_title(title: str) -> str:
    m = _TITLE_HASH.match(title.strip())
    return m["name"] if m else title.strip()


def _sd_model(server, name: str) -> SDModel:
    h = server.model_hash(name)
    info = server.model_info(server.store.get(name).manifest.variant)
    return SDModel(
        title=_title(server, name), model_name=name, hash=h[:8], sha256=None, filename=name, mflux=info
    )
