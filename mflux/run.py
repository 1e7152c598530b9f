"""`mflux run`: check every setting, resolve the model (pulling it when missing), then generate the images
in batches, save them, and print one line per image and a total.

Every check runs before the model is resolved, pulled or loaded (mflux.settings), so a bad seed, size,
file or prompt-file line costs nothing.
"""

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from mflux import settings as st
from mflux.errors import InvalidArgument, MfluxError
from mflux.runtime import trace


def resolve_model(model: str | None, path: str | None, quantize: int | None, pull: bool, ranks: int = 1):
    """(folder path or store name, quantize) for `--model`/`--path`; pulls a missing catalog model."""
    from mflux.store import NotStored, Store

    if model and path:
        raise InvalidArgument("give either --model or --path, not both")
    if path:
        return ("path", path), quantize
    model = model or "schnell"
    store = Store()
    try:
        found = store.resolve(model)
    except NotStored as e:
        if e.pull is None:
            raise
        _check_quantize(model, e.bits, quantize)
        _pull(e.pull, pull, ranks)
        found = store.resolve(model)
    _check_quantize(model, found.bits, quantize)
    if found.bits is not None:
        click.echo(
            f"{model}: quantizing {found.name} to {found.bits} bits at load time "
            f"(keep a quantized copy with: mflux quantize {found.name} --bits {found.bits})",
            err=True,
        )
        quantize = found.bits
    return ("name", found.name), quantize


def model_variant(model: str | None, path: str | None, variant: str | None) -> str:
    """The variant a run will use, known before any pull or load (the settings are checked for it): the
    folder's manifest or configs, the stored model's manifest, or the catalog entry a pull would fetch."""
    from mflux.folders import open_folder
    from mflux.manifest import REDUX, not_a_pipeline, read_manifest
    from mflux.store import NotStored, Store

    if path:
        return open_folder(path, variant=variant).variant
    try:
        found = Store().resolve(model or "schnell")
    except NotStored as e:
        if e.pull is None:
            raise  # an unknown name, with the names it may mean
        variant = e.pull  # a catalog entry is named after its variant
    else:
        variant = read_manifest(found.path).variant
    if variant == REDUX:
        raise not_a_pipeline(model)
    return variant


def check_fit(model, path, quantize, variant, precision, jobs: list[st.Job], batch_size, low_memory) -> None:
    """Refuse, before any pull or load, a run whose largest generation can't fit (mflux.fit)."""
    from mflux import fit
    from mflux.backend import default_precision
    from mflux.runtime.models import default_batch_size

    found = fit.find_model(model, path, quantize, variant)
    largest = max(jobs, key=lambda j: (j.settings.height or 1024) * (j.settings.width or 1024)).settings
    rows = min(batch_size or default_batch_size(len(jobs)), len(jobs))
    plan = fit.plan_for(
        found.architecture,
        found.stored,
        precision or default_precision(),
        found.bits,
        height=largest.height or 1024,
        width=largest.width or 1024,
        batch=rows * (2 if (largest.true_cfg or 1) > 1 else 1),  # true CFG's two halves are rows of one batch
        text_tokens=found.text_tokens,
        low_memory=low_memory,
    )
    fit.preflight(found.name, plan, found.bits)


def _in_store(model: str | None) -> bool:
    from mflux.store import NotStored, Store

    try:
        Store().resolve(model or "schnell")
    except NotStored:
        return False
    return True


def _check_quantize(model: str, bits: int | None, quantize: int | None) -> None:
    if bits is not None and quantize not in (None, bits):
        raise InvalidArgument(f"--model {model} means {bits}-bit, but --quantize is {quantize}")


def _pull(base: str, pull: bool, ranks: int) -> None:
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
    hub_pull(base)


@dataclass
class Plan:
    """Everything `run` will make, checked: the generations, their images in order, and notes."""

    generations: list[st.Settings]
    jobs: list[st.Job]
    outputs: dict[int, Path]  # job index -> the file it is meant for (a taken name gets `_N`)
    notes: list[str] = field(default_factory=list)
    model: str | None = None  # the model an image given to --from was made with
    precision: str | None = None  # and its precision
    model_path: str | None = None  # and its folder, where it was made with --path
    redux_model: str | None = None  # and the Redux model its --redux images went through


