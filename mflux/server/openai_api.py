"""OpenAI's Images API: /v1/images/generations, /v1/images/edits and /v1/models.

The request and response models copy OpenAI's field names; what mflux adds (seed, steps, guidance,
negative_prompt, true_cfg_scale, loras, strength) are extra fields that OpenAI's SDK sends through
`extra_body`. OpenAI's own fields that mean nothing here (quality, background, moderation, style, user)
are accepted and echoed where OpenAI echoes them.
"""

import json
import time
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mflux.flux1 import kontext_size
from mflux.server.core import (
    ApiError,
    b64,
    check_mask_size,
    draws,
    end_error,
    off_loop,
    seed_run,
    sse,
    utf8_text,
)
from mflux.server.worker import End, Job, Result, Step

router = APIRouter()

IMG2IMG_STRENGTH = 0.6  # an edit without a mask (diffusers' FluxImg2ImgPipeline default)
INPAINT_STRENGTH = 1.0  # an edit with a mask: the masked area is drawn anew (FluxFillPipeline's default too)


class LoraSpec(BaseModel):
    name: str  # a file name (without .safetensors) in the server's --lora-dir
    scale: float = 1.0


class MfluxFields(BaseModel):
    """mflux's settings that OpenAI lacks; OpenAI's SDK sends them with `extra_body={...}`."""

    model_config = ConfigDict(extra="ignore")  # OpenAI adds fields over time; unknown ones are not errors
    _text = model_validator(mode="after")(utf8_text)

    seed: int | None = None  # first image's seed; image i gets seed + i. None: random
    steps: int | None = None  # None: the model's default (schnell 4, dev 25)
    guidance: float | None = None  # dev's distilled guidance
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None  # > 1 with a negative prompt: true CFG
    loras: list[LoraSpec] = []


class ImageGenerateRequest(MfluxFields):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "auto"  # "WxH"; auto: 1024x1024
    quality: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None
    style: str | None = None
    user: str | None = None
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)


class ImageEditRequest(ImageGenerateRequest):
    """The multipart form's text fields; `image` and `mask` are its files. size auto: the image's, or for a
    kontext model the trained resolution nearest the image's aspect (`mflux.flux1.kontext_size`)."""

    strength: float | None = Field(
        None, gt=0, le=1
    )  # default: IMG2IMG_STRENGTH, or INPAINT_STRENGTH with a mask; a kontext model takes none
    input_fidelity: str | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: str = "png"
    quality: str | None = None
    background: str | None = None


class PartialImageEvent(BaseModel):
    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    b64_json: str
    partial_image_index: int
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str


class CompletedEvent(BaseModel):
    type: Literal["image_generation.completed", "image_edit.completed"]
    b64_json: str
    created_at: int
    size: str
    quality: str
    background: str
    output_format: str


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mflux"
    mflux: dict | None = None  # {"variant": "kontext", "edits": ["instruction"]}: what /v1/images/edits does


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


@router.get("/v1/models")
def list_models(request: Request) -> ModelList:
    server = request.app.state.server
    models = [
        Model(id=m.name, created=int(m.modified.timestamp()), mflux=server.model_info(m.manifest.variant))
        for m in server.store.list()
        if draws(m)
    ]
    return ModelList(data=models)


@router.post("/v1/images/generations")
async def generate(request: Request, body: ImageGenerateRequest):
    server = request.app.state.server
    job = _job(server, body, _size(server, body.size, (1024, 1024)))
    server.check_text_only(job.model)
    return await _reply(request, body, job, "image_generation")


@router.post("/v1/images/edits")
async def edit(request: Request):
    server = request.app.state.server
    form = await request.form(max_files=4, max_fields=64, max_part_size=server.limits.upload_bytes)
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    if "loras" in fields:
        fields["loras"] = _json_field(fields["loras"], "loras")
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as e:
        raise _validation_error(e) from None
    upload = form.get("image") or form.get("image[]")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "image is required: a PNG, JPEG or WebP file in the multipart form", "image")
    mask = form.get("mask")
    mask = await mask.read() if mask is not None and not isinstance(mask, str) else None
    mode = server.edit_mode(server.check_model(body.model), mask is not None)
    if mode == "instruction" and body.strength is not None:
        raise ApiError(
            400, "strength: a kontext model edits by instruction and takes no strength", "strength"
        )
    image, mask = await off_loop(_edit_images, server, await upload.read(), mask)
    auto = kontext_size(*image.size) if mode == "instruction" else _image_size(image)
    job = _job(server, body, _size(server, body.size, auto))
    job.image, job.mask = image, mask
    if mode != "instruction":  # kontext's image is the reference: no strength
        job.strength = body.strength or (INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH)
    return await _reply(request, body, job, "image_edit")


