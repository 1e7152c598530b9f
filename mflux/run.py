"""`mflux run`: resolve the model (pulling it when missing), then write one image per seed."""

import time
from pathlib import Path

import click

from mflux.errors import InvalidArgument, MfluxError


def resolve_model(model: str | None, path: str | None, quantize: int | None, pull: bool):
    """(folder path or store name, quantize) for `--model`/`--path`; pulls a missing catalog model."""
    from mflux.flux1 import _QUANT_NAME, check_bits
    from mflux.store import Store

    if model and path:
        raise InvalidArgument("give either --model or --path, not both")
    if path:
        return ("path", path), quantize
    model = model or "schnell"
    store = Store()
    if store.exists(model):
        return ("name", model), quantize
    m = _QUANT_NAME.match(model)
    base = m["base"] if m else model
    if m:
        check_bits(model, int(m["bits"]))
    if m and quantize not in (None, int(m["bits"])):
        raise InvalidArgument(f"--model {model} means {m['bits']}-bit, but --quantize is {quantize}")
    if not store.exists(base):
        from mflux.catalog import catalog

        if base not in catalog() and "/" not in base:
            store.get(model)  # the unknown-model error, with close names
        if not pull:
            raise MfluxError(
                f"model {base!r} is not in the store and --no-pull was given (run: mflux pull {base})"
            )
        from mflux.hub import pull as hub_pull

        click.echo(f"{base} is not in the store; pulling it first", err=True)
        base = hub_pull(base).name
    if m:
        click.echo(
            f"{model}: quantizing {base} to {m['bits']} bits at load time "
            f"(keep a quantized copy with: mflux quantize {base} --bits {m['bits']})",
            err=True,
        )
        quantize = int(m["bits"])
    return ("name", base), quantize


def output_paths(output: str, seeds: list[int]) -> list[Path]:
    out = Path(output)
    if len(seeds) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_seed_{s}{out.suffix}") for s in seeds]


def run(
    prompt: str,
    *,
    model: str | None = None,
    path: str | None = None,
    variant: str | None = None,
    output: str = "image.png",
    seeds: list[int] | None = None,
    height: int = 1024,
    width: int = 1024,
    steps: int | None = None,
    guidance: float | None = None,
    quantize: int | None = None,
    lora_paths: list[str] | None = None,
    lora_scales: list[float] | None = None,
    batch_size: int | None = None,
    metadata: bool = False,
    precision: str | None = None,
    pull: bool = True,
    verify: bool = False,
    verbose: bool = False,
) -> list[Path]:
    """Generate one image per seed and return the files written."""

    from mflux.flux1 import Config, Flux1, ImageEvent, StepEvent, check_seed

    if not prompt or not prompt.strip():
        raise InvalidArgument("--prompt is empty; describe the image to generate")
    config = Config(
        num_inference_steps=steps, height=height, width=width, guidance=3.5 if guidance is None else guidance
    )
    seeds = [check_seed(s) for s in seeds] if seeds else [int(time.time())]
    (kind, where), quantize = resolve_model(model, path, quantize, pull)

    kwargs = dict(precision=precision, quantize=quantize, lora_paths=lora_paths, lora_scales=lora_scales)
    if kind == "path":
        flux = Flux1.from_path(where, variant=variant, verify=verify, **kwargs)
    else:
        flux = Flux1.from_name(where, verify=verify, **kwargs)
    if guidance is not None and flux.variant == "schnell":
        click.echo("warning: --guidance applies to dev only; schnell ignores it", err=True)

    # Encode once for every seed, free T5 and CLIP before the transformer loads (peak memory is the
    # larger half of the pipeline, not the whole), and compute every step's modulations up front so
    # the layers that make them can go: 6.4 GB at bf16.
    events = flux.generate(
        seeds,
        prompt,
        config,
        batch_size=batch_size,
        free_text_encoders=True,
        free_modulation_weights=True,
    )
    seconds: dict[str, float] = {}
    memory: dict[str, int] = {}
    written = []
    outputs = output_paths(output, seeds)
    for event in events:
        if isinstance(event, StepEvent):
            _progress(event, seeds)
        elif isinstance(event, ImageEvent):
            image = event.image
            written.append(image.save(outputs[event.index], export_json_metadata=metadata, overwrite=False))
            click.echo(f"wrote {written[-1]}")
            for k, v in image.metadata["timings"].items():
                # load and text encoding count up over the run; each batch has its own denoising and decoding
                if k in ("load", "text_encoding"):
                    seconds[k] = v
                elif event.index == event.batch[0]:
                    seconds[k] = seconds.get(k, 0.0) + v
                memory[k] = max(memory.get(k, 0), image.peak_memory.get(k, 0))

    click.echo("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in seconds.items()), err=True)
    if verbose:
        click.echo(
            "peak memory: "
            + ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f} GB" for k, v in memory.items()),
            err=True,
        )
    return written


def _progress(event, seeds: list[int]) -> None:
    """One progress line per batch on stderr: `seed 1, 2 [####    ] 2/4`."""
    width = 24
    done = width * event.step // event.total
    label = "seed " + ", ".join(str(seeds[i]) for i in event.indices)
    end = "\n" if event.step == event.total else ""
    click.echo(
        f"\r{label} [{'#' * done}{' ' * (width - done)}] {event.step}/{event.total}{end}", err=True, nl=False
    )
