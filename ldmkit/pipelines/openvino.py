"""The OpenVINO backend of the sampling steps on the CPU (`--backend openvino`), batch-invariant by construction.

The denoiser's backbone (the U-Net or DiT, the network every sampling step calls) is exported to OpenVINO once per
model, input signature and precision, cached on disk under $LDMKIT_CACHE/openvino/<key> (the key hashes the weights,
the signature and the OpenVINO version), and compiled for this CPU with one inference stream per core, each stream on
one thread. Every image is one inference of a fixed shape: its rows alone (its two guidance branches together, as
`nn.invariant.image_rows` groups them), so an image's numbers are those of the very same call alone or in any batch,
and the images of a batch run side by side on the streams instead of each call being split over the cores. The text
encoder, the autoencoder and the sampler stay in PyTorch; decoding stays float32.

Measured in benchmarks/RESULTS.md ("Sampling speed on the CPU"). `openvino` is an optional dependency
(`pip install 'ldmkit[openvino]'`); nothing is downloaded: the export runs from the weights on disk.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..conditioning.types import Conditioning
from ..data.common import cache_home
from ..denoisers.controlnet import Controlled
from ..errors import InputError
from ..nn.invariant import own_rows, plain_kernels, rows_per_image
from ..nn.lora import attached, scales
from ..runtime import sampling_dtype

FIELDS = ("context", "context_mask", "labels", "concat")  # the conditioning an exported backbone takes
EXPORT_VERSION = "2"  # bump when the exported graph's inputs change: old cache entries are then not read
MAX_COMPILED = 16  # compiled models kept per backbone (one a LoRA combination and input signature)
_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a model's denoiser -> {precision: its copy}
_made_lock = threading.Lock()
_CORE = None  # the process's OpenVINO Core (_core)
_core_lock = threading.Lock()


def _core(ov):
    """The process's one OpenVINO Core, never freed. Each Core's CPU plugin installs an alternate signal stack on the
    thread that first compiles with it and, when freed, puts back the one it found: Cores freed out of order left a
    freed stack installed, and the next signal with a handler (a child's SIGCHLD, with torch's DataLoader handler
    installed) killed the process with SIGSEGV."""
    global _CORE
    with _core_lock:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


def load_openvino():
    """The openvino module, its model converter's usage reports off (_no_reports), or an InputError that names the
    extra to install."""
    first = "openvino" not in sys.modules and "openvino_telemetry" not in sys.modules
    if first:  # while openvino imports, its telemetry package cannot: it binds its own stand-in (_no_reports)
        sys.modules["openvino_telemetry"] = None
    try:
        import openvino
    except ImportError:
        raise InputError(
            "--backend openvino needs the openvino package, which is not installed: pip install 'ldmkit[openvino]' "
            "(or use --backend torch, the default)"
        ) from None
    finally:
        if first and sys.modules.get("openvino_telemetry", 0) is None:
            del sys.modules["openvino_telemetry"]  # importable again by anyone who wants it
    _no_reports()
    return openvino


def _no_reports() -> None:
    """Point OpenVINO's model converter (openvino.tools.ovc) at its own stand-in for the telemetry package, which it
    binds where that package does not import (load_openvino makes it so while openvino imports; an openvino imported
    earlier is re-pointed here). Otherwise, unless a consent file in the user's home says no, `import openvino` and
    every convert_model write a client ID under ~/intel and send usage reports to Google Analytics, on Linux each from
    a process forked from a worker thread: such a fork, while the main thread was in an OpenBLAS call (numpy's eigh
    in an FID), hung the process for good, OpenBLAS's fork handler waiting for its busy threads. A model server inside
    a company reports to no third party and writes nothing to its user's home."""
    from openvino.tools.ovc import telemetry_stub

    for name, module in list(sys.modules.items()):
        if name.startswith("openvino.tools.ovc") and getattr(module, "tm", telemetry_stub) is not telemetry_stub:
            module.tm = telemetry_stub


