"""On-device editor benchmark: each concept's LoRA-merged GAN against the teacher's img2img edit.

For every concept with a `data/lora/<concept>` output, in one run on this machine: the held-out
test-split sources are edited by the merged GAN (PyTorch, and ONNX Runtime from `generator.onnx`), by the
base GAN before fine-tuning, and were edited by the teacher (the reference row: distill_data's held-out
edits). Quality: PSNR and SSIM against the teacher's edits, judge concept accuracy and content
preservation. Speed: median ms per edit at batch 1, GAN versus the teacher's img2img at the concept's
distill_data settings (re-timed here, not copied from the stage). The rank search, data study and
full-fine-tune comparison come from the lora stage's metrics. Goals (issue 4): >= 100x faster than the
teacher, concept accuracy within 5 points of the teacher's, adapter <= 5% of the base's parameters.

    python bench/editor.py [--concepts italic bold] [--repeats 200] [--teacher-repeats 10]
                           [--out bench/results/editor.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condenser.core.io import StagePaths  # noqa: E402
from condenser.data.pairs import load_pairs, read_concept  # noqa: E402
from condenser.distill.distill_data import teacher_edit_latency  # noqa: E402
from condenser.models.editor import edit_images, load_generator, with_concept  # noqa: E402
from condenser.models.judge import load_judge  # noqa: E402
from condenser.quality import edit_quality  # noqa: E402
from condenser.runtime.measure import latency, onnx_latency  # noqa: E402

GOALS = {"speedup": 100.0, "concept_gap_points": 5.0, "adapter_share": 0.05}


def measure(paths: StagePaths, concept: str, repeats: int, teacher_repeats: int, judge) -> dict:
    lora_dir, concept_dir = paths.data("lora", concept), paths.data("distill_data", concept)
    stage = json.loads(paths.metrics("lora", concept).read_text())
    spec = read_concept(concept_dir)
    heldout = load_pairs(concept_dir, concept, "heldout.safetensors")
    editor = load_generator(lora_dir / "merged")
    base = with_concept(load_generator(paths.data("gan_base")), concept)
    names = base.config.concepts
    quality = {"teacher": edit_quality((heldout.edits + 1) / 2, heldout, judge, spec.head),
               "base": edit_quality(edit_images(base, heldout.sources, concept, names), heldout, judge, spec.head),
               "lora": edit_quality(edit_images(editor, heldout.sources, concept, editor.config.concepts),
                                    heldout, judge, spec.head)}
    one = heldout.sources[:1]
    # The library's timing functions, as the lora stage calls them, re-run here on this machine now.
    timed = {"gan_pytorch": latency(lambda: editor(one), repeats),
             "gan_onnxruntime": onnx_latency(lora_dir / "merged" / "generator.onnx", {"image": one.numpy()}, repeats),
             "teacher_img2img": teacher_edit_latency(paths.data("teacher"), spec, (one + 1) / 2, teacher_repeats)}
    ms = {k: t.median_ms for k, t in timed.items()}
    gap = 100 * (quality["teacher"]["concept_accuracy"] - quality["lora"]["concept_accuracy"])
    return {
        "concept": concept, "new_concept": stage["new_concept"], "heldout_pairs": len(heldout),
        "quality": quality, "full_finetune_quality": stage["heldout"]["full_finetune"], "ms_per_edit": ms,
        "latency": {k: t.to_dict() for k, t in timed.items()},
        "speedup_pytorch": ms["teacher_img2img"] / ms["gan_pytorch"],
        "speedup_onnxruntime": ms["teacher_img2img"] / ms["gan_onnxruntime"],
        "concept_gap_points": gap, "adapter_share": stage["adapter_share"],
        "adapter_parameters": stage["adapter_parameters"], "generator_parameters": stage["generator_parameters"],
        "adapter_bytes": stage["adapter_bytes"], "merged_bytes": stage["merged_bytes"],
        "rank": stage["rank"], "data_fraction": stage["data_fraction"], "crucial_layers": stage["crucial_layers"],
        "rank_search": [{k: t[k] for k in ("rank", "adapter_parameters", "val_psnr", "val_concept_accuracy",
                                           "train_wall_time_s")} for t in stage["rank_search"]],
        "data_study": [{k: t[k] for k in ("data_fraction", "train_pairs", "val_psnr", "val_concept_accuracy")}
                       for t in stage["data_study"]],
        "full_finetune": stage["full_finetune"], "teacher_edit": stage["teacher_edit"],
        "goals_met": {"speedup": ms["teacher_img2img"] / ms["gan_pytorch"] >= GOALS["speedup"],
                      "concept_accuracy": gap <= GOALS["concept_gap_points"],
                      "adapter_size": stage["adapter_share"] <= GOALS["adapter_share"]},
    }


def _grid(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return out + ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines]


def table(results: list[dict]) -> str:
    text = []
    for r in results:
        q, ms = r["quality"], r["ms_per_edit"]
        text.append(f"== {r['concept']}{' (new to the base GAN)' if r['new_concept'] else ''}: "
                    f"{r['heldout_pairs']} held-out edits; teacher img2img {r['teacher_edit']['steps']} steps at "
                    f"strength {r['teacher_edit']['strength']}, guidance {r['teacher_edit']['guidance_scale']}")
        rows = [["teacher img2img", "-", "-", f"{q['teacher']['concept_accuracy']:.3f}",
                 f"{q['teacher']['content_preservation']:.3f}", f"{ms['teacher_img2img']:.1f}", "1x"],
                ["base GAN", f"{q['base']['psnr']:.2f}", f"{q['base']['ssim']:.3f}",
                 f"{q['base']['concept_accuracy']:.3f}", f"{q['base']['content_preservation']:.3f}", "-", "-"],
                [f"LoRA r={r['rank']} merged", f"{q['lora']['psnr']:.2f}", f"{q['lora']['ssim']:.3f}",
                 f"{q['lora']['concept_accuracy']:.3f}", f"{q['lora']['content_preservation']:.3f}",
                 f"{ms['gan_pytorch']:.2f}", f"{r['speedup_pytorch']:.0f}x"],
                ["  same, ONNX Runtime", "", "", "", "", f"{ms['gan_onnxruntime']:.2f}",
                 f"{r['speedup_onnxruntime']:.0f}x"],
                ["full fine-tune", f"{r['full_finetune_quality']['psnr']:.2f}",
                 f"{r['full_finetune_quality']['ssim']:.3f}", f"{r['full_finetune_quality']['concept_accuracy']:.3f}",
                 f"{r['full_finetune_quality']['content_preservation']:.3f}", "-", "-"]]
        text += _grid(["model", "PSNR", "SSIM", "concept acc", "content", "ms/edit", "speedup"], rows)
        ff = r["full_finetune"]
        text.append(f"adapter {r['adapter_parameters']:,} params = {100 * r['adapter_share']:.2f}% of "
                    f"{r['generator_parameters']:,} ({r['adapter_bytes']:,} B vs {r['merged_bytes']:,} B); "
                    f"LoRA/full train time {ff['time_ratio_lora_over_full']:.2f}; "
                    f"PSNR LoRA - full {ff['psnr_lora_minus_full']:+.2f} dB; layers {', '.join(r['crucial_layers'])}")
        text.append("rank search (val PSNR): " + ", ".join(
            f"r{t['rank']}={t['val_psnr']:.2f}" for t in r["rank_search"]) + f"  -> rank {r['rank']}")
        text.append("data study (val PSNR): " + ", ".join(
            f"{t['data_fraction']:.0%} ({t['train_pairs']})={t['val_psnr']:.2f}" for t in r["data_study"])
            + f"  -> {r['data_fraction']:.0%}")
        text.append("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in r["goals_met"].items()))
        text.append("")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--concepts", nargs="*", help="default: every concept with a data/lora/<concept> output")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--teacher-repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "editor.json")
    args = parser.parse_args(argv)
    paths = StagePaths(args.root)
    concepts = args.concepts or sorted(p.name for p in paths.data("lora").glob("*") if (p / "merged").is_dir())
    missing = [c for c in concepts if not (paths.data("lora", c) / "merged").is_dir()]
    if not concepts or missing:
        print(f"{paths.data('lora')}: no LoRA editor for {', '.join(missing) or 'any concept'}; run the lora "
              "stages first (dvc repro lora)", file=sys.stderr)
        return 1
    judge, _ = load_judge(paths.data("evaluator"))
    results = [measure(paths, c, args.repeats, args.teacher_repeats, judge) for c in concepts]
    print(table(results))
    out = {"threads": torch.get_num_threads(), "goals": GOALS, "concepts": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
