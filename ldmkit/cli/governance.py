"""Governance from the command line: `ldmkit policy check`, `ldmkit provenance IMAGE`, `ldmkit credentials
demo-cert`, `ldmkit index build` / `screen` and `ldmkit monitor reference`. Each command function takes the parsed
arguments and returns an exit status."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from ..errors import InputError, MissingFileError
from .inputs import ARGV_FIX, utf8
from .options import command, database_option


def add(sub, common: argparse.ArgumentParser) -> None:
    """`ldmkit policy check`, `ldmkit provenance`, `ldmkit credentials demo-cert`, `ldmkit index build` and
    `screen`, `ldmkit monitor reference`."""
    help = "check prompts against a content policy (policy.toml)"
    command(sub, common, "policy", help, options=lambda p: _policy_actions(p, common))
    help = (
        "where an image came from: its embedded record, its watermark, its content credentials and its request in "
        "the audit trail"
    )
    command(sub, common, "provenance", help, cmd_provenance, _provenance_options, description=help)
    help = "content credentials (C2PA) for ldmkit serve"
    command(sub, common, "credentials", help, options=lambda p: _credentials_actions(p, common))
    help = "the training-data similarity index of a model: build it, screen an image against it"
    command(sub, common, "index", help, options=lambda p: _index_actions(p, common))
    help = "the reference of the rolling output statistic of ldmkit serve"
    command(sub, common, "monitor", help, options=lambda p: _monitor_actions(p, common))


def _policy_actions(p: argparse.ArgumentParser, common: argparse.ArgumentParser):
    actions = p.add_subparsers(dest="policy_action", required=True, metavar="ACTION")
    a = actions.add_parser(
        "check", help="say whether the policy allows a prompt (exit status 1: refused)", parents=[common]
    )
    a.add_argument("prompt")
    a.add_argument("--policy", required=True, help="the policy.toml")
    a.add_argument("--role", choices=["viewer", "user", "admin"], help="the key role to check for (default: all rules)")
    a.set_defaults(fn=cmd_policy_check)


def _provenance_options(p: argparse.ArgumentParser):
    p.add_argument("image", help="an image file (PNG, JPEG, WebP, ...), metadata stripped or not")
    database_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument("--trust", metavar="ROOTS.pem", help="root certificates whose content credentials count as trusted")


def _credentials_actions(p: argparse.ArgumentParser, common: argparse.ArgumentParser):
    actions = p.add_subparsers(dest="credentials_action", required=True, metavar="ACTION")
    help = "write a throwaway root and signing certificate to try content credentials with (not for production)"
    a = actions.add_parser("demo-cert", help=help, description=help, parents=[common])
    a.add_argument("--out", required=True, help="a folder for chain.pem, key.pem and root.pem")
    a.add_argument("--overwrite", action="store_true", help="replace certificates already in --out")
    a.set_defaults(fn=cmd_demo_cert)


def _index_actions(p: argparse.ArgumentParser, common: argparse.ArgumentParser):
    from ..governance.similarity import DEFAULT_THRESHOLD

    actions = p.add_subparsers(dest="index_action", required=True, metavar="ACTION")
    help = "index every training image of a model (or a data set) for the similarity screen"
    a = actions.add_parser("build", help=help, description=help, parents=[common])
    a.add_argument("source", help="a shipped model's name, a model.safetensors, a built-in data set or a folder")
    a.add_argument("--out", help="the index file (default: MODEL.index.npz beside a model's weights)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing index")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(fn=cmd_index_build)
    help = "the training image nearest to any image, its similarity, and whether the screen flags it (exit status 1)"
    a = actions.add_parser("screen", help=help, description=help, parents=[common])
    a.add_argument("image", help="an image file (PNG, JPEG, WebP, BMP or GIF), of any size")
    a.add_argument("--model", help="a shipped model's name or a model.safetensors whose index to use (default emoji)")
    a.add_argument("--index", help="an index file from `ldmkit index build` (default: MODEL.index.npz)")
    a.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"the similarity at or above which the image counts as a copy (default {DEFAULT_THRESHOLD}, the screen's)",
    )
    a.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    a.set_defaults(fn=cmd_index_screen)


def _monitor_actions(p: argparse.ArgumentParser, common: argparse.ArgumentParser):
    actions = p.add_subparsers(dest="monitor_action", required=True, metavar="ACTION")
    help = "Inception statistics of a model's training images, which serve's rolling output statistic compares with"
    a = actions.add_parser("reference", help=help, description=help, parents=[common])
    a.add_argument("model", help="a shipped model's name or a model.safetensors")
    a.add_argument("--n", type=int, default=2000, help="training images to summarise (default 2000, at most all)")
    a.add_argument("--out", help="the statistics file (default: MODEL.reference.npz beside the weights)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing file")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(fn=cmd_monitor_reference)


def cmd_policy_check(args):
    from ..governance.policy import load_policy

    decision = load_policy(args.policy).check(utf8(args.prompt, "prompt", ARGV_FIX), args.role)
    if decision.allowed:
        print(
            f"allowed: no rule of {args.policy} refuses this prompt" + (f" for role {args.role}" if args.role else "")
        )
        return 0
    print(f"refused by rule {decision.rule}: {decision.message}")
    return 1


def cmd_provenance(args) -> int:
    """Exit status 0 when the image's origin was found (a record, a watermark or an audit row), 1 otherwise."""
    from ..governance.provenance import inspect_image
    from ..serve.audit import Audit
    from ..serve.store import default_database, open_store

    found = inspect_image(args.image, trust=args.trust)
    rows = []
    database = args.database or (str(default_database()) if default_database().is_file() else None)
    if database and (found.tag or found.sha256):
        with open_store(database) as store:
            rows = Audit(store).find(found.tag, found.sha256)
    if args.json:
        print(json.dumps(found.as_dict() | {"audit": rows}, indent=2, default=str))
    else:
        for line in _lines(found, rows, database):
            print(line)
    return 0 if found.record or found.tag or rows or found.credentials else 1