def plan(
    values: dict,
    explicit: set[str],
    *,
    output: str = "image.png",
    n: int | None = None,
    batch_size: int | None = None,
    prompt_file: str | None = None,
    from_image: str | None = None,
    stepwise: str | None = None,
    stepwise_every: int | None = None,
    agree=list,
    variant: str = "schnell",
    recalled: st.Recalled | None = None,
) -> Plan:
    """Check every setting for `variant` and name every output, touching no model. `values` are Settings
    fields as the flags give them; `explicit` names those given on the command line. `agree` makes random
    seeds the same on every rank (mflux.distributed.agree). `recalled`: `from_image`'s settings, read."""
    _check_flags(values, explicit, n, batch_size, prompt_file, from_image, stepwise, stepwise_every)
    out = st.check_output(output)
    if n is not None:  # -n replaces the seeds, also those an image records
        values, explicit = {**values, "seeds": []}, explicit | {"seeds"}
    notes, model, precision, model_path, redux_model = [], None, None, None, None
    if from_image:
        s, recalled, notes = st.recall(from_image, values, explicit, variant, recalled)
        generations, model, precision = [s], recalled.model, recalled.precision
        model_path, redux_model = recalled.model_path, recalled.redux_model
    elif prompt_file:
        base = st.Settings(**{k: v for k, v in values.items() if k != "prompt"})
        generations = st.read_prompt_file(prompt_file, base, explicit, variant)
    else:
        generations = [st.check(st.Settings(**values), explicit, variant=variant)]
    for s in generations:
        if not s.seeds:
            s.seeds = agree(st.random_seeds(n or 1))
    jobs = st.jobs(generations)
    outputs = output_paths(out, jobs, bool(prompt_file))
    return Plan(generations, jobs, outputs, notes, model, precision, model_path, redux_model)


def _check_flags(values, explicit, n, batch_size, prompt_file, from_image, stepwise, stepwise_every) -> None:
    """The flags that exclude or need each other, and the counts."""
    if prompt_file and from_image:
        raise InvalidArgument("give --prompt-file or --from, not both")
    if prompt_file and "prompt" in explicit:
        raise InvalidArgument("give --prompt or --prompt-file, not both (the file holds the prompts)")
    prompted = values.get("prompt") is not None or values.get("redux")  # "" is a prompt; Redux needs none
    if not (prompt_file or from_image or prompted):
        raise InvalidArgument("give --prompt, --prompt-file or --from (see: mflux run --help)")
    if n is not None and values.get("seeds"):
        raise InvalidArgument("give --seed or -n, not both")
    if n is not None and n < 1:
        raise InvalidArgument(f"-n must be at least 1, got {n}")
    if batch_size is not None and batch_size < 1:
        raise InvalidArgument(f"--batch-size must be at least 1, got {batch_size}")
    if stepwise is not None and Path(stepwise).exists() and not Path(stepwise).is_dir():
        raise InvalidArgument(f"--stepwise {stepwise} is a file; give a folder for the step images")
    if stepwise_every is not None and stepwise is None:
        raise InvalidArgument("--stepwise-every needs --stepwise DIR")
    if stepwise_every is not None and stepwise_every < 1:
        raise InvalidArgument(f"--stepwise-every must be at least 1, got {stepwise_every}")


def output_paths(output: Path, jobs: list[st.Job], from_file: bool) -> dict[int, Path]:
    """`image.png` for one image; `image_seed_<seed>.png` for several seeds; `image_line<N>_seed_<seed>.png`
    for line N of a prompt file. A name already taken gets `_1`, `_2`... when it is written."""
    if len(jobs) == 1 and not from_file:
        return {jobs[0].index: output}
    names = {}
    for j in jobs:
        line = f"_line{j.settings.source.rsplit(':', 1)[1]}" if from_file else ""
        names[j.index] = output.with_name(f"{output.stem}{line}_seed_{j.seed}{output.suffix}")
    return names


@dataclass
class Written:
    path: Path
    seed: int
    seconds: float  # its batch's denoising and decoding, divided among the batch's images
    prompt: str
    source: str | None  # the prompt file line


