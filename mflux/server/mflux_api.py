"""mflux's own small dialect, what the web UI speaks: one generation as server-sent events (its place in
the queue, its start, each step with a preview every few steps, each image with its settings), and
cancelling a queued or running job by its id.

Seeds travel as strings: JavaScript numbers lose precision above 2**53, and seeds go up to 2**64 - 1.
"""

import re

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import BaseModel, Field, model_validator

from mflux.flux1 import MAX_SEED, kontext_size
from mflux.server.core import ApiError, b64, check_mask_size, end_error, off_loop, seed_run, sse, utf8_text
from mflux.server.worker import End, Job, Queued, Result, Started, Step

router = APIRouter(prefix="/mflux/v1")
_DIGITS = re.compile(r"[0-9]{1,20}")


class LoraChoice(BaseModel):
    name: str
    scale: float = 1.0


class GenerateRequest(BaseModel):
    _text = model_validator(mode="after")(utf8_text)
    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    width: int | None = None  # None: 1024, or with an image the edit's own size (see _size)
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    true_cfg_scale: float | None = None
    seed: str = ""  # decimal digits; "" or "-1": random
    count: int = 1
    loras: list[LoraChoice] = []
    image: str | None = None  # a data: URL or base64: img2img, a kontext model's reference, or to inpaint
    mask: str | None = None  # the image's size; white is repainted (transparent counts as black)
    strength: float | None = Field(None, gt=0, le=1)
    previews: bool = True
    preview_every: int | None = Field(None, ge=1)  # a preview every N steps; None: about five an image


class ImageOut(BaseModel):
    index: int
    seed: str
    png: str  # base64 PNG with its metadata
    settings: dict


@router.post("/generate")
async def generate(request: Request, body: GenerateRequest):
    server = request.app.state.server
    job = _job(server, body)
    if body.mask and not body.image:
        raise ApiError(400, "mask needs the image it masks (image)", "mask")
    if body.image:
        mode = server.edit_mode(job.model, bool(body.mask))
        if mode == "instruction" and body.strength is not None:
            raise ApiError(
                400, "strength: a kontext model edits by instruction and takes no strength", "strength"
            )
        job.image, job.mask = await off_loop(_images, server, body.image, body.mask)
        job.width, job.height = _size(server, body, mode, job.image)
        job.strength = body.strength  # None: the model's default (img2img 0.6, fill 1.0; kontext none)
    else:
        server.check_text_only(job.model)
    server.submit(job)
    return StreamingResponse(_stream(server, job), media_type="text/event-stream")


@router.delete("/jobs/{job_id}")
def cancel(request: Request, job_id: str) -> dict:
    if not request.app.state.server.worker.cancel(job_id):
        raise ApiError(404, f"no queued or running job {job_id!r}", "job_id")
    return {"cancelled": job_id}


def _job(server, body: GenerateRequest) -> Job:
    server.check_prompt(body.prompt)
    server.check_prompt(body.negative_prompt, "negative_prompt", empty_ok=True)
    n = server.check_count(body.count, "count")
    width, height = server.check_size(body.width or 1024, body.height or 1024)
    job = Job(
        prompt=body.prompt,
        seeds=seed_run(_seed(body.seed), n),
        model=server.check_model(body.model),
        width=width,
        height=height,
        steps=server.check_steps(body.steps),
        guidance=body.guidance,
        negative_prompt=body.negative_prompt or None,
        true_cfg_scale=body.true_cfg_scale,
        loras=server.resolve_loras([(lo.name, lo.scale) for lo in body.loras]),
        preview_every=body.preview_every if body.previews else 0,
    )
    return job


def _seed(text: str) -> int | None:
    """The first seed from the form's text; None: random. ASCII digits only (str.isdigit takes "²"), and
    at most 20 of them, the length of the largest seed (int() refuses 4300 and more)."""
    seed = text.strip()
    if seed in ("", "-1"):
        return None
    if not _DIGITS.fullmatch(seed):
        shown = seed if len(seed) <= 24 else f"{seed[:20]}... ({len(seed)} characters)"
        raise ApiError(
            400, f"seed must be 0..{MAX_SEED} in digits 0-9 (or empty for random), got {shown!r}", "seed"
        )
    return int(seed)


def _images(server, image: str, mask: str | None) -> tuple[Image.Image, Image.Image | None]:
    """The image as RGB, and the mask as mflux's: white is repainted, and a transparent pixel counts as
    black (white strokes on a transparent canvas work too); run off the event loop."""
    image = server.decode_image(image, "image").convert("RGB")
    if not mask:
        return image, None
    mask = server.decode_image(mask, "mask")
    check_mask_size(mask, image)
    if "A" in mask.getbands():
        mask = Image.alpha_composite(Image.new("RGBA", mask.size, "black"), mask.convert("RGBA"))
    return image, mask.convert("L")


def _size(server, body: GenerateRequest, mode: str, image: Image.Image) -> tuple[int, int]:
    """The size asked for; else a kontext edit's trained resolution nearest the reference's aspect, or
    another edit's image size (down to multiples of 16)."""
    if body.width and body.height:
        return body.width, body.height
    if mode == "instruction":
        return server.check_size(*kontext_size(*image.size))
    return server.check_size(max(16, image.width // 16 * 16), max(16, image.height // 16 * 16))


async def _stream(server, job: Job):
    yield sse("queued", {"job_id": job.id, "seeds": [str(s) for s in job.seeds]})
    try:
        async for event in job.events():
            if isinstance(event, Queued):
                yield sse("position", {"position": event.position})
            elif isinstance(event, Started):
                yield sse("started", {})
            elif isinstance(event, Step):
                data = {"step": event.step, "total": event.total}
                if event.preview:
                    data["preview"] = b64(event.preview)
                yield sse("step", data)
            elif isinstance(event, Result):
                settings = {k: (str(v) if k == "seed" else v) for k, v in event.metadata.items() if _plain(v)}
                out = ImageOut(index=event.index, seed=str(event.seed), png=b64(event.png), settings=settings)
                yield sse("image", out.model_dump())
            elif isinstance(event, End):
                e = end_error(event, server.settings.timeout)
                yield sse("end", {"status": event.status, "error": e.message if e else None})
    finally:
        if job.status in ("queued", "running"):
            server.worker.cancel(job.id)  # the page closed the stream


def _plain(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
