"""What batch invariance costs on this CPU: a shipped model's generation with the plain kernels (whose numbers depend
on the batch) against the batch-invariant ones (ldmkit's default), at batch 1, 4 and 16, in the same process.

    .venv/bin/python benchmarks/batch_invariance.py                 # emoji, 4 steps, batches 1 4 16
    .venv/bin/python benchmarks/batch_invariance.py --model fashion-mnist --steps 10 --batches 1 16

Each row times `generate` (conditioning, the sampler's guided U-Net passes, decoding) per image, best of
--repeats, the two settings interleaved so a busy machine slows both alike. It also runs `self_check()` (the
property itself, at this process's thread count) and says whether the invariant images differ from the plain ones.
Writes benchmarks/out/batch_invariance.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import cpu_name, default_out, write_json  # noqa: E402

from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.nn.invariant import plain_kernels, self_check  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.shipped import resolve_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=default_out("batch_invariance"))
    args = ap.parse_args(argv)

    ldm = LatentDiffusion.load(resolve_model(args.model))
    rows = []
    for b in args.batches:
        prompts = [f"prompt {i}" for i in range(b)] if ldm.text_encoder is not None else None
        labels = [i % ldm.num_classes for i in range(b)] if ldm.num_classes else None
        req = SampleRequest(n=b, prompts=prompts, labels=labels, steps=args.steps, cfg=args.cfg, seed=0, batch_size=b)
        best = {"plain": float("inf"), "invariant": float("inf")}
        images = {}
        for rep in range(args.repeats + 1):  # the first round warms up
            for name in ("plain", "invariant"):
                ctx = plain_kernels() if name == "plain" else contextlib.nullcontext()
                with ctx:
                    t = time.perf_counter()
                    images[name], _ = generate(ldm, req)
                    if rep:
                        best[name] = min(best[name], (time.perf_counter() - t) / b)
        rows.append(
            {
                "batch": b,
                "plain_ms_per_image": 1000 * best["plain"],
                "invariant_ms_per_image": 1000 * best["invariant"],
                "cost": best["invariant"] / best["plain"],
                "max_pixel_difference": float((images["plain"] - images["invariant"]).abs().max()),
            }
        )
    check = self_check()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": args.model,
        "steps": args.steps,
        "self_check": check,
        "rows": rows,
    }
    print(f"{args.model}, {args.steps} steps, cfg {args.cfg}, {torch.get_num_threads()} threads, {result['cpu']}")
    print(f"{'batch':>5} {'plain ms/img':>13} {'invariant ms/img':>17} {'cost':>6} {'max |diff|':>11}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['plain_ms_per_image']:>13.1f} {r['invariant_ms_per_image']:>17.1f} "
            f"{r['cost']:>5.2f}x {r['max_pixel_difference']:>11.2e}"
        )
    print(f"self-check: {'holds' if check['holds'] else 'FAILS: ' + '; '.join(check['failures'][:3])}")
    write_json(args.out, result, quiet=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