def run(
    prompt: str | None = None,
    *,
    model: str | None = None,
    path: str | None = None,
    variant: str | None = None,
    output: str = "image.png",
    seeds: list[int] | None = None,
    n: int | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    true_cfg: float | None = None,
    image: str | None = None,
    mask: str | None = None,
    strength: float | None = None,
    expand: tuple[int, int, int, int] | None = None,
    control: str | None = None,
    control_from: str | None = None,
    canny: bool = False,
    canny_thresholds: tuple[float, float] | None = None,
    save_control: bool = False,
    redux: list[str] | None = None,
    redux_scales: list[float] | None = None,
    redux_model: str | None = None,
    prompt_file: str | None = None,
    from_image: str | None = None,
    stepwise: str | None = None,
    stepwise_every: int | None = None,
    quantize: int | None = None,
    lora_paths: list[str] | None = None,
    lora_scales: list[float] | None = None,
    batch_size: int | None = None,
    metadata: bool = False,
    precision: str | None = None,
    pull: bool = True,
    verify: bool = False,
    verbose: bool = False,
    as_json: bool = False,
    explicit: set[str] | None = None,
    parallel: str = "data",
    low_memory: bool = False,
    ignore_memory: bool = False,
) -> list[Written]:
    """Generate every image the settings ask for and return what this process wrote. `explicit` names
    the Settings fields given on the command line (default: every one that is not None). Under
    `mlx.launch`, `parallel` "data" splits the images over the ranks and "sequence" spreads each image
    over them (mflux.distributed); in one process both are the plain run. `low_memory` loads one
    component at a time with T5 at 4 bits and a banded decode (`Flux1`'s `low_memory`); a run whose
    expected peak exceeds the memory the backend can use is refused first (mflux.fit), unless
    `ignore_memory`."""
    from mflux import distributed

    start = time.perf_counter()
    if parallel not in distributed.PARALLEL_MODES:
        raise InvalidArgument(
            f"--parallel must be one of {', '.join(distributed.PARALLEL_MODES)}, got {parallel!r}"
        )
    world = distributed.world()
    rank, size = world.rank(), world.size()
    if as_json and size > 1:
        raise InvalidArgument(
            "--json under mlx.launch: every rank would print its own document (drop --json)"
        )
    values = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seeds": list(seeds or []),
        "steps": steps,
        "width": width,
        "height": height,
        "guidance": guidance,
        "true_cfg": true_cfg,
        "image": image,
        "mask": mask,
        "strength": strength,
        "expand": expand,
        "control": control,
        "control_from": control_from,
        "canny": canny,
        "canny_thresholds": canny_thresholds,
        "loras": st.loras(lora_paths, lora_scales),
        "redux": list(redux or []),
        "redux_scales": list(redux_scales or []),
    }
    if explicit is None:
        explicit = {k for k, v in values.items() if v not in (None, [], False)}
    _check_flags(values, explicit, n, batch_size, prompt_file, from_image, stepwise, stepwise_every)
    recalled = None
    if from_image and not (model or path):
        recalled = st.read_image_settings(from_image)
        model, path = _recalled_model(recalled.model, recalled.model_path, from_image)
    p = plan(
        values,
        set(explicit),
        output=output,
        n=n,
        batch_size=batch_size,
        prompt_file=prompt_file,
        from_image=from_image,
        stepwise=stepwise,
        stepwise_every=stepwise_every,
        agree=lambda seeds: distributed.agree(world, seeds),
        variant=model_variant(model, path, variant),
        recalled=recalled,
    )
    maps = _edge_maps(p.generations, save_control)
    for note in [*p.notes, *(x for s in p.generations for x in s.notes)]:
        click.echo(f"note: {note}", err=True)
    if not ignore_memory and (pull or path or _in_store(model)):  # --no-pull's refusal comes first
        check_fit(model, path, quantize, variant, precision, p.jobs, batch_size, low_memory)
    (kind, where), quantize = resolve_model(model, path, quantize, pull, size)
    prior, redux_name = _redux_prior(p, redux_model, precision, pull, size)

    from mflux.runtime.parallel import SequenceParallel, shard_rows

    sequence = parallel == "sequence" and size > 1
    # data parallel: every size-th image; sequence parallel: all of them, rank 0 writes
    jobs = p.jobs if sequence else [p.jobs[i] for i in shard_rows(len(p.jobs), rank, size)]
    saves = rank == 0 or not sequence
    owed = distributed.Owed(rank, [p.outputs[j.index] for j in jobs] if saves else [])
    # the bar on a terminal only: in a pipe or a log its carriage returns pile up on one line, and the
    # `wrote FILE` line each image gets already says how far it is
    bar = rank == 0 and _on_a_terminal()
    sp = SequenceParallel(world) if sequence else None
    out = _Out(owed, saves, bar, sp, maps, save_control, prior=prior, redux_model=redux_name)
    written: dict[int, Written] = {}
    seconds: dict[str, float] = {}
    memory: dict[str, int] = {}
    with owed if size > 1 else contextlib.nullcontext():
        flux, loras = None, None
        groups = _by_loras(st.groups(jobs))
        for n, group in enumerate(groups, 1):
            s = group[0].settings
            if flux is None or s.loras != loras:
                flux = None  # free the last model before the next loads
                flux = _open(kind, where, variant, precision, quantize, s.loras, verify, low_memory)
                loras = s.loras
                verify = False  # the files were re-hashed when the first set of LoRAs opened the model
                _notes_on(flux, explicit, p.precision)
                _lora_notes(flux, s.loras)
            previews = _preview_steps(flux, s, stepwise_every) if stepwise else False
            last = n == len(groups)  # only then may the transformer go before the decode
            for done in _generate(
                flux, group, p.outputs, batch_size, metadata, stepwise, previews, seconds, memory, last, out
            ):
                written[done.index] = done.written
        # inside: a SIGTERM while waiting for the other ranks still says what is missing (nothing)
        count = distributed.total(world, len(written), "its messages say which images it did not write")
    results = [written[i] for i in sorted(written)]
    if results:
        _summary(results, seconds, memory, time.perf_counter() - start, verbose, as_json)
    if rank == 0 and size > 1:
        over = "each image over" if sequence else "the images over"
        click.echo(f"{count} of {len(p.jobs)} images written, {over} {size} ranks")
    return results


