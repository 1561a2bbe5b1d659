"""Where and how the image commands write: one rule for generate, sample, img2img, inpaint, outpaint and upscale,
and the writers every one of them uses (write_batches for grids and folders, write_edits for edits).

An output is never an input: a path that names one of the command's input files (the same file by name, by a
symbolic link or by a hard link) is refused. An existing file is never replaced unless the user asks for it
(--overwrite): the command writes `name-1.png` instead (then `name-2.png`, ...) and says so. Every name is claimed
before the model loads by creating it with O_CREAT | O_EXCL, so two runs started at once never pick the same name;
the finished image then replaces the empty claimed file in one rename (data.images.write_image), and a claim that
got no image (an error, a withheld image) is removed again.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image

from ..checkpoint import check_output_path
from ..data.images import BOX_KEYS, Sign, check_writable, grid_layout, save_grid, to_pil, to_tensor, write_image
from ..distributed import World
from ..errors import InputError, OutputWriteError
from ..ldm import LatentDiffusion
from ..runtime import resolve_device
from ..shipped import load_model
from .plan import collect
from .record import model_record
from .request import SampleRequest

MAX_SUFFIX = 9_999  # name-1 .. name-9999: past this the folder is full of earlier results


def check_not_input(out: str | Path, inputs: Iterable[str | Path], option: str = "--out") -> None:
    """InputError when the output `out` is one of `inputs`, or the same file under another name (a symbolic or hard
    link: os.path.samefile), which writing would destroy."""
    out = Path(out)
    for given in inputs:
        same = out.exists() and Path(given).exists() and os.path.samefile(out, given)
        if same or out.absolute() == Path(given).absolute():
            how = "" if Path(given).absolute() == out.absolute() else f" (the same file as {given})"
            raise InputError(
                f"{option} {out} is an input of this command{how}; writing there would destroy it, so name "
                f"another {option}"
            )


def _numbered(path: Path, k: int) -> Path:
    return path if k == 0 else path.with_name(f"{path.stem}-{k}{path.suffix}")


def _create(path: Path) -> bool:
    """Create `path` empty, only if absent (O_EXCL: atomic against other processes); False when it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


@dataclass
class Claims:
    """Output files claimed for one run: `paths[i]` is where output i goes (`wanted[i]` unless that existed)."""

    wanted: list[Path]
    paths: list[Path] = field(default_factory=list)
    created: list[bool] = field(default_factory=list)  # an empty file made by this run (removed if left unwritten)

    def moved(self) -> list[tuple[Path, Path]]:
        """(wanted, actual) for each output written under another name because the wanted one existed."""
        return [(w, p) for w, p in zip(self.wanted, self.paths) if w != p]

    def release(self, written: Iterable[str | Path] = ()) -> None:
        """Remove the empty files this run claimed but did not write (an error, a withheld image)."""
        done = {Path(p).absolute() for p in written}
        for path, made in zip(self.paths, self.created):
            if made and path.absolute() not in done:
                try:
                    if path.stat().st_size == 0:
                        path.unlink()
                except OSError:
                    pass


def claim(
    wanted: Iterable[str | Path], inputs: Iterable[str | Path] = (), overwrite: bool = False, option: str = "--out"
) -> Claims:
    """Claim each wanted output file (see the module's doc): refuse an input, keep an existing file unless
    `overwrite`, else take the first free `name-k`. Call Claims.release when the run ends, written or not."""
    inputs = [Path(p) for p in inputs if p is not None]
    claims = Claims([Path(p) for p in wanted])
    try:
        for path in claims.wanted:
            check_not_input(path, inputs, option)
            if overwrite:
                claims.paths.append(path)
                claims.created.append(not path.exists() and _create(path))
                continue
            for k in range(MAX_SUFFIX + 1):
                candidate = _numbered(path, k)
                if candidate not in claims.paths and _create(candidate):
                    claims.paths.append(candidate)
                    claims.created.append(True)
                    break
            else:
                raise InputError(
                    f"{option} {path}: {path.name} and {_numbered(path, 1).name} to "
                    f"{_numbered(path, MAX_SUFFIX).name} all exist; name another {option}, or give --overwrite "
                    f"to replace {path.name}"
                )
    except BaseException:
        claims.release()
        raise
    for w, p in claims.moved():
        warnings.warn(f"{w} exists, so this run writes {p} instead (--overwrite replaces {w.name})", stacklevel=2)
    return claims


@dataclass(frozen=True)
class Target(os.PathLike):
    """An output path with the rule it is written under, as the command line gives it to the writers. A plain path
    given to a writer means Target(path): replace an existing file (the library's behaviour), never an input."""

    path: Path
    overwrite: bool = True  # replace an existing file; False: write name-1, name-2, ... beside it
    inputs: tuple[Path, ...] = ()  # files the run reads, beside those the writer knows (the model, the image)

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def as_target(out: str | Path | Target) -> Target:
    return out if isinstance(out, Target) else Target(Path(out))


