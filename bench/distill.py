"""Step-distillation benchmark: teacher vs few-step student, quality against cost.

Reads the figures the step_distill stage measured in one run (`metrics/step_distill.json`: every model
sampled on the same held-out captions and seeds, FD and prompt accuracy from the judge, UNet evaluations
counted per image, wall time per image); it does not re-measure, so run the stage first
(`dvc repro -s step_distill`). Prints the table and writes it as JSON.

    python bench/distill.py [--metrics metrics/step_distill.json] [--out bench/results/distill.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("digit", "style", "color")


def rows(metrics: dict) -> list[dict]:
    """One row per model: teachers first, then students, most steps first."""
    models = sorted(metrics["models"].items(), key=lambda kv: (kv[1]["model"] != "teacher", -kv[1]["steps"]))
    return [{"name": name, "model": m["model"], "steps": m["steps"], "guidance_scale": m["guidance_scale"],
             "unet_evals_per_image": m["unet_evals_per_image"], "ms_per_image": m["ms_per_image"],
             "fd": m["fd"], "fd_to_reference": m["fd_to_reference"],
             **{f"accuracy_{h}": m["prompt_accuracy"].get(h) for h in HEADS}} for name, m in models]


def table(result: dict) -> str:
    header = ["model", "steps", "cfg", "UNet evals/img", "ms/img", "FD", "FD/ref", *(f"acc {h}" for h in HEADS)]
    lines = [header]
    for r in result["rows"]:
        lines.append([f"{r['model']} {r['steps']}", str(r["steps"]), f"{r['guidance_scale']:g}",
                      f"{r['unet_evals_per_image']:g}", f"{r['ms_per_image']:.1f}", f"{r['fd']:.1f}",
                      f"{r['fd_to_reference']:.3f}",
                      *(f"{r[f'accuracy_{h}']:.3f}" if r[f"accuracy_{h}"] is not None else "-" for h in HEADS)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    ratios = result["ratios"]
    text += ["", f"student FD / reference FD: {ratios['student_fd_to_reference']:.3f}   "
             f"undistilled teacher FD / student FD: {ratios['baseline_fd_to_student']:.3f}   "
             f"UNet evaluations: {ratios['unet_eval_reduction']:.1f}x fewer   speedup: {ratios['speedup']:.1f}x",
             f"real-vs-real FD floor: {result['fd_floor_validation_vs_test']:.1f} "
             f"({result['eval_images']} images per model)",
             "final distillation loss per round: " + ", ".join(
                 f"{r['teacher_steps']}->{r['student_steps']}: {r['final_loss']:.4f}" for r in result["rounds"])]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics" / "step_distill.json")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distill.json")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        print(f"{args.metrics}: missing; run the step_distill stage first (dvc repro -s step_distill)",
              file=sys.stderr)
        return 1
    metrics = json.loads(args.metrics.read_text())
    result = {"source": str(args.metrics), "rows": rows(metrics), "ratios": metrics["ratios"],
              "rounds": metrics["rounds"], "eval_images": metrics["eval_images"],
              "fd_floor_validation_vs_test": metrics["fd_floor_validation_vs_test"],
              "train_wall_time_s": metrics["train_wall_time_s"], "device": metrics["device"]}
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