@dataclass
class _Out:
    """What this rank does with a finished image (mflux.distributed)."""

    owed: object  # distributed.Owed: the files still to write, printed on SIGTERM
    saves: bool  # False on the helping ranks of sequence parallelism
    progress: bool  # the progress bar: rank 0 only, on a terminal
    sp: object | None  # a runtime.parallel.SequenceParallel, or None
    maps: dict = field(default_factory=dict)  # _map_key(settings) -> the edge map --canny computed
    save_control: bool = False  # write each edge map beside the first image made from it
    saved: set = field(default_factory=set)  # the _map_key of each edge map written
    prior: object | None = None  # a flux1.ReduxPrior, where a generation has --redux images
    redux_model: str | None = None  # its store name, or its folder: what the metadata records


def _redux_prior(p: Plan, redux_model: str | None, precision: str | None, pull: bool, ranks: int):
    """The ReduxPrior the --redux images go through (None without them), its folder found (or pulled)
    before any model loads: --redux-model NAME|PATH, else the one the --from image records, else `redux`."""
    if not any(s.redux for s in p.generations):
        if redux_model is not None:
            raise InvalidArgument(
                "--redux-model needs --redux IMAGE (the images it turns into prompt tokens)"
            )
        return None, None
    from mflux.flux1 import ReduxPrior

    name, folder = redux_folder(redux_model or p.redux_model, pull, ranks)
    return ReduxPrior.from_path(folder, precision=precision), name


def redux_folder(model: str | None, pull: bool, ranks: int = 1) -> tuple[str, Path]:
    """(what to record, folder) of a Redux model: a store entry by name (default `redux`, pulled when
    missing, as models are), or a folder laid out as FLUX.1-Redux-dev (recorded as its absolute path)."""
    from mflux.folders import check_files
    from mflux.manifest import REDUX, read_manifest
    from mflux.store import NotStored, Store

    if model is not None and ("/" in model or Path(model).is_dir()):
        if not Path(model).is_dir():
            raise InvalidArgument(
                f"--redux-model {model}: no such folder (give a store name or a Redux folder)"
            )
        return str(Path(model).absolute()), Path(model).absolute()
    store = Store()
    try:
        found = store.resolve(model or REDUX)
    except NotStored as e:
        if e.pull != REDUX:
            raise
        _pull(REDUX, pull, ranks)
        found = store.resolve(model or REDUX)
    manifest = read_manifest(found.path)
    if manifest.variant != REDUX:
        raise InvalidArgument(
            f"--redux-model {found.name} is a {manifest.variant} model, not FLUX.1 Redux (get it: mflux pull redux)"
        )
    check_files(found.path, manifest)
    return found.name, found.path