def weights_sha256(net: nn.Module) -> str:
    """SHA-256 of a network's weights and buffers (names, shapes, dtypes and bytes), whatever file they came from."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Traced(nn.Module):
    """backbone(x, c_noise, Conditioning(names = tensors)) with plain tensor inputs, the form an export takes. With
    `loras` (sets hooked into the backbone), the last input holds their scales, one each; any other set hooked into
    the backbone is left out (scale 0 adds nothing)."""

    def __init__(self, backbone: nn.Module, names: tuple[str, ...], loras: tuple = ()):
        super().__init__()
        self.backbone, self.names, self.loras = backbone, names, loras

    def forward(self, x, c_noise, *tensors):
        if self.loras:
            *tensors, s = tensors
        per_set = {a.lora: 0.0 for a in attached(self.backbone)}
        per_set |= {lora: s[j : j + 1] for j, lora in enumerate(self.loras)}
        with scales(per_set):
            return self.backbone(x, c_noise, Conditioning(**dict(zip(self.names, tensors))))


class OpenVINOBackbone(nn.Module):
    """Stands in for a backbone: (x (B, C, H, W), c_noise (B,), cond) -> (B, C', H, W), each image one OpenVINO
    inference of its own rows. Holds no weights of its own (the exported graph holds them); thread-safe."""

    def __init__(self, backbone: nn.Module, precision: str, cache: Path | None = None, streams: int | None = None):
        """backbone: the network to export (left unchanged); precision: "f32" or "bf16" (OpenVINO's inference
        precision hint); cache: where exports are kept (default $LDMKIT_CACHE/openvino); streams: inferences run
        side by side, one thread each (default: torch's thread count, the cores this process uses)."""
        super().__init__()
        self.ov = load_openvino()
        self.source = [backbone]  # a list, so the backbone's weights are not registered twice
        self.precision = precision
        self.cache = Path(cache) if cache is not None else cache_home() / "openvino"
        self.streams = max(1, int(streams or torch.get_num_threads()))
        self.core = _core(self.ov)
        self.compiled: dict[tuple, object] = {}  # signature -> compiled model
        self.queues: dict[object, list] = {}  # compiled model -> its inference requests, one a stream
        self.lock = threading.Lock()
        self._sha: str | None = None  # the weights' SHA-256, taken at the first export
        self._tensors = list(backbone.state_dict(keep_vars=True).values())  # its weights and buffers
        self._version = _weights_version(self._tensors)  # what the compiled models were made from
        self._lora_shas: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoRA set -> its SHA-256

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        fields = (cond or Conditioning()).fields()
        other = sorted(set(fields) - set(FIELDS))
        if other:
            raise InputError(
                f"--backend openvino cannot run a backbone conditioned on {', '.join(other)} (a ControlNet's control "
                f"images); use --backend torch"
            )
        names = tuple(k for k in FIELDS if k in fields)
        n = x.shape[0]
        k = rows_per_image(n)
        m = n // k
        c_noise = c_noise.float().expand(n) if c_noise.ndim == 0 else c_noise.float().reshape(n)
        inputs = [x.float(), c_noise] + [
            fields[name].float() if fields[name].is_floating_point() else fields[name] for name in names
        ]
        signature = (k, names) + tuple((tuple(t.shape[1:]), str(t.dtype)) for t in inputs)
        per_image = [[own_rows(t, i, k).detach().cpu().numpy() for t in inputs] for i in range(m)]
        uses = _lora_scales(attached(self.source[0]), m)  # per image: {set: its nonzero scale}
        groups: dict[tuple, list[int]] = {}  # the sets an image uses -> its images
        for i, mine in enumerate(uses):
            groups.setdefault(tuple(mine), []).append(i)
        outs: list[np.ndarray | None] = [None] * m
        with self.lock:
            version = _weights_version(self._tensors)
            if version != self._version:  # weights changed in place (a LoRA merged): export anew
                self.compiled, self.queues, self._sha, self._version = {}, {}, None, version
            for loras, images in groups.items():  # each set of LoRAs is a model of its own, its images side by side
                shas = tuple(self._lora_sha(lora) for lora in loras)
                arrays = [
                    per_image[i] + ([np.array([uses[i][a] for a in loras], np.float32)] if loras else [])
                    for i in images
                ]
                compiled = self._compiled(signature + (shas,), names, arrays[0], loras)
                for i, o in zip(images, self._infer_all(compiled, arrays)):
                    outs[i] = o
        out = torch.from_numpy(np.stack(outs, 1).reshape(n, *outs[0].shape[1:]))  # back in the batch's row order
        return out.to(x.dtype)

    def _lora_sha(self, lora) -> str:
        if lora not in self._lora_shas:
            self._lora_shas[lora] = weights_sha256(lora)
        return self._lora_shas[lora]

    # --- export and compile ---------------------------------------------------------------------------------------
    def _compiled(self, signature: tuple, names: tuple[str, ...], example: list[np.ndarray], loras: tuple = ()):
        if signature not in self.compiled:
            if len(self.compiled) >= MAX_COMPILED:  # many LoRA combinations: the oldest model is compiled again later
                oldest = next(iter(self.compiled))
                self.queues.pop(self.compiled.pop(oldest), None)
            model = self._exported(signature, names, example, loras)
            config = {
                "INFERENCE_PRECISION_HINT": self.precision,
                "PERFORMANCE_HINT": "THROUGHPUT",
                "NUM_STREAMS": self.streams,
                "INFERENCE_NUM_THREADS": self.streams,  # one thread a stream
            }
            self.compiled[signature] = self.core.compile_model(model, "CPU", config)
        return self.compiled[signature]

    def _exported(self, signature: tuple, names: tuple[str, ...], example: list[np.ndarray], loras: tuple = ()):
        """The exported graph for `signature`: read from the cache, or exported from the backbone and cached."""
        if self._sha is None:
            self._sha = weights_sha256(self.source[0])
        key = hashlib.sha256(repr((EXPORT_VERSION, self.ov.get_version(), self._sha, signature)).encode()).hexdigest()[
            :32
        ]
        folder = self.cache / key
        xml = folder / "model.xml"
        if xml.is_file():
            try:
                return self.core.read_model(str(xml))
            except Exception as err:  # a damaged entry is exported again, never trusted
                print(
                    f"note: the OpenVINO cache entry {folder} could not be read ({err}); exporting again",
                    file=sys.stderr,
                )
                shutil.rmtree(folder, ignore_errors=True)
        print(
            f"note: exporting the denoiser to OpenVINO for this input shape (once; cached in {folder})", file=sys.stderr
        )
        traced = _Traced(self.source[0], names, loras).eval()
        tensors = tuple(torch.from_numpy(a) for a in example)
        with torch.no_grad(), plain_kernels(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
            # the tracer warns at every shape check (batch size, channels): the export is for this one shape
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # OpenVINO's PyTorch front end traces with torch.jit
            model = self.ov.convert_model(traced, example_input=tensors)
            want = traced(*tensors).float()
        # the export's inputs come out of any size; fixed to this signature's, the CPU plugin plans for them (1.7x)
        model.reshape({port: list(a.shape) for port, a in zip(model.inputs, example)})
        got = torch.from_numpy(self.core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(example)[0])
        error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
        if not error < 1e-3:  # a trace that froze a data-dependent branch would differ here
            raise RuntimeError(f"the OpenVINO export of this backbone differs from it (relative error {error:.2g})")
        self.cache.mkdir(parents=True, exist_ok=True)
        for stale in self.cache.glob(".*-*"):  # what an export killed mid-write left, an hour or more ago
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.cache))
        try:
            self.ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            try:
                os.replace(tmp, folder)  # whole or not at all: a crash leaves a temporary folder, never half an entry
            except OSError:  # another process cached it first: theirs is the same export
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return model

    def _infer_all(self, compiled, per_image: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Each image's inference, side by side on the streams: waves of one request a stream (kept per compiled
        model), each waited for here. No Python callback runs on OpenVINO's threads."""
        if compiled not in self.queues:
            self.queues[compiled] = [compiled.create_infer_request() for _ in range(self.streams)]
        requests = self.queues[compiled]
        outs: list[np.ndarray] = []
        for start in range(0, len(per_image), len(requests)):
            wave = list(zip(requests, per_image[start : start + len(requests)]))
            for request, arrays in wave:
                request.start_async(arrays)
            for request, _ in wave:
                request.wait()
                outs.append(request.get_output_tensor(0).data.copy())
        return outs


def _lora_scales(hooked: list, m: int) -> list[dict]:
    """Per image of m, {LoRA set: its scale} for the sets hooked into the backbone (nn.lora.attached) that the image
    uses (scale not 0), in the order they were hooked: one scale for all, or one per image."""
    uses: list[dict] = [{} for _ in range(m)]
    for a in hooked:
        s = a.scale()
        if isinstance(s, torch.Tensor) and s.ndim == 1 and len(s) not in (1, m):
            raise InputError(f"{len(s)} LoRA scales do not fit {m} images; give one scale per image")
        values = s.float().reshape(-1).tolist() if isinstance(s, torch.Tensor) else [float(s)]
        for i in range(m):
            v = values[i] if len(values) == m else values[0]
            if v != 0.0:
                uses[i][a.lora] = v
    return uses


def _weights_version(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """Changes whenever one of `tensors` (a network's weights and buffers) is changed in place (torch counts each
    tensor's in-place writes) or given new storage through `.data` (as `Module.to(dtype)` does, which counts no
    write): the compiled models are then stale."""
    return sum(t._version for t in tensors), hash(tuple(t.data_ptr() for t in tensors))


def openvino_denoiser(ldm, denoiser, precision: str):
    """`denoiser` (the model's own) with its backbone run by OpenVINO at the sampling precision `precision` (fp32,
    bf16 or auto, as --precision), made once per model and precision and kept while the model lives."""
    if ldm.device.type != "cpu":
        raise InputError(f"--backend openvino runs on the CPU; this model is on {ldm.device}: use --device cpu")
    if denoiser is not ldm.denoiser:
        raise InputError("--backend openvino runs a model's own denoiser only (generate, sample); use --backend torch")
    if isinstance(denoiser.backbone, Controlled):
        raise InputError("--backend openvino does not take ControlNets (--control) yet; use --backend torch")
    hint = "bf16" if sampling_dtype(precision, ldm.device) == torch.bfloat16 else "f32"
    with _made_lock:
        per_model = _made.setdefault(denoiser, {})
        if hint not in per_model:
            made = copy.copy(denoiser)
            made._modules = dict(denoiser._modules)  # the copy's own module table: the model's stays as it is
            made._modules["backbone"] = OpenVINOBackbone(denoiser.backbone, hint)
            per_model[hint] = made
        return per_model[hint]