def reading(out: str | Path | Target, *inputs: str | Path) -> Target:
    """`out` as a Target that also knows the run reads `inputs` (an edit's image and mask), so that it never
    writes over them: the writers take the inputs from here, not from the generation record (which holds only their
    names and hashes)."""
    target = as_target(out)
    return replace(target, inputs=(*target.inputs, *(Path(p) for p in inputs)))


WITHHELD_GREY = 128  # the tile a grid shows where an image was withheld

# What happens to images between sampling and their file (the commands' governance screen): finish(images, index of
# the first) -> for each image what to write (None: nothing, it was withheld) and facts to embed with its parameters.
Finish = Callable[[list[Image.Image], int], list[tuple[Image.Image | None, dict]]]


def check_output(out: str | Path, folder: bool, metadata: dict[str, str] | None = None, signed: bool = False) -> Path:
    """Refuse, before any work, an output the writing would fail on: a file name without an extension or with one
    ldmkit does not write (or parameters a JPEG cannot hold, or a signature a format other than PNG cannot), a
    folder where a file is expected or the reverse, a parent folder that cannot be created or written. folder:
    `out` is a folder of PNGs (--separate) rather than one image file."""
    out = Path(out)
    if not folder:
        if not out.suffix:
            raise InputError(
                f"--out {out} has no extension, so it names no image format; write {out}.png, or end it in one of "
                f".png, .jpg, .jpeg, .webp"
            )
        check_writable(out, metadata, signed)
    return check_output_path(out, "--out", folder=folder)


def write_or_rescue(write, out: Path) -> Path:
    """write(out); when that fails (a full disk, a folder removed meanwhile) write to a temporary file instead and
    raise the error naming it, so sampled images are never lost."""
    try:
        return write(out)
    except OSError as e:
        fd, rescue = tempfile.mkstemp(prefix="ldmkit-rescued-", suffix=out.suffix)
        os.close(fd)
        try:
            write(Path(rescue))
        except OSError:
            os.unlink(rescue)
            raise e from None
        raise OutputWriteError(
            e.errno, f"could not write {out} ({e.strerror or e}); the images were saved to {rescue} instead"
        ) from e


def write_batches(
    checkpoint: str | Path,
    req: SampleRequest,
    out: str | Path | Target,
    batches: Callable[[LatentDiffusion, range], Iterable[tuple[torch.Tensor, list[str]]]],
    grid: bool = True,
    extra: dict | None = None,
    finish: Finish | None = None,
    sign: Sign | None = None,
    world: World | None = None,
) -> list[Path]:
    """The writing of generate_to_file for any pipeline: check and claim `out` (see pipelines.output: a Target says
    whether an existing file is replaced), load the model in `checkpoint`, then write the (images, captions) that
    batches(model, share) yields for the images `share` (all of them, or this rank's) as one grid or (grid=False)
    one PNG per image in the folder `out`. A single image is written as itself, never as a grid of one. The
    embedded parameters are the request's plus `extra` (JSON values: an edit's input image, its strength). finish:
    the screen every image passes first (a withheld image is not written; a grid shows a grey tile); sign: content
    credentials for every file written (see data.images.write_image). world: under torchrun each rank draws its
    block of the images (the images of one process: image i keeps seed + i) and writes its own files, or sends its
    tiles to rank 0, which writes the grid; rank 0 returns every path written, the other ranks nothing."""
    world = world or World()
    share = world.shard(req.n)
    target = as_target(out)
    params = model_record(checkpoint) | req.record() | (extra or {})
    meta = {"ldmkit": json.dumps(params)}
    separate, single = not grid, grid and req.n == 1  # single: one image, written as itself to `out`
    grid = grid and not single
    out = check_output(target.path, folder=separate, metadata=None if separate else meta, signed=sign is not None)
    if grid:
        wanted = {0: out} if world.main else {}
    elif single:
        wanted = {i: out for i in share}
    else:
        wanted = {i: out / f"{i:05d}.png" for i in share}
    claims = claim(wanted.values(), (*target.inputs, checkpoint), target.overwrite)
    paths = dict(zip(wanted, claims.paths))
    written: list[Path] = []
    try:
        ldm = load_model(checkpoint, resolve_device(req.device, "--device"))
        about = dict(params)
        if grid:
            written += _write_grid(ldm, batches, share, world, finish, sign, paths, about)
            return written if world.main else []
        written += _write_each(ldm, batches, share, finish, sign, paths, about)
    finally:
        claims.release(written)
    if not world.active:
        return written
    every = world.gather(written)
    return [p for part in every for p in part] if world.main else []