def _lines(found, rows: list[dict], database: str | None) -> list[str]:
    rec = found.record or {}
    lines = [f"{found.path}: {found.size[0]}x{found.size[1]}, sha256 {found.sha256}"]
    if rec:
        what = {k: rec[k] for k in ("model", "checkpoint", "prompts", "labels", "seed", "time") if rec.get(k)}
        lines.append(f"record: request {found.request_id or '(none)'}; " + json.dumps(what, ensure_ascii=False))
    else:
        lines.append("record: none (the metadata was stripped, or the image was not written by ldmkit)")
    if found.tag:
        agree = {True: ", agrees with the record", False: ", DIFFERS from the record", None: ""}[found.consistent]
        cut = ""
        if found.crop and any(found.crop):
            cut = " (the image was cropped: {} px from the left, {} top, {} right, {} bottom)".format(*found.crop)
        marked = sum(1 for t in found.tiles or () if t["watermark"])
        grid = f" (in {marked} of the grid's {len(found.tiles)} tiles)" if found.tiles else ""
        lines.append(f"watermark: request {found.tag}...{agree}{cut}{grid}")
    else:
        lines.append("watermark: none found" + (" in the image or its tiles" if found.tiles else ""))
    for t in found.tiles or ():
        seed = f", seed {t['seed']}" if t["seed"] is not None else ""
        mark = f"request {t['watermark']}..." if t["watermark"] else "none found"
        lines.append(f"  tile {t['index']}{seed} at {tuple(t['box'])}: watermark {mark}")
    cred = found.credentials
    if cred:
        signer = f", signed by {cred['signer']}" if cred.get("signer") else ""
        signer += f" ({cred['issuer']})" if signer and cred.get("issuer") else ""
        failures = cred["failures"]
        if cred["state"] == "Trusted":
            state = "valid and trusted"
        elif cred["state"] == "Valid":
            state = "valid" + (
                ", signer not trusted (see --trust)" if "signingCredential.untrusted" in failures else ""
            )
        else:
            why = "bad signature"
            if any("mismatch" in f for f in failures):
                why = "the file was changed after signing"
            elif any(f.startswith("unreadable") for f in failures):
                why = "the manifest is damaged"
            state = f"INVALID ({', '.join(failures) or cred['state']}): {why}"
        rid = (cred.get("record") or {}).get("request_id")
        lines.append(f"content credentials: {state}{signer}" + (f", request {rid}" if rid else ""))
    if database is None:
        lines.append("audit: no database (give --database, as given to ldmkit serve)")
    elif not rows:
        lines.append(f"audit: no row of {database} matches")
    for r in rows:
        same = " (this exact file)" if found.sha256 in (r.get("outputs") or []) else ""
        lines.append(
            f"audit: row {r['seq']} {r['time']} request {r['request_id']} key {r.get('key_name')} "
            f"model {r.get('model')} {r['decision']}{same}"
        )
    return lines