def _edge_maps(generations: list[st.Settings], save_control: bool) -> dict:
    """The edge maps --control-from PHOTO --canny asks for, computed before any model loads; each photo and
    thresholds once."""
    if save_control and not any(s.control_from for s in generations):
        raise InvalidArgument(
            "--save-control saves the edge map --canny computes: give --control-from PHOTO --canny"
        )
    maps = {}
    for s in generations:
        if s.control_from is not None and _map_key(s) not in maps:
            maps[_map_key(s)] = st.edge_map(s)
    return maps


def _map_key(s: st.Settings) -> tuple:
    return (s.control_from, s.canny_thresholds)


def _edge_map_record(s: st.Settings) -> dict:
    """What an image's metadata says of the edge map it followed: the photo and the detector's thresholds."""
    return {
        "control_from_path": str(Path(s.control_from).resolve()),
        "control_from_sha256": s.control_from_sha256,
        "canny_thresholds": list(s.canny_thresholds),
    }


def _save_edge_map(out: "_Out", s: st.Settings, image_path: Path) -> None:
    """`<image stem>_control.png` beside the first image made from a computed edge map (--save-control)."""
    from PIL import Image

    from mflux.metadata import free_path

    if _map_key(s) in out.saved:
        return
    out.saved.add(_map_key(s))
    edges = Image.fromarray(out.maps[_map_key(s)])
    path = _save_plain(edges, free_path(image_path.with_name(f"{image_path.stem}_control.png")))
    click.echo(f"wrote {path} (the edge map)", err=True)


def _by_loras(groups: list[list[st.Job]]) -> list[list[st.Job]]:
    """The groups with the same LoRAs next to each other, so each set of LoRAs loads the model once."""
    first: dict[tuple, int] = {}
    for g in groups:
        first.setdefault(tuple(g[0].settings.loras), len(first))
    return sorted(groups, key=lambda g: first[tuple(g[0].settings.loras)])


def _recalled_model(name: str | None, folder: str | None, image: str) -> tuple[str | None, str | None]:
    """(store name, folder) of the model an image was made with: its folder where it was made with
    --path, else its name where this store has it or can pull it; (None, None) where it records none.
    Never another model: one that can't be found is refused before anything loads."""
    from mflux.store import NotStored, Store

    if folder:
        if not Path(folder).is_dir():
            raise MfluxError(
                f"{image} was made with the model folder {folder}, which is gone (give -m or --path)"
            )
        click.echo(
            f"note: model folder {folder}, from the image (give -m or --path to use another)", err=True
        )
        return None, folder
    if not name:
        return None, None
    try:
        Store().resolve(name)
    except (NotStored, InvalidArgument) as e:
        if getattr(e, "pull", None) is None:
            raise MfluxError(
                f"{image} was made with {name!r}, which is not in the store and mflux cannot pull "
                "(give -m or --path)"
            ) from None
    click.echo(f"note: model {name}, from the image (give -m to use another)", err=True)
    return name, None


def _open(kind, where, variant, precision, quantize, loras, verify: bool, low_memory: bool = False):
    from mflux.flux1 import Flux1

    kwargs = dict(
        precision=precision,
        quantize=quantize,
        low_memory=low_memory,
        lora_paths=[path for path, _ in loras],
        lora_scales=[scale for _, scale in loras],
        verify=verify,
    )
    if kind == "path":
        return Flux1.from_path(where, variant=variant, **kwargs)
    return Flux1.from_name(where, **kwargs)


def _notes_on(flux, explicit: set, recorded_precision: str | None) -> None:
    if "guidance" in explicit and flux.variant == "schnell":
        click.echo("warning: --guidance applies to dev only; schnell ignores it", err=True)
    if recorded_precision and recorded_precision != flux.precision:
        click.echo(
            f"note: the image was made at {recorded_precision}, this run uses {flux.precision} "
            f"(give --precision {recorded_precision} to replay it exactly)",
            err=True,
        )


