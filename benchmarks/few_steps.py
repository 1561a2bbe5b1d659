"""Few-step sampling on this CPU: a model against its consistency-distilled student (an LCM-LoRA or a distilled
model), in the same process, on the same conditions.

    .venv/bin/python benchmarks/few_steps.py                                   # fashion-mnist and fashion-mnist-lcm
    .venv/bin/python benchmarks/few_steps.py --teacher MODEL --student runs/distill/lora.safetensors --fid 2000
    .venv/bin/python benchmarks/few_steps.py --teacher emoji --student emoji-lcm --prompt "red apple"

Rows: the teacher with DPM-Solver++ 2M at 25 steps (its card's setting) and at the student's steps, both with the
teacher's guidance (one batched U-Net pass per step for both branches); the student with the lcm sampler at its
steps and at fewer, guidance 1 (the teacher's is folded in). For each: images per second for a batch of --n,
decoded; the warm time of one image (median of --repeats after a warm-up); with --fid N, FID against --split
(`ldmkit evaluate`'s protocol: TF-Inception, N images). A text model draws --prompt. Writes
benchmarks/out/few_steps.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
from common import cpu_name, default_out, write_json  # noqa: E402

from ldmkit.evaluation.evaluate import evaluate  # noqa: E402
from ldmkit.pipelines.generate import generate  # noqa: E402
from ldmkit.pipelines.request import SampleRequest  # noqa: E402
from ldmkit.shipped import load_model, resolve_model  # noqa: E402


def labels_for(ldm, n: int) -> list[int] | None:
    return [i % ldm.num_classes for i in range(n)] if ldm.num_classes else None


def timed(fn, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="fashion-mnist")
    ap.add_argument("--student", default="fashion-mnist-lcm")
    ap.add_argument("--n", type=int, default=16, help="images per batch for images/s (default 16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls of each row (default 5)")
    ap.add_argument("--cfg", type=float, default=3.0, help="the teacher's guidance (default 3)")
    ap.add_argument("--fid", type=int, default=0, metavar="N", help="also FID at N images (slow; default off)")
    ap.add_argument("--split", default="test", help="the images FID compares with (emoji has only 'train')")
    ap.add_argument("--prompt", default="red apple", help="what a text model draws (default 'red apple')")
    ap.add_argument("--out", default=default_out("few_steps"))
    args = ap.parse_args(argv)

    teacher, student = load_model(resolve_model(args.teacher)), load_model(resolve_model(args.student))
    k = student.run.distill.steps
    if not k:
        ap.error(f"{args.student} is not a distilled model (no distill.steps); give `ldmkit distill`'s output")
    rows = [
        (args.teacher, teacher, "dpmpp_2m", 25, args.cfg),
        (args.teacher, teacher, "dpmpp_2m", k, args.cfg),
        *[(args.student, student, "lcm", s, 1.0) for s in dict.fromkeys((k, max(1, k // 2), 1))],
    ]

    def prompts_for(ldm) -> list[str] | None:
        return [args.prompt] if ldm.text_encoder is not None else None

    torch.manual_seed(0)
    results = []
    print(f"{'model':<20} {'sampler':<9} {'steps':>5} {'cfg':>4} {'images/s':>9} {'1 image s':>9} {'FID':>7}")
    for name, ldm, sampler, steps, cfg in rows:

        def batch(ldm=ldm, sampler=sampler, steps=steps, cfg=cfg):
            n = args.n
            req = SampleRequest(
                n=n,
                labels=labels_for(ldm, n),
                prompts=prompts_for(ldm),
                sampler=sampler,
                steps=steps,
                cfg=cfg,
                batch_size=n,
            )
            return generate(ldm, req)

        def one(ldm=ldm, sampler=sampler, steps=steps, cfg=cfg):
            req = SampleRequest(
                n=1, labels=labels_for(ldm, 1), prompts=prompts_for(ldm), sampler=sampler, steps=steps, cfg=cfg
            )
            return generate(ldm, req)

        best = min(timed(batch, max(1, args.repeats // 2)))
        single = statistics.median(timed(one, args.repeats))
        fid = None
        if args.fid:
            model = resolve_model(name)
            fid = evaluate(model, split=args.split, n=args.fid, sampler=sampler, steps=steps, cfg=cfg, progress=False)[
                "fid"
            ]
        row = {"model": name, "sampler": sampler, "steps": steps, "cfg": cfg, "images_per_s": args.n / best}
        row |= {"one_image_s": single, "fid": fid}
        results.append(row)
        shown = f"{fid:7.2f}" if fid is not None else f"{'-':>7}"
        print(f"{name:<20} {sampler:<9} {steps:>5} {cfg:>4g} {args.n / best:>9.2f} {single:>9.3f} {shown}")
    base = results[0]["images_per_s"]
    for r in results:
        r["speed_vs_teacher_25"] = r["images_per_s"] / base
    print(f"student at {k} steps: {results[2]['speed_vs_teacher_25']:.1f}x the teacher's images/s at 25 steps")
    about = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": torch.get_num_threads()}
    about |= {"torch": torch.__version__, "command": " ".join(sys.argv), "n": args.n, "repeats": args.repeats}
    write_json(args.out, {"rows": results, "about": about})
    return 0


if __name__ == "__main__":
    sys.exit(main())