def _edit_images(server, image: bytes, mask: bytes | None) -> tuple[Image.Image, Image.Image | None]:
    """The edit's image as RGB and its mask as mflux's (white is repainted); run off the event loop."""
    image = server.decode_image(image, "image")
    if mask is None:
        return image.convert("RGB"), None  # the engine scales it to cover the size and centre-crops
    mask = server.decode_image(mask, "mask")
    check_mask_size(mask, image)
    return image.convert("RGB"), openai_mask_to_mflux(mask)


def openai_mask_to_mflux(mask: Image.Image) -> Image.Image:
    """OpenAI marks the area to edit as transparent (alpha 0); mflux repaints white. So alpha 0 -> white."""
    if "A" not in mask.getbands():
        raise ApiError(
            400, "mask must be a PNG with an alpha channel (transparent pixels are repainted)", "mask"
        )
    alpha = np.asarray(mask.getchannel("A"))
    return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")


def _job(server, body: ImageGenerateRequest, size: tuple[int, int]) -> Job:
    if body.output_format != "png":
        raise ApiError(
            400, f"output_format {body.output_format!r} is not supported (mflux writes png)", "output_format"
        )
    server.check_prompt(body.prompt)
    n = server.check_count(body.n)
    if body.negative_prompt:
        server.check_prompt(body.negative_prompt, "negative_prompt")
    width, height = size
    return Job(
        prompt=body.prompt,
        seeds=seed_run(None if body.seed in (None, -1) else body.seed, n),
        model=server.check_model(body.model),
        width=width,
        height=height,
        steps=server.check_steps(body.steps),
        guidance=body.guidance,
        negative_prompt=body.negative_prompt,
        true_cfg_scale=body.true_cfg_scale,
        loras=server.resolve_loras([(lo.name, lo.scale) for lo in body.loras]),
        partial_images=body.partial_images if body.stream else 0,
    )


async def _reply(request: Request, body: ImageGenerateRequest, job: Job, kind: str):
    server = request.app.state.server
    size = f"{job.width}x{job.height}"
    if body.stream:
        server.submit(job)  # a full queue answers 429 before the stream starts
        return StreamingResponse(_stream(server, body, job, kind, size), media_type="text/event-stream")
    results, end = await server.run(job, request)
    if end.status == "cancelled":
        raise ApiError(500, "the request was cancelled on the server", code="cancelled")
    base = str(request.base_url).rstrip("/")
    data = [_image_data(server, body, r, base) for r in results]
    return ImagesResponse(created=int(time.time()), data=data, size=size, background=body.background)


def _image_data(server, body: ImageGenerateRequest, r: Result, base: str) -> ImageData:
    if body.response_format == "url":
        return ImageData(url=f"{base}/outputs/{server.save_output(r.png)}")
    return ImageData(b64_json=b64(r.png))


async def _stream(server, body: ImageGenerateRequest, job: Job, kind: str, size: str):
    common = dict(
        size=size, quality=body.quality or "auto", background=body.background or "auto", output_format="png"
    )
    partial = done = 0
    try:
        async for event in job.events():
            now = int(time.time())
            if isinstance(event, Step) and event.preview and not done:  # the first image's previews
                e = PartialImageEvent(
                    type=f"{kind}.partial_image",
                    b64_json=b64(event.preview),
                    partial_image_index=partial,
                    created_at=now,
                    **common,
                )
                partial += 1
                yield sse(e.type, e.model_dump())
            elif isinstance(event, Result):
                e = CompletedEvent(
                    type=f"{kind}.completed", b64_json=b64(event.png), created_at=now, **common
                )
                yield sse(e.type, e.model_dump())
                done += 1
            elif isinstance(event, End) and event.status != "ok":
                e = end_error(event, server.settings.timeout)
                yield sse(
                    "error",
                    {
                        "error": ErrorBody(
                            message=e.message, type=e.type, param=e.param, code=e.code
                        ).model_dump()
                    },
                )
    finally:
        if job.status in ("queued", "running"):
            server.worker.cancel(job.id)  # the client closed the stream


def _size(server, size: str, auto: tuple[int, int]) -> tuple[int, int]:
    if size in ("auto", "", None):
        return server.check_size(*auto)
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ApiError(400, f"size must be WIDTHxHEIGHT, like 1024x1024, got {size!r}", "size") from None
    return server.check_size(w, h)


def _image_size(image: Image.Image) -> tuple[int, int]:
    # an edit keeps the image's size, down to multiples of 16
    return max(16, image.width // 16 * 16), max(16, image.height // 16 * 16)


def _json_field(text: str, param: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ApiError(
            400, f'{param} must be JSON, like [{{"name": "style", "scale": 0.8}}]', param
        ) from None


def _validation_error(e: ValidationError) -> ApiError:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param)
