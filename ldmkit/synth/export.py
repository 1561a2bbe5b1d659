"""`ldmkit synth`: a labelled image-folder data set drawn from a model, reproducible image by image.

Layout of the output folder:
    DIR/
      00-t-shirt-top/00000.png ...   one subfolder per label (class models: index-name, so sorting keeps the
      01-trouser/ ...                class order and `--data DIR` reloads the same labels)
      metadata.jsonl                 one line per kept image: file_name, text (prompt or class name), label, seed,
                                     sampler settings, the model's SHA-256 and the PNG's SHA-256
      dropped.jsonl                  one line per image a quality gate dropped, with the reason
      synth.json                     the settings every image of the folder shares (a rerun must match them)
      classifier.safetensors         the quality gate's classifier, when --min-confidence trained one

Image k of label c is always drawn with the same seed (derived from --seed, c and k, not from the batch or from how
many images there are), so a rerun with a larger --per-class extends the set and a rerun after a crash resumes it:
images whose file is present with the recorded hash are skipped, missing or damaged ones are drawn again (to the
same pixels), and only the batch in flight is lost. Each batch's files are written atomically before their
metadata lines are appended and flushed to disk.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_write, check_output_path, file_sha256
from ..data import build_dataset
from ..data.images import png_bytes, to_pil
from ..errors import InputError, MissingFileError
from ..governance.similarity import load_index, training_data
from ..ldm import LatentDiffusion
from ..locks import FolderLock
from ..pipelines.plan import check_samples_from_noise, draw
from ..pipelines.request import SampleRequest, default, whole_number
from ..runtime import resolve_device
from ..shipped import load_model
from .classifier import Classifier, train_classifier

SEED_BITS = 63  # torch generators take seeds below 2**63
METADATA, DROPPED, SETTINGS, LOCK, CLASSIFIER = (
    "metadata.jsonl",
    "dropped.jsonl",
    "synth.json",
    ".synth.lock",
    "classifier.safetensors",
)
MAX_PER_LABEL = 10_000_000  # beyond the five digits of the file names' padding is fine; beyond this is a typo


def seed_of(seed: int, label: str, k: int) -> int:
    """The seed of image k of `label`: a hash of (seed, label, k), so it depends on nothing else."""
    h = hashlib.sha256(f"{seed}\x00{label}\x00{k}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> (64 - SEED_BITS)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


@dataclass(frozen=True)
class Item:
    """One image of the data set: the k-th of its label."""

    label: str  # the label's key: the class index (class models), the CSV's label or the prompt (text models)
    folder: str  # its subfolder
    k: int
    seed: int
    class_index: int | None = None  # class models
    prompt: str | None = None  # text models
    caption: str = ""  # the metadata's text: the prompt, or the class name

    @property
    def file_name(self) -> str:
        return f"{self.folder}/{self.k:05d}.png"


@dataclass(frozen=True)
class SynthOptions:
    """What to draw and how. per_class: images per label; labels: the classes to draw (class models, None: all);
    prompts: (prompt, label) rows (text models); min_confidence / classifier / dedupe_threshold: the quality gates."""

    per_class: int = 100
    labels: list[int] | None = None
    prompts: list[tuple[str, str]] | None = None
    sampler: str = default("sampler", "synth")  # the sampling options: the parameter table's (pipelines/request.py)
    steps: int = default("steps", "synth")
    cfg: float = default("cfg", "synth")
    seed: int = default("seed", "synth")
    batch_size: int = default("batch_size", "synth")
    device: str = default("device", "synth")
    min_confidence: float | None = None
    classifier: str | None = None  # a classifier.safetensors; None: train one on the model's training data
    dedupe_threshold: float | None = None
    overwrite: bool = False
    request: SampleRequest = field(init=False, repr=False)

    def __post_init__(self):
        whole_number("--per-class", self.per_class, low=1, high=MAX_PER_LABEL, hint="e.g. --per-class 1000")
        req = SampleRequest(
            n=1,
            sampler=self.sampler,
            steps=self.steps,
            cfg=self.cfg,
            seed=self.seed,
            batch_size=self.batch_size,
            device=self.device,
        )  # the sampling options' checks, naming the same options as generate
        object.__setattr__(self, "request", req)
        for option, v, low_open in (
            ("--min-confidence", self.min_confidence, False),
            ("--dedupe-threshold", self.dedupe_threshold, True),
        ):
            if v is None:
                continue
            if not isinstance(v, (int, float)) or not (0 < v <= 1 if low_open else 0 <= v <= 1):
                raise InputError(
                    f"{option} {v!r} must be a number in {'(0' if low_open else '[0'}, 1]; e.g. {option} 0.9"
                )
        if self.classifier and self.min_confidence is None:
            raise InputError("--classifier is the classifier of --min-confidence; give --min-confidence P too")

    def settings(self) -> dict:
        """What every image of a folder shares; a rerun into the folder must ask for the same."""
        return {"sampler": self.sampler, "steps": self.steps, "cfg": self.cfg, "seed": self.seed}


def read_prompts_csv(path: str) -> list[tuple[str, str]]:
    """(prompt, label) rows of a CSV file with a header naming the columns `prompt` and `label`."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"prompts file {path} does not exist; give a CSV with the columns prompt,label")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not {"prompt", "label"} <= {f.strip() for f in reader.fieldnames}:
        raise InputError(f"{path}: the first line must name the columns prompt and label, e.g. prompt,label")
    rows = []
    for n, row in enumerate(reader, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row.get("prompt") or not row.get("label"):
            raise InputError(f"{path} line {n}: both prompt and label must be given (got {row!r})")
        rows.append((row["prompt"], row["label"]))
    if not rows:
        raise InputError(f"{path} has a header but no rows; add one prompt,label line per prompt")
    return rows


def plan_items(ldm: LatentDiffusion, opts: SynthOptions) -> list[Item]:
    """Every image of the data set, label by label, checked against the model (labels in range, prompts only for
    text models)."""
    items: list[Item] = []
    if opts.prompts is not None:
        if ldm.text_encoder is None:
            raise InputError(
                f"{ldm.source or 'this model'} is not text-conditional, so it takes no --prompts; "
                f"a class model draws --per-class images of every class (or of each --label)"
            )
        by_label: dict[str, list[str]] = {}
        for prompt, label in opts.prompts:
            by_label.setdefault(label, []).append(prompt)
        folders: dict[str, str] = {}
        for label in by_label:
            f = slug(label) or hashlib.sha256(label.encode()).hexdigest()[:8]
            if f in folders:
                raise InputError(
                    f"the labels {folders[f]!r} and {label!r} would share the folder {f!r}; give them names "
                    f"that differ in their letters or digits"
                )
            folders[f] = label
        for f, label in folders.items():
            ps = by_label[label]
            items += [
                Item(label, f, k, seed_of(opts.seed, label, k), prompt=ps[k % len(ps)], caption=ps[k % len(ps)])
                for k in range(opts.per_class)
            ]
        return items
    if ldm.text_encoder is not None:
        raise InputError(
            f"{ldm.source or 'this model'} is text-conditional: give --prompts prompts.csv (prompt,label columns) "
            f"or --prompt-file FILE (one prompt per line, each its own label)"
        )
    if not ldm.num_classes:
        if opts.labels:
            raise InputError("this model is unconditional; it takes no --label")
        return [Item("unconditional", "unconditional", k, seed_of(opts.seed, "", k)) for k in range(opts.per_class)]
    if any(c < 0 for c in opts.labels or ()):
        raise InputError("--label takes class numbers from 0; a data set has no images without a label")
    classes = sorted(set(opts.labels)) if opts.labels else list(range(ldm.num_classes))
    if classes[-1] >= ldm.num_classes:
        names = ", ".join(f"{c}={n}" for c, n in enumerate(ldm.class_names)) or f"0..{ldm.num_classes - 1}"
        raise InputError(
            f"--label {classes[-1]} is out of range: this model has {ldm.num_classes} classes, "
            f"--label 0 to {ldm.num_classes - 1} ({names})"
        )
    width = len(str(ldm.num_classes - 1))
    for c in classes:
        name = ldm.class_names[c] if c < len(ldm.class_names) else str(c)
        folder = f"{c:0{width}d}-{slug(name)}".rstrip("-")
        items += [
            Item(str(c), folder, k, seed_of(opts.seed, str(c), k), class_index=c, caption=name)
            for k in range(opts.per_class)
        ]
    return items


def _read_rows(path: Path) -> dict[str, dict]:
    """file_name -> row of a metadata or dropped file; a torn last line (a crash while appending) is ignored."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines):  # the last line without its newline: the append a crash cut short
                continue
            raise InputError(
                f"{path} line {n} is not a metadata row of `ldmkit synth`; delete that line (its image is then "
                f"drawn again) or use another --out"
            ) from None
        rows[str(name)] = row
    return rows


def _ends_torn(path: Path) -> bool:
    """Whether a metadata or dropped file ends in a torn line (the append a crash cut short; _read_rows skips it)."""
    if not path.is_file():
        return False
    last = path.read_text(encoding="utf-8").split("\n")[-1]
    if not last.strip():
        return False
    try:
        return "file_name" not in json.loads(last)
    except (json.JSONDecodeError, TypeError):
        return True


def _write_rows(path: Path, rows: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8"))


def _append_rows(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _matches(item: Item, row: dict) -> bool:
    return row.get("seed") == item.seed and row.get("prompt") == item.prompt and row.get("class") == item.class_index


def _intact(out: Path, row: dict) -> bool:
    path = out / row["file_name"]
    try:
        return path.is_file() and file_sha256(path) == row.get("sha256")
    except OSError:
        return False


def _lock(out: Path) -> FolderLock:
    """An exclusive lock on the folder until its release(); a second synth into it is refused."""

    def busy(holder: dict) -> InputError:
        return InputError(f"another `ldmkit synth` is writing {out}; wait for it, or give another --out")

    return FolderLock(out, name=LOCK, busy=busy).acquire()


def real_data(source: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The images (N, C, H, W) in [-1, 1], labels (N,) and class names of a model's (or data set's) training data."""
    cfg = training_data(source)
    ds = build_dataset(replace(cfg, limit=0, holdout=0, crop="center", flip=False))
    if not ds.class_names:
        raise InputError(f"the training data of {source} has no class labels, so no classifier can learn them")
    items = [ds[i] for i in range(len(ds))]
    x = torch.stack([it["image"] for it in items])
    y = torch.tensor([it["label"] for it in items])
    return x, y, list(ds.class_names)


def _classifier(ldm: LatentDiffusion, model: Path, out: Path, opts: SynthOptions, progress: bool, report) -> Classifier:
    """The quality gate's classifier: --classifier, else the one trained before into the folder, else one trained
    now on the model's training data (and kept in the folder for reruns)."""
    if not ldm.num_classes:
        raise InputError("--min-confidence checks that an image shows its class, so it needs a class-conditional model")
    path = Path(opts.classifier) if opts.classifier else out / CLASSIFIER
    if opts.classifier and not path.is_file():
        raise MissingFileError(f"--classifier {path} does not exist; leave it out to train one on the model's data")
    if path.is_file():
        clf = Classifier.load(path)
    else:
        report(f"training the --min-confidence classifier on the training data of {model} ...")
        x, y, names = real_data(str(model))
        clf = train_classifier(x, y, names, progress=progress, trained_on=str(model))
        clf.save(path)
    if clf.net.num_classes != ldm.num_classes:
        raise InputError(
            f"the classifier {path} knows {clf.net.num_classes} classes, the model {ldm.num_classes}; give a "
            f"classifier trained on the model's classes"
        )
    return clf


def synthesize(
    model: str | Path,
    out: str | Path,
    opts: SynthOptions,
    progress: bool = True,
    report: Callable[[str], None] = print,
) -> dict:
    """Draw opts.per_class images of every label of the model at `model` into the folder `out` (see the module's
    docstring); returns a summary (images planned, already there, drawn again, written, dropped by each gate)."""
    t0 = time.perf_counter()
    model = Path(model)
    out = check_output_path(out, "--out", folder=True)
    ldm = load_model(model, resolve_device(opts.device, "--device"))
    check_samples_from_noise(ldm, "synth")
    items = plan_items(ldm, opts)
    why = "--dedupe-threshold compares images with the model's training images"
    index = load_index(model, why) if opts.dedupe_threshold is not None else None
    out.mkdir(parents=True, exist_ok=True)  # only once the model and the options are known to work
    lock = _lock(out)
    try:
        clf = _classifier(ldm, model, out, opts, progress, report) if opts.min_confidence is not None else None
        return _synthesize(ldm, items, clf, index, model, out, opts, progress, report, t0)
    finally:
        lock.release()


def _synthesize(ldm, items, clf, index, model, out, opts, progress, report, t0) -> dict:
    model_sha = file_sha256(model)
    settings = {"model_sha256": model_sha, **opts.settings()}
    settings["min_confidence"] = opts.min_confidence
    settings["classifier_sha256"] = (
        file_sha256(Path(opts.classifier) if opts.classifier else out / CLASSIFIER) if clf else None
    )
    settings["dedupe_threshold"] = opts.dedupe_threshold
    settings_path = out / SETTINGS
    kept = _read_rows(out / METADATA)
    dropped = _read_rows(out / DROPPED)
    if settings_path.is_file() and not opts.overwrite:
        try:
            before = json.loads(settings_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(
                f"{settings_path} is damaged; delete it to start the folder again, or use another --out"
            ) from None
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise InputError(
                f"{out} holds images drawn with other settings ({said}); rerun with the same ones to resume, "
                f"give another --out, or --overwrite to draw the folder again"
            )
    elif kept or dropped:
        if not opts.overwrite:
            raise InputError(f"{out} has {METADATA} or {DROPPED} but no {SETTINGS}; give another --out or --overwrite")
    if opts.overwrite:
        kept, dropped = {}, {}
    atomic_write(settings_path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2) + "\n", "utf-8"))

    torn = [name for name in (METADATA, DROPPED) if _ends_torn(out / name)]
    todo, remade, repaired = [], 0, []
    for item in items:
        row = kept.get(item.file_name)
        gone = dropped.get(item.file_name)
        if row is not None and _matches(item, row) and _intact(out, row):
            continue
        if gone is not None and _matches(item, gone):
            continue
        remade += row is not None
        if row is not None and _matches(item, row):  # its file went missing or was damaged
            how = "damaged" if (out / item.file_name).exists() else "missing"
            repaired.append(f"{item.file_name} ({how})")
        kept.pop(item.file_name, None)
        dropped.pop(item.file_name, None)
        todo.append(item)
    # the rows that stay, rewritten once: a torn last line and the rows of damaged files go
    _write_rows(out / METADATA, list(kept.values()))
    _write_rows(out / DROPPED, list(dropped.values()))
    for name in torn:
        report(
            f"{out / name} ended in a torn line (a run stopped while appending it): removed; its image is drawn again"
        )
    if repaired:
        shown = ", ".join(repaired[:5]) + (f" and {len(repaired) - 5} more" if len(repaired) > 5 else "")
        report(f"{len(repaired)} image(s) of {out} were missing or damaged, drawing them again: {shown}")

    counts = {"confidence": 0, "copy": 0}
    written = 0
    shape = (ldm.latent_channels, ldm.run.data.resolution // ldm.factor, ldm.run.data.resolution // ldm.factor)
    bar = tqdm(total=len(todo), unit="image", desc="synth", disable=not progress or not todo)
    with bar:
        for s in range(0, len(todo), opts.batch_size):
            batch = todo[s : s + opts.batch_size]
            images = _draw(ldm, batch, shape, opts)
            rows, gone = _gate_and_write(out, batch, images, opts, clf, index, model, model_sha, counts)
            _append_rows(out / METADATA, rows)
            _append_rows(out / DROPPED, gone)
            written += len(rows)
            bar.update(len(batch))
            bar.set_postfix(dropped=counts["confidence"] + counts["copy"], refresh=False)
    seconds = time.perf_counter() - t0
    return {
        "out": str(out),
        "model": str(model),
        "model_sha256": model_sha,
        "planned": len(items),
        "already_there": len(items) - len(todo),
        "drawn_again": remade,
        "written": written,
        "dropped_low_confidence": counts["confidence"],
        "dropped_near_copies": counts["copy"],
        "kept_in_folder": len(_read_rows(out / METADATA)),
        "seconds": round(seconds, 1),
    }


@torch.no_grad()
def _draw(ldm: LatentDiffusion, batch: list[Item], shape: tuple[int, ...], opts: SynthOptions) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] of a batch of items, each from its own seed."""
    n = len(batch)
    if ldm.text_encoder is not None:
        cond = ldm.conditioning(prompts=[it.prompt for it in batch])
    elif ldm.num_classes:
        cond = ldm.conditioning(labels=[it.class_index for it in batch])
    else:
        cond = ldm.conditioning(n=n)
    gens = [torch.Generator("cpu").manual_seed(it.seed) for it in batch]
    z = draw(ldm, opts.request, (n, *shape), cond, ldm.null_conditioning(n), gens)
    return ldm.decode(z).cpu()


def _gate_and_write(out, batch, images, opts, clf, index, model, model_sha, counts) -> tuple[list[dict], list[dict]]:
    """Each image through the quality gates, then written (atomically) or dropped; (kept rows, dropped rows)."""
    probs = clf.probabilities(images) if clf is not None else None
    pils = [to_pil(x) for x in images]
    matches = index.query([np.asarray(p.convert("RGB")) for p in pils]) if index is not None else None
    kept, gone = [], []
    for i, (item, img) in enumerate(zip(batch, pils, strict=True)):
        row = {
            "file_name": item.file_name,
            "text": item.caption,
            "label": item.label,
            "class": item.class_index,
            "prompt": item.prompt,
            "index": item.k,
            "sampler": opts.sampler,
            "steps": opts.steps,
            "cfg": opts.cfg,
            "base_seed": opts.seed,
            "seed": item.seed,
            "model": str(model),
            "model_sha256": model_sha,
        }
        reason = None
        if probs is not None:
            row["confidence"] = round(float(probs[i, item.class_index]), 4)
            if row["confidence"] < opts.min_confidence:
                reason, key = f"confidence {row['confidence']} < --min-confidence {opts.min_confidence}", "confidence"
        if matches is not None and reason is None:
            m = matches[i]
            row["nearest_training_image"], row["similarity"] = m.name, round(m.similarity, 4)
            if m.similarity >= opts.dedupe_threshold:
                reason, key = (
                    f"similarity {row['similarity']} to {m.name} >= --dedupe-threshold {opts.dedupe_threshold}",
                    "copy",
                )
        if reason is not None:
            counts[key] += 1
            gone.append(row | {"dropped": reason})
            continue
        data = png_bytes(img, {"ldmkit": json.dumps(row)})
        path = out / item.file_name
        atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
        kept.append(row | {"sha256": hashlib.sha256(data).hexdigest()})
    return kept, gone


def summary_lines(result: dict) -> list[str]:
    r = result
    lines = [
        f"{r['written']} image(s) written to {r['out']} in {r['seconds']} s "
        f"({r['already_there']} of {r['planned']} were already there)"
    ]
    if r["dropped_low_confidence"] or r["dropped_near_copies"]:
        lines.append(
            f"dropped: {r['dropped_low_confidence']} below --min-confidence, {r['dropped_near_copies']} near-copies "
            f"of training images (listed in {DROPPED})"
        )
    lines.append(f"{r['kept_in_folder']} image(s) in the folder; train on them with --data {r['out']}")
    return lines