def _write_grid(ldm, batches, share, world, finish, sign, paths, about) -> list[Path]:
    """write_batches for a grid: rank 0 gathers every rank's images and writes them as one grid to paths[0]."""
    mine = collect(batches(ldm, share)) if len(share) else None
    parts = [p for p in world.gather(mine) if p is not None]
    if not world.main:
        return []
    images, captions = torch.cat([p[0] for p in parts]), [c for p in parts for c in p[1]]
    shared, facts = {}, [{} for _ in captions]
    if finish is not None:
        images, captions, facts = _finished_grid(images, captions, finish)
        shared = {k: v for k, v in facts[0].items() if all(f.get(k) == v for f in facts)}  # the run's id, time
    # where each image lies in the grid, so that `ldmkit provenance` reads each tile's watermark
    layout = grid_layout(len(images), *images.shape[-2:], nrow=8, labels=captions)
    tiles = [
        {"index": i, "seed": about["seed"] + i, "box": dict(zip(BOX_KEYS, layout.box(i)))}
        | {k: v for k, v in f.items() if k not in shared}
        for i, f in enumerate(facts)
    ]
    meta = {"ldmkit": json.dumps(about | shared | {"tiles": tiles})}
    save = lambda p: save_grid(images, p, nrow=layout.nrow, labels=captions, metadata=meta, sign=sign)  # noqa: E731
    return [write_or_rescue(save, paths[0])]


def _write_each(ldm, batches, share, finish, sign, paths, about) -> list[Path]:
    """write_batches for single images: each to paths[i], written batch by batch, so memory stays bounded and
    finished images are kept."""
    written = []
    done = share.start
    for images, captions in batches(ldm, share):
        for (img, facts), cap in zip(_finished(images, finish, done), captions, strict=True):
            i, done = done, done + 1
            m = {"ldmkit": json.dumps(about | {"seed": about["seed"] + i, "n": 1, "index": i, "caption": cap} | facts)}
            if img is not None:
                written.append(write_or_rescue(lambda p, img=img, m=m: write_image(img, p, m, sign), paths[i]))
    return written


def _finished(images: torch.Tensor, finish: Finish | None, first: int) -> list[tuple[Image.Image | None, dict]]:
    """(what to write, facts to embed) for each image (B, C, H, W) of a batch whose first is image `first`."""
    pils = [to_pil(x) for x in images]
    return finish(pils, first) if finish is not None else [(p, {}) for p in pils]


def _finished_grid(images: torch.Tensor, captions: list[str], finish: Finish) -> tuple[torch.Tensor, list[str], list]:
    """A grid's tiles after `finish`: withheld ones grey and captioned so, with each tile's facts."""
    tiles, labels, facts = [], [], []
    for (img, about), cap, x in zip(_finished(images, finish, 0), captions, images, strict=True):
        tiles.append(to_tensor(img) if img is not None else torch.full_like(x, WITHHELD_GREY / 127.5 - 1))
        labels.append(cap if img is not None else "withheld")
        facts.append(about)
    return torch.stack(tiles), labels, facts


def edit_paths(out: str | Path, n: int) -> list[Path]:
    """Where n edited images go: `out` itself for one image, else OUT-0.png, OUT-1.png, ... beside it."""
    out = Path(out)
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def write_edits(
    checkpoint: str | Path,
    req: SampleRequest,
    out: str | Path | Target,
    batches: Callable[[LatentDiffusion], Iterable[tuple[torch.Tensor, list[str]]]],
    extra: dict,
    finish: Finish | None = None,
    sign: Sign | None = None,
    record: bool = True,
) -> list[Path]:
    """The writing of every edit (img2img, inpaint, outpaint): each edited image on its own, at the input's size, to
    edit_paths(out, req.n), with the request's parameters, its seed and `extra` (the input files, the edit's
    options) embedded; record=False (an edit that changes nothing): the pixels alone, with no record, screen or
    credentials, since nothing in them was generated. The outputs are checked before the model loads; each image
    is written when its batch is done. finish: the screen every image passes first (a withheld image is not
    written); sign: content credentials for every file written (PNG only). `out` is checked and claimed as
    pipelines.output says (a Target: whether an existing file is replaced); the model file and the input image and
    mask are never overwritten."""
    params = req.record("height", "width") | extra
    params = model_record(checkpoint) | params
    finish, sign = (finish, sign) if record else (None, None)

    def meta(i: int) -> dict[str, str]:
        about = {**params, "seed": req.seed + i, "n": 1, "index": i}
        return {"ldmkit": json.dumps(about)} if record else {}

    signed = sign is not None
    target = as_target(out)
    wanted = [check_output(p, False, meta(i), signed) for i, p in enumerate(edit_paths(target.path, req.n))]
    claims = claim(wanted, (*target.inputs, checkpoint), target.overwrite)  # the inputs: see output.reading
    paths = claims.paths
    written: list[Path] = []
    try:
        ldm = load_model(checkpoint, resolve_device(req.device, "--device"))
        done = 0
        for images, _ in batches(ldm):
            for img, facts in _finished(images, finish, done):
                i, done = done, done + 1
                m = {"ldmkit": json.dumps(json.loads(meta(i)["ldmkit"]) | facts)} if record else None
                if img is not None:
                    written.append(write_or_rescue(lambda p, img=img, m=m: write_image(img, p, m, sign), paths[i]))
    finally:
        claims.release(written)
    return written
