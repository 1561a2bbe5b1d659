"""The rules of a run folder, one implementation for both training commands.

1. One run at a time: the folder is locked (runlock.RunLock) from the first check to the last file written.
2. A folder that holds a run is only continued (`resume`) or replaced (`overwrite`) when the user says so; a new run
   there is refused before any data is loaded and before anything in the folder is written. `overwrite` removes
   the previous run's files only (see RUN_FILES and RUN_PATTERNS), never other files, never the folder.
3. A resume compares the new configuration with the one saved in the train state before writing config.json: a
   change of architecture (what the weights mean, see ARCHITECTURE) is refused in one line; a changed
   hyperparameter is allowed with a warning listing old and new values.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import checkpoint
from ..distributed import World
from ..errors import ConfigError, InputError, MissingFileError, RunFolderError
from .loop import STATE_FILE
from .runlock import RunLock

CONFIG_FILE = "config.json"
# files a run writes under fixed names; any of them but config.json (written first) means the folder holds a run
RUN_FILES = (STATE_FILE, "log.jsonl", "metrics.json", "autoencoder.safetensors", "model.safetensors", CONFIG_FILE)
# further files of a run, removed by `overwrite`: progress grids, evaluation results of its checkpoint, and the
# temporary files of interrupted writes of the run's own files
RUN_PATTERNS = ("recon-*.png", "samples-*.png", "eval-*.json", *(f".{name}.*.tmp" for name in RUN_FILES))
# settings whose change alters tensor shapes or what the weights mean (a dotted key or a whole section)
ARCHITECTURE = (
    "model",
    "unet",
    "diffusion",
    "autoencoder",
    "text_encoder",
    "class_names",
    "task",
    "data.resolution",
    "data.channels",
    "loss.disc_layers",
    "loss.disc_channels",
)
# settings that change only how fast a run goes, never its results: a resume does not report their changes
SPEED_ONLY = ("train.num_workers", "train.distributed", "train.gradient_checkpointing", "train.compile")
SHOWN_CHANGES = 8  # a refusal lists at most this many keys, to stay on one readable line


class RunFolder:
    """`with RunFolder(out, resume=..., overwrite=...) as folder:` the locked, checked folder of one training run."""

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False, keep: Iterable = ()):
        """path: the run folder (--out); resume: continue the run saved there; overwrite: replace the run saved there;
        keep: files the new run reads (e.g. its autoencoder), never removed by overwrite even inside the folder."""
        if resume and overwrite:
            raise InputError(
                "--resume and --overwrite contradict each other: pass --resume to continue the run in "
                f"{path}, or --overwrite to replace it"
            )
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.keep = [Path(p) for p in keep if p]
        self.lock = RunLock(self.path)

    def __enter__(self) -> "RunFolder":
        created = not self.path.exists()
        self.lock.acquire()
        try:
            self._check_contents()
        except BaseException:
            self.lock.release()
            if created:
                _remove_if_empty(self.path)
            raise
        if self.overwrite:
            self._remove_previous_run()
        return self

    def __exit__(self, *exc) -> bool:
        self.lock.release()
        return False

    # --- what the folder holds -------------------------------------------------------------------------------

    def holds_run(self) -> bool:
        """True when the folder has a run's results: a train state, a checkpoint, metrics or log lines. A config.json
        or an empty log alone is a run that stopped before its first step; starting again there loses nothing."""
        log = self.path / "log.jsonl"
        if log.is_file() and log.stat().st_size > 0:
            return True
        return any((self.path / name).exists() for name in RUN_FILES if name not in ("log.jsonl", CONFIG_FILE))

    def _check_contents(self):
        if self.resume and not (self.path / STATE_FILE).is_file():
            raise MissingFileError(f"--resume: no {STATE_FILE} in {self.path}; start without --resume")
        if not self.resume and not self.overwrite and self.holds_run():
            raise RunFolderError(
                f"{self.path} already holds a training run; pass --resume to continue it, "
                f"--overwrite to replace it, or give a new --out"
            )

    def _remove_previous_run(self):
        names = [n for n in RUN_FILES] + [p.name for pat in RUN_PATTERNS for p in self.path.glob(pat)]
        for name in dict.fromkeys(names):
            p = self.path / name
            if p.is_file() and not any(_same_file(p, k) for k in self.keep):
                p.unlink()

    # --- configuration ---------------------------------------------------------------------------------------

    def saved_config(self) -> dict:
        """The configuration the saved train state was trained with."""
        return checkpoint.read_metadata(self.path / STATE_FILE).get("config") or {}

    def check_config(self, new: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
        """On resume: refuse an architecture change (ConfigError, one line); return the other changes as
        "key: old -> new" strings. ignore: keys not comparable yet (filled in later from the data)."""
        if not self.resume:
            return []
        changes = config_changes(self.saved_config(), new, set(ignore))
        refused = [c for c in changes if changes_architecture(*c)]
        if refused:
            shown = [_show(c) for c in refused[:SHOWN_CHANGES]]
            more = f" and {len(refused) - SHOWN_CHANGES} more" if len(refused) > SHOWN_CHANGES else ""
            raise ConfigError(
                f"cannot resume {self.path}: the model would change ({'; '.join(shown)}{more}); resume "
                f"with the saved settings (see {self.path / CONFIG_FILE}), or start a new run with a "
                f"new --out (or --overwrite to replace this one)"
            )
        return [_show(c) for c in changes]

    def write_config(self, new: dict[str, Any]) -> Path:
        """Check `new` against the saved run (on resume), warn about changed hyperparameters, write config.json."""
        changed = self.check_config(new)
        if changed:
            warnings.warn(f"resuming {self.path} with changed settings: {', '.join(changed)}", stacklevel=2)
        text = json.dumps(new, indent=2)
        return checkpoint.atomic_write(self.path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def run_folder(
    world: World, path: str | Path, resume: bool = False, overwrite: bool = False, keep: Iterable = ()
) -> Iterator[RunFolder]:
    """The RunFolder of a job of one or several ranks: rank 0 alone locks and checks it (and removes a replaced run);
    an error there stops every rank. Call its check_config / write_config through world.on_main."""
    folder = RunFolder(path, resume=resume, overwrite=overwrite, keep=keep)
    world.on_main(lambda: _enter(folder))
    try:
        yield folder
    finally:
        if world.main:
            folder.__exit__(None, None, None)


def _enter(folder: RunFolder) -> None:
    folder.__enter__()


def flatten(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_changes(old: dict, new: dict, ignore: set[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every setting present in both whose value differs. A key in one only is a setting
    added or retired since the other was written, not a change."""
    a, b = flatten(old), flatten(new)
    ignore = set(ignore) | set(SPEED_ONLY)
    return [(k, a[k], b[k]) for k in b if k in a and k not in ignore and not _same_value(k, a[k], b[k])]


def changes_architecture(key: str, old: Any, new: Any) -> bool:
    """Whether changing `key` from old to new alters what the saved weights mean or which tensors the state holds."""
    if key == "train.ema_decay":
        return (old > 0) != (new > 0)  # switches EMA on or off: the saved state has, or lacks, EMA weights
    return any(key == p or key.startswith(p + ".") for p in ARCHITECTURE)


def _same_value(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    return key == "autoencoder" and bool(old) and bool(new) and _same_file(Path(old), Path(new))


def _show(change: tuple[str, Any, Any]) -> str:
    """("unet.channel_mult", [1, 2], [1, 2, 2]) -> 'unet.channel_mult: [1, 2] -> [1, 2, 2]'."""
    key, old, new = change
    return f"{key}: {_value(old)} -> {_value(new)}"


def _value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, str)) else str(v)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _remove_if_empty(path: Path):
    try:
        path.rmdir()
    except OSError:
        pass
