"""`mflux run`: resolve the model (pulling it when missing), then write one image per seed."""

import contextlib
import time
from pathlib import Path

import click

from mflux.errors import InvalidArgument, MfluxError


def resolve_model(model: str | None, path: str | None, quantize: int | None, pull: bool, ranks: int = 1):
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
        if ranks > 1:  # the ranks would pull it at once, into one store or several
            raise MfluxError(
                f"model {base!r} is not in the store; under mlx.launch, pull it on every host first "
                f"(mflux pull {base})"
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
    parallel: str = "data",
) -> list[Path]:
    """Generate one image per seed and return the files this process wrote. Under `mlx.launch`,
    `parallel` "data" splits the seeds over the ranks and "sequence" spreads each image over them
    (see mflux.distributed); in one process both are the plain run."""

    from mflux import distributed
    from mflux.flux1 import Config, Flux1, check_seed
    from mflux.runtime.parallel import SequenceParallel, shard_rows

    if not prompt or not prompt.strip():
        raise InvalidArgument("--prompt is empty; describe the image to generate")
    if parallel not in distributed.PARALLEL_MODES:
        raise InvalidArgument(
            f"--parallel must be one of {', '.join(distributed.PARALLEL_MODES)}, got {parallel!r}"
        )
    config = Config(
        num_inference_steps=steps, height=height, width=width, guidance=3.5 if guidance is None else guidance
    )
    group = distributed.world()
    rank, size = group.rank(), group.size()
    seeds = [check_seed(s) for s in seeds] if seeds else distributed.agree(group, [int(time.time())])
    (kind, where), quantize = resolve_model(model, path, quantize, pull, size)

    kwargs = dict(precision=precision, quantize=quantize, lora_paths=lora_paths, lora_scales=lora_scales)
    if kind == "path":
        flux = Flux1.from_path(where, variant=variant, verify=verify, **kwargs)
    else:
        flux = Flux1.from_name(where, verify=verify, **kwargs)
    if guidance is not None and flux.variant == "schnell":
        click.echo("warning: --guidance applies to dev only; schnell ignores it", err=True)

    # Names come from the whole seed list, so every rank names an image as one process would.
    outputs = output_paths(output, seeds)
    sequence = parallel == "sequence" and size > 1
    mine = list(range(len(seeds))) if sequence or size == 1 else shard_rows(len(seeds), rank, size)
    writes = rank == 0 or not sequence  # in sequence parallel every rank holds the image; rank 0 writes it
    owed = distributed.Owed(rank, [outputs[i] for i in mine] if writes else [])
    # Encode once for every seed, free T5 and CLIP before the transformer loads (peak memory is the
    # larger half of the pipeline, not the whole), and compute every step's modulations up front so
    # the layers that make them can go: 6.4 GB at bf16.
    events = iter(())  # more ranks than images: this one has none
    if mine:
        events = flux.generate(
            [seeds[i] for i in mine],
            prompt,
            config,
            batch_size=batch_size,
            free_text_encoders=True,
            free_modulation_weights=True,
            sequence_parallel=SequenceParallel(group) if sequence else None,
        )
    with owed if size > 1 else contextlib.nullcontext():
        written, seconds, memory = _write_images(
            events, [seeds[i] for i in mine], [outputs[i] for i in mine], writes, owed, metadata, rank == 0
        )
        # inside: a SIGTERM while waiting for the other ranks still says what is missing (nothing)
        count = distributed.total(group, len(written))
    if rank:
        return written
    if size > 1:
        over = "each image over" if sequence else "the images over"
        click.echo(f"{count} of {len(seeds)} images written, {over} {size} ranks", err=True)
    label = "time (rank 0)" if size > 1 else "time"  # each rank has its own; rank 0 speaks for the run
    click.echo(
        f"{label}: " + ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in seconds.items()), err=True
    )
    if verbose:
        click.echo(
            "peak memory: "
            + ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f} GB" for k, v in memory.items()),
            err=True,
        )
    return written


def _write_images(events, seeds, outputs, save: bool, owed, metadata: bool, progress: bool):
    """Drive the events, writing each image as it is done: (files written, seconds, peak memory)."""
    from mflux.flux1 import ImageEvent, StepEvent

    seconds: dict[str, float] = {}
    memory: dict[str, int] = {}
    written = []
    for event in events:
        if isinstance(event, StepEvent):
            if progress:
                _progress(event, seeds)
        elif isinstance(event, ImageEvent):
            image = event.image
            if save:
                with owed.writing(outputs[event.index]):
                    written.append(
                        image.save(outputs[event.index], export_json_metadata=metadata, overwrite=False)
                    )
                    click.echo(f"wrote {written[-1]}")
            for k, v in image.metadata["timings"].items():
                # load and text encoding count up over the run; each batch has its own denoising and decoding
                if k in ("load", "text_encoding"):
                    seconds[k] = v
                elif event.index == event.batch[0]:
                    seconds[k] = seconds.get(k, 0.0) + v
                memory[k] = max(memory.get(k, 0), image.peak_memory.get(k, 0))
    return written, seconds, memory


def _progress(event, seeds: list[int]) -> None:
    """One progress line per batch on stderr: `seed 1, 2 [####    ] 2/4`."""
    width = 24
    done = width * event.step // event.total
    label = "seed " + ", ".join(str(seeds[i]) for i in event.indices)
    end = "\n" if event.step == event.total else ""
    click.echo(
        f"\r{label} [{'#' * done}{' ' * (width - done)}] {event.step}/{event.total}{end}", err=True, nl=False
    )