def cmd_demo_cert(args) -> int:
    from ..governance.credentials import demo_certificates

    out = Path(args.out)
    taken = [n for n in ("chain.pem", "key.pem", "root.pem") if (out / n).exists()]
    if taken and not args.overwrite:
        raise InputError(
            f"{out} already holds {', '.join(taken)}; pass --overwrite to replace them, or --out elsewhere"
        )
    chain, key, root = demo_certificates(out)
    print(f"written {chain} (signer, then root), {key} and {root}: a demo root, not for production")
    print(f"  ldmkit serve --set serve.c2pa_cert={chain} --set serve.c2pa_key={key}")
    print(f"  ldmkit provenance IMAGE --trust {root}")
    return 0


def cmd_index_build(args) -> int:
    from ..governance.similarity import build_index

    out = Path(args.out) if args.out else _default_index(args.source)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it, or --out elsewhere")
    index = build_index(args.source, out, progress=not args.quiet)
    print(f"indexed {len(index)} training images of {args.source} into {out}")
    return 0


def cmd_index_screen(args) -> int:
    """Screen one image against a similarity index as the output screen does; exit status 1 when it is flagged."""
    import numpy as np
    from PIL import Image

    from ..governance.similarity import DEFAULT_THRESHOLD, SimilarityIndex, load_index
    from ..shipped import default_model, resolve_model

    if not math.isfinite(args.threshold) or not -1.0 <= args.threshold <= 1.0:
        raise InputError(f"--threshold {args.threshold} is outside [-1, 1]; {DEFAULT_THRESHOLD} is the screen's")
    if args.index and args.model:
        raise InputError("give --model (its MODEL.index.npz is used) or --index, not both")
    if args.index:
        if not Path(args.index).is_file():
            raise MissingFileError(
                f"the similarity index {args.index} does not exist; build it with: ldmkit index build MODEL "
                f"--out {args.index}"
            )
        index = SimilarityIndex.load(args.index)
    else:
        model = resolve_model(args.model or default_model())
        index = load_index(model, "screening an image needs the training data's index")
    try:
        with Image.open(args.image) as im:
            pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    except FileNotFoundError:
        raise MissingFileError(f"image {args.image} does not exist; give the image file to screen") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(
            f"{args.image} is not an image Pillow can read ({e}); give a PNG, JPEG, WebP, BMP or GIF"
        ) from None
    [match] = index.query([pixels])
    flagged = match.similarity >= args.threshold
    if args.json:
        about = {"image": args.image, "index": str(index.path), "nearest": match.name, "similarity": match.similarity}
        print(json.dumps(about | {"threshold": args.threshold, "flagged": flagged}))
    else:
        verdict = f"flagged (>= {args.threshold:g})" if flagged else f"not flagged (< {args.threshold:g})"
        print(f"nearest training image: {match.name}; similarity {match.similarity:.4f}; {verdict}")
    return 1 if flagged else 0


def _default_index(source: str) -> Path:
    """MODEL.index.npz beside a model's weights; a data set needs --out."""
    from ..governance.similarity import index_path_for
    from ..shipped import resolve_model

    try:
        model = resolve_model(source)
    except Exception:
        raise InputError(f"{source!r} is not a model: give --out for the index of a data set") from None
    return index_path_for(model)


def cmd_monitor_reference(args) -> int:
    from ..data import build_dataset
    from ..evaluation.fid import reference_stats
    from ..governance.monitor import reference_path
    from ..ldm import LatentDiffusion
    from ..shipped import resolve_model

    model = resolve_model(args.model)
    out = Path(args.out) if args.out else reference_path(model)
    if out.exists() and not args.overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it, or --out elsewhere")
    data = LatentDiffusion.load(model, "cpu").run.data
    dataset = build_dataset(replace(data, limit=0, holdout=0, crop="center", flip=False))
    n = min(args.n, len(dataset))
    if n < 2:
        raise InputError(f"--n {args.n}: summarise at least 2 training images")
    stats = reference_stats(data.dataset, dataset, n, split=data.split, progress=not args.quiet)
    stats.save(out)
    print(f"wrote the statistics of {n} training images of {args.model} to {out}; ldmkit serve uses them at start")
    return 0
