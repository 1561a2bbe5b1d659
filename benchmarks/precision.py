"""Images per second in fp32 and bf16 sampling (--precision), with and without the batch-invariant kernels.

    .venv/bin/python benchmarks/precision.py                     # the shipped emoji model, 16 images, 25 steps
    .venv/bin/python benchmarks/precision.py weights/fashion-mnist.safetensors --n 16 --steps 25

Each row generates n images in one batch at `steps` DPM-Solver++ 2M steps with guidance and decodes them (in
float32 always), through `generate` with SampleRequest(precision=...). "invariant off" runs the same call inside
`nn.invariant.plain_kernels()`, which turns the per-image CPU kernels off, to show what batch invariance costs in
each precision. The rows are interleaved (fp32, bf16, fp32 off, bf16 off, then again) and each row keeps its best
of `--repeats`, so load from other processes hits them alike; images per CPU-second of this process are reported
beside images per second, since on a shared machine only they compare the rows. Also reports the mean absolute
pixel difference of bf16 from fp32 (images in [-1, 1]) and the CPU's bf16 support. Writes benchmarks/out/precision.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import default_out, write_json  # noqa: E402

from ldmkit.ldm import LatentDiffusion  # noqa: E402
from ldmkit.nn.invariant import plain_kernels  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.runtime import native_bf16  # noqa: E402

ROWS = (("fp32", True), ("bf16", True), ("fp32", False), ("bf16", False))


def run(ldm: LatentDiffusion, args, precision: str, invariant: bool) -> tuple[float, float, torch.Tensor]:
    labels = [i % ldm.num_classes for i in range(args.n)] if ldm.num_classes else None
    prompts = [args.prompt] * args.n if ldm.text_encoder is not None else None
    req = SampleRequest(
        n=args.n, labels=labels, prompts=prompts, steps=args.steps, cfg=args.cfg, batch_size=args.n, precision=precision
    )
    t, cpu = time.perf_counter(), time.process_time()
    if invariant:
        images = generate(ldm, req)[0]
    else:
        with plain_kernels():
            images = generate(ldm, req)[0]
    return time.perf_counter() - t, time.process_time() - cpu, images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "weights" / "emoji.safetensors"))
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--prompt", default="red apple")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=default_out("precision"))
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    if not native_bf16(cpu):
        print("this CPU has neither AVX-512 BF16 nor AMX: --precision bf16 is refused here", file=sys.stderr)
        return 1
    ldm = LatentDiffusion.load(args.checkpoint, "cpu")
    run(ldm, argparse.Namespace(**{**vars(args), "n": 2, "steps": 2}), "bf16", True)  # warm-up
    best: dict[tuple[str, bool], tuple[float, float]] = {}
    images: dict[tuple[str, bool], torch.Tensor] = {}
    for _ in range(args.repeats):
        for row in ROWS:
            seconds, cpu, images[row] = run(ldm, args, *row)
            best[row] = min(best.get(row, (float("inf"), 0.0)), (seconds, cpu))
    ref = images[("fp32", True)]
    # On a loaded machine the wall time measures the other processes too; the process's CPU seconds (all its
    # threads) measure the work, so their ratios compare the rows.
    head = f"{'precision':<10} {'invariant':<10} {'images/s':>9} {'images/cpu-s':>13} {'mean |diff| vs fp32':>20}"
    print(head)
    result_rows = []
    for precision, invariant in ROWS:
        s, cpu = best[(precision, invariant)]
        diff = float((images[(precision, invariant)] - ref).abs().mean())
        ips, ipc = args.n / s, args.n / cpu
        print(f"{precision:<10} {'on' if invariant else 'off':<10} {ips:>9.2f} {ipc:>13.3f} {diff:>20.4f}")
        row = {"precision": precision, "invariant": invariant, "images_per_s": ips, "images_per_cpu_s": ipc}
        result_rows.append(row | {"mean_abs_diff": diff, "load_average": os.getloadavg()[0]})
    result = {
        "checkpoint": args.checkpoint,
        "n": args.n,
        "steps": args.steps,
        "cfg": args.cfg,
        "rows": result_rows,
        "finite": all(bool(torch.isfinite(x).all()) for x in images.values()),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