def _lora_notes(flux, loras: list) -> None:
    # A LoRA `mflux train` wrote names the variant it was trained on; on the other one it still loads
    # (the layers are the same), but draws what it learnt less faithfully.
    from mflux.runtime.weights import SafetensorsFile

    for path, _ in loras:
        trained_on = SafetensorsFile(path).metadata.get("mflux.variant")
        if trained_on and trained_on != flux.variant:
            click.echo(
                f"note: the LoRA {path} was trained on {trained_on} (its mflux.variant), this model is "
                f"{flux.variant}: it may not draw as it did in training",
                err=True,
            )


@dataclass
class _Done:
    index: int
    written: Written


def _preview_steps(flux, s: st.Settings, every: int | None):
    """What Flux1.generate's `previews` takes: True (every step), or every `every`-th step and the last."""
    if not every or every == 1:
        return True
    from mflux.runtime.engine import schedule

    steps = s.steps or flux.folder.defaults["steps"]
    strength = s.strength if s.image and s.strength is not None else 1.0
    total = len(schedule(steps, 1, None, strength)) - 1  # img2img cuts steps
    return sorted({*range(every, total + 1, every), total})


def _generate(flux, group, outputs, batch_size, metadata, stepwise, previews, seconds, memory, last, out):
    """Run one group of jobs (shared settings) through Flux1.generate; yields each image as it is saved."""
    from mflux.flux1 import Config, ImageEvent, StepEvent

    s = group[0].settings
    config = Config(
        num_inference_steps=s.steps,
        height=s.height,
        width=s.width,
        guidance=s.guidance,  # None: the model's default
    )
    seeds = [j.seed for j in group]
    embeds = _redux_embeds(flux, out, s) if s.redux else None
    events = flux.generate(
        seeds,
        None if embeds is not None else [j.settings.prompt for j in group],
        config,
        negative_prompt=[j.settings.negative_prompt for j in group] if s.true_cfg else None,
        true_cfg_scale=s.true_cfg,
        image=s.image,
        mask_image=s.mask,
        strength=s.strength,
        expand=s.expand,
        control_image=out.maps[_map_key(s)] if s.control_from else s.control,
        prompt_embeds=embeds,
        batch_size=batch_size,
        previews=previews,
        free_text_encoders=True,
        free_modulation_weights=True,
        free_transformer=last,
        sequence_parallel=out.sp,
    )
    shown: dict[int, list] = {}  # row -> [(step, preview)]
    phases: dict[str, float] = {}
    for event in events:
        if isinstance(event, StepEvent):
            if out.progress:
                _progress(event, seeds)
            for row, preview in zip(event.indices, event.previews or []):
                shown.setdefault(row, []).append((event.step, preview))
        elif isinstance(event, ImageEvent):
            job = group[event.index]
            image = event.image
            if job.settings.source:
                image.metadata["prompt_file_line"] = job.settings.source
            if job.settings.control_from:
                image.metadata.update(_edge_map_record(job.settings))
            t = image.metadata["timings"]
            _add_timings(phases, memory, image, first=event.index == event.batch[0])
            if not out.saves:
                continue
            with out.owed.writing(outputs[job.index]):
                path = image.save(outputs[job.index], export_json_metadata=metadata, overwrite=False)
                click.echo(f"wrote {path}", err=True)
                if out.save_control and s.control_from:
                    _save_edge_map(out, s, path)
            trace.mark("image written")
            if stepwise is not None:
                write_steps(Path(stepwise), path.stem, shown.pop(event.index, []))
            share = (t.get("denoising", 0.0) + t.get("decoding", 0.0)) / len(event.batch)
            yield _Done(job.index, Written(path, job.seed, share, job.settings.prompt, job.settings.source))
    for k, v in phases.items():
        seconds[k] = seconds.get(k, 0.0) + v


