"""Where the image commands write: one rule for generate, sample, img2img, inpaint, outpaint and upscale.

An output is never an input: a path that names one of the command's input files (the same file by name, by a
symbolic link or by a hard link) is refused. An existing file is never replaced unless the user asks for it
(--overwrite): the command writes `name-1.png` instead (then `name-2.png`, ...) and says so. Every name is claimed
before the model loads by creating it with O_CREAT | O_EXCL, so two runs started at once never pick the same name;
the finished image then replaces the empty claimed file in one rename (data.images.write_image), and a claim that
got no image (an error, a withheld image) is removed again.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

from ..errors import InputError

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
