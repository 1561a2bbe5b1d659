"""safetensors checkpoints whose metadata carries the resolved configuration as JSON.

Every file ldmkit writes has metadata keys `format` ("ldmkit"), `kind` (what the file holds, e.g. "autoencoder",
"ldm", "train-state") and `config` (JSON). Writes are atomic: a temporary file in the same folder, fsync, rename;
a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, InputError

FORMAT = "ldmkit"


def file_mode() -> int:
    """The mode a plain open() would give a new file now: 0o666 less the process umask (mkstemp's own is 0o600).
    On Linux the umask is read from /proc, which, unlike os.umask, does not change it even for an instant."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# A temporary file of atomic_write untouched for this long belongs to a writer that died (a crash, kill -9). A live
# writer keeps touching its file while it writes, so only one stalled for this long between mkstemp and rename
# (e.g. a multi-minute fsync on a very slow disk) could lose its file to a concurrent writer of the same target.
STALE_TMP_AGE_S = 120.0


def remove_stale_temporaries(path: Path, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Delete `.{name}.XXXXXXXX.tmp` files of target `path` left by crashed writers (older than max_age_s).
    Temporaries of other targets are left alone: the random middle of mkstemp's names never holds a dot, so
    `.a.b.XXXXXXXX.tmp` (target a.b) is not mistaken for one of target `a`."""
    prefix, removed = f".{path.name}.", []
    now = time.time()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        middle = entry.name[len(prefix) : -len(".tmp")]
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp") and middle and "." not in middle):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > max_age_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:  # removed meanwhile by another writer's clean-up
            pass
    return removed


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path) then move tmp_path over `path` in one rename. The file gets the usual permissions
    (readable by the group and others under the common umask 022), not the temporary file's private 0o600.
    Temporary files of the same target orphaned by crashed writers are removed first (remove_stale_temporaries)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_output_path(path: str | Path, option: str = "--out", folder: bool = False) -> Path:
    """Refuse, before any work, an output `path` that cannot be written: a folder where a file is expected (or the
    reverse with folder=True), a parent that is a file, or a place that takes no new files. The nearest existing
    folder is probed with a real temporary file, which permissions, read-only mounts and pseudo file systems all
    answer truthfully. option: the command-line option that named the path, for the message."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, but a folder is written there; name a folder")
    if not folder and path.is_dir():
        raise InputError(f"{option} {path} is a folder; name a file in it instead")
    target = path if folder else path.parent
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {path}: {existing} is a file, so the folder {target} cannot be created there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ldmkit-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        msg = f"{option} {path}: cannot write in {existing} ({e.strerror or e}); choose another {option}"
        raise InputError(msg) from None
    return path


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (a model's identity in audit rows and synthetic data sets), read in blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(
    path: str | Path, tensors: dict[str, torch.Tensor], kind: str, config: dict[str, Any] | None = None, **extra: Any
) -> Path:
    """Write `tensors` with metadata {format, kind, config, **extra}; extra values are stored as JSON."""
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(config or {})}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def read_header(path: str | Path) -> dict[str, str]:
    """The raw metadata strings of any safetensors file (ldmkit's or not), without loading tensors."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); is it truncated or another "
            f"format? Convert other formats with `ldmkit convert`"
        ) from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of an ldmkit checkpoint (config and extras parsed from JSON), without loading tensors."""
    path = Path(path)
    raw = read_header(path)
    if raw.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not an ldmkit checkpoint (no ldmkit metadata); "
            f"import Stable Diffusion or diffusers weights with `ldmkit convert`"
        )
    return {k: (v if k in ("format", "kind") else _json_value(path, k, v)) for k, v in raw.items()}


def _json_value(path: Path, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: metadata value {key!r} is not valid JSON ({e}); the file was not written by "
            f"ldmkit or was altered; re-export it or convert the original with `ldmkit convert`"
        ) from None


def load(
    path: str | Path, kind: str | tuple[str, ...] | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata); `kind` (one or several) is checked against the file's kind with a clear error."""
    meta = read_metadata(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and meta["kind"] not in kinds:
        raise CheckpointError(
            f"{path} holds a {meta['kind']!r} checkpoint, but a {' or '.join(kinds)!r} checkpoint is needed here"
        )
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} could not be read ({e}); the file may be truncated") from None
    return tensors, meta


def subset(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.` with the prefix removed."""
    p = prefix + "."
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, what: str):
    """load_state_dict with an error naming the file and the missing / unexpected keys."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:

        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise CheckpointError(f"{source}: the {what} weights do not match its configuration ({'; '.join(parts)})")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist"
            + (" (it is a folder; for a diffusers folder use `ldmkit convert`)" if path.is_dir() else "")
        )
    return path