def _redux_embeds(flux, out: _Out, s: st.Settings):
    """The group's prompt tokens, made by Redux from its images (and prompt); each --redux-scale scales an
    image's whole sequence and its pooled vector alike, as diffusers' two scales set equal."""
    embeds = out.prior(flux, s.redux, prompt=s.prompt, prompt_embeds_scale=s.redux_scales,
                   pooled_prompt_embeds_scale=s.redux_scales)  # fmt: skip
    flux.free_text_encoders()  # as generate frees them once the prompts are encoded
    embeds.record["redux_model"] = out.redux_model
    return embeds


def _add_timings(seconds: dict, memory: dict, image, first: bool) -> None:
    """Fold one image's phase times into this generate call's. Load and text encoding are running
    totals of the call; denoising and decoding are its batch's, the same on each image of it."""
    for k, v in image.metadata["timings"].items():
        if k in ("load", "text_encoding"):
            seconds[k] = v
        elif first:
            seconds[k] = seconds.get(k, 0.0) + v
        memory[k] = max(memory.get(k, 0), image.peak_memory.get(k, 0))


def write_steps(folder: Path, stem: str, steps: list) -> list[Path]:
    """Each (step, decoded image) as `<stem>_step_<k>.png`, and `<stem>_steps.png`, all of them side by
    side (each scaled to at most 256 pixels high) above a band labelling each with its step number."""
    from PIL import Image

    from mflux.metadata import free_path

    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(steps[-1][0])) if steps else 1
    paths = [_save_plain(im, free_path(folder / f"{stem}_step_{k:0{width}d}.png")) for k, im in steps]
    if steps:
        first = steps[0][1]
        scale = min(1.0, 256 / first.height)
        tile = (max(1, round(first.width * scale)), max(1, round(first.height * scale)))
        band = label_height(tile[1])
        strip = Image.new("RGB", (tile[0] * len(steps), tile[1] + band), "white")
        for i, (k, im) in enumerate(steps):
            strip.paste(im.resize(tile, Image.LANCZOS) if scale < 1 else im, (i * tile[0], 0))
            strip.paste(step_label(k, tile[0], band), (i * tile[0], tile[1]))
        paths.append(_save_plain(strip, free_path(folder / f"{stem}_steps.png")))
    return paths


def label_height(tile_height: int) -> int:
    # a band under the frames rather than text over them, so each frame keeps the pixels of its step image
    return max(12, tile_height // 8)


def step_label(step: int, width: int, height: int):
    """A white band `width` x `height` with "step K" centred in black ("K" alone where that is too wide)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(8, height * 3 // 4))
    band = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(band)
    text = f"step {step}"
    if draw.textlength(text, font=font) > width - 2:
        text = str(step)
    draw.text((width / 2, height / 2), text, fill="black", font=font, anchor="mm")
    return band


def _save_plain(image, path: Path) -> Path:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _summary(results: list[Written], seconds: dict, memory: dict, total: float, verbose: bool, as_json: bool):
    if as_json:
        click.echo(
            json.dumps(
                {
                    "images": [
                        {
                            "file": str(w.path),
                            "seed": w.seed,
                            "seconds": round(w.seconds, 3),
                            "prompt": w.prompt,
                            "prompt_file_line": w.source,
                        }
                        for w in results
                    ],
                    "seconds": round(total, 3),
                    "phases": {k: round(v, 3) for k, v in seconds.items()},
                },
                indent=2,
            )
        )
        return
    width = max(len(str(w.path)) for w in results)
    for w in results:
        click.echo(f"{str(w.path):<{width}}  seed {w.seed}  {w.seconds:.2f}s")
    phases = ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in seconds.items())
    click.echo(f"{len(results)} image{'s' * (len(results) != 1)} in {total:.2f}s ({phases})")
    if verbose:
        click.echo(
            "peak memory: "
            + ", ".join(f"{k.replace('_', ' ')} {v / 2**30:.2f} GB" for k, v in memory.items()),
            err=True,
        )


def _on_a_terminal() -> bool:
    return sys.stderr.isatty()


def _progress(event, seeds: list[int]) -> None:
    """One progress line per batch on stderr: `seed 1, 2 [####    ] 2/4`."""
    width = 24
    done = width * event.step // event.total
    label = "seed " + ", ".join(str(seeds[i]) for i in event.indices)
    end = "\n" if event.step == event.total else ""
    click.echo(
        f"\r{label} [{'#' * done}{' ' * (width - done)}] {event.step}/{event.total}{end}", err=True, nl=False
    )
