"""What a generation record says about the model and an edit's input files: names and SHA-256s, never a local path.

The record travels with every image ldmkit writes, to whoever receives it; a path such as /home/NAME/runs/x would
leak the user's name and folders. The model's name is what `ldmkit serve` calls it: a shipped model's name, the
folder of a run's `model.safetensors`, or the file's stem; the SHA-256 identifies the weights exactly. An edit's
input image and mask are recorded by their file names (no folder) and the SHA-256 of their bytes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..checkpoint import file_sha256


def model_name(path: str | Path) -> str:
    """The name of the model in `path`: its folder for a run's model.safetensors, else the file's stem."""
    path = Path(path)
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def model_record(path: str | Path) -> dict[str, str]:
    """{"model": name, "weights_sha256": hash} of the checkpoint file `path`, as a generation record holds them."""
    path = Path(path)
    if not path.is_file():  # loading the model names what is missing
        return {"model": model_name(path)}
    stat = path.stat()
    return {"model": model_name(path), "weights_sha256": _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


def input_record(path: str | Path) -> dict[str, str]:
    """{"name": file name, "sha256": hash of its bytes} of an edit's input file `path`, as a generation record holds
    it: the name without its folders (which may name the user), the hash to tell the exact file."""
    return {"name": Path(path).name, "sha256": file_sha256(path)}
