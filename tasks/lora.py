"""lora@<concept> — a per-concept LoRA on the base GAN, with rank search and a data study.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (E2GAN, arXiv
2401.06127): instead of a new GAN per concept, fine-tune the base GAN with peft LoRA on its crucial
layers only. The method's steps (crucial layers, rank search, data study, full fine-tune comparison)
are condenser.distill.lora.search; this stage loads the inputs, runs it, and scores and ships the result.

Scored in one run on the concept's held-out test-split pairs: the teacher's edits (reference row), the
base GAN before fine-tuning, the LoRA (merged) and the full fine-tune: PSNR and SSIM against the
teacher's edits, judge concept accuracy and content preservation, and batch-1 latency of the GAN
(PyTorch and ONNX Runtime) against the teacher's img2img edit at its distill_data settings.

Run per concept, as DVC's foreach does: `python -m tasks.lora italic`.
Outputs: data/lora/<concept>/{adapter/ (peft adapter_model.safetensors + adapter_config.json),
merged/ (generator.safetensors + generator_config.json + generator.onnx, the LoRA merged in by
merge_and_unload, concept fixed), search.json (every trial), manifest.json};
metrics/lora/<concept>.json; plots/lora/<concept>.png.
"""

from __future__ import annotations

import torch

from condenser.core.config import LoraParams
from condenser.core.errors import StageError
from condenser.core.io import StagePaths, write_json
from condenser.core.plots import save_grid
from condenser.core.stage import Stage, stage_main
from condenser.data.pairs import load_pairs, read_concept, split_pairs
from condenser.distill.distill_data import teacher_edit_latency
from condenser.distill.lora import merged, search
from condenser.models.common import parameter_count
from condenser.models.editor import (
    GENERATOR_WEIGHTS,
    edit_images,
    load_discriminator,
    load_generator,
    save_model,
    with_concept,
)
from condenser.models.judge import load_judge
from condenser.quality import edit_quality
from condenser.runtime.measure import latency, onnx_latency
from condenser.runtime.onnx import export_onnx
from condenser.train.gan import GanObjective

ONNX_FILE = "generator.onnx"


def run(cfg: LoraParams, paths: StagePaths, concept: str) -> dict:
    if concept not in cfg.concepts:
        raise StageError(f"lora.concepts has no concept '{concept}' (known: {', '.join(cfg.concepts)})")
    gan_dir, concept_dir = paths.data("gan_base"), paths.data("distill_data", concept)
    objective = GanObjective.load(gan_dir)
    spec = read_concept(concept_dir)
    pairs, heldout = load_pairs(concept_dir, concept), load_pairs(concept_dir, concept, "heldout.safetensors")
    judge, _ = load_judge(paths.data("evaluator"))
    stage = Stage("lora", paths, {"concept": concept, **cfg.model_dump(exclude={"concepts"})}, seed=cfg.seed,
                  item=concept)
    for p in (gan_dir, concept_dir, paths.data("evaluator"), paths.data("teacher")):
        stage.add_input(p)

    new_concept = concept not in objective.concepts
    base = with_concept(load_generator(gan_dir), concept)
    base_disc = with_concept(load_discriminator(gan_dir), concept)
    names = base.config.concepts
    train_idx, val_idx = split_pairs(len(pairs), objective.validation_fraction, objective.seed)
    val = pairs.subset(val_idx)
    accelerator = stage.accelerator()

    def score(generator, data):
        return edit_quality(edit_images(generator, data.sources, concept, names), data, judge, spec.head)

    found = search(base, base_disc, pairs, train_idx, val, concept, cfg, objective, accelerator, score)
    rank, fraction, chosen, chosen_row = found.rank, found.fraction, found.chosen, found.chosen_row
    full_ft, full_result = found.full_finetune, found.full_result

    editor = merged(chosen, concept)
    x = heldout.sources[:16]
    c = torch.full((len(x),), names.index(concept), dtype=torch.long)
    with torch.no_grad():
        merge_error = float((editor(x) - chosen(x, c)).abs().max())

    # Held-out scores, and batch-1 latency against the teacher's img2img edit.
    rows = {"teacher": {k: v for k, v in edit_quality((heldout.edits + 1) / 2, heldout, judge, spec.head).items()
                        if k in ("concept_accuracy", "content_preservation")},
            "base": score(base, heldout), "lora": score(editor, heldout), "full_finetune": score(full_ft, heldout)}
    one = heldout.sources[:1]
    rows["lora"]["ms_per_edit"] = latency(lambda: editor(one), cfg.latency_repeats).median_ms
    rows["teacher"]["ms_per_edit"] = teacher_edit_latency(paths.data("teacher"), spec, (one + 1) / 2,
                                                          cfg.teacher_latency_repeats).median_ms

    with stage.output(artifact=f"LoRA (rank {rank}, {fraction:.0%} of the pairs) on the base GAN for concept "
                               f"'{concept}', and the merged single-concept editor",
                      new_concept=new_concept, crucial_layers=found.crucial) as tmp:
        chosen.save_pretrained(str(tmp / "adapter"))
        (tmp / "adapter" / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        save_model(editor, tmp / "merged")
        export_onnx(editor, (torch.zeros(1, 3, *one.shape[-2:]),), tmp / "merged" / ONNX_FILE, ["image"], ["edit"])
        rows["lora"]["onnxruntime_ms_per_edit"] = onnx_latency(tmp / "merged" / ONNX_FILE, {"image": one.numpy()},
                                                               cfg.latency_repeats).median_ms
        adapter_bytes = sum(f.stat().st_size for f in (tmp / "adapter").iterdir())
        merged_bytes = (tmp / "merged" / GENERATOR_WEIGHTS).stat().st_size
        write_json(tmp / "search.json", {
            "crucial_layers": {"probe_steps": cfg.probe_steps, "chosen": found.crucial, "layers": found.layer_changes},
            "rank_search": {"trials": [_stable(r) for r in found.rank_rows], "chosen_rank": rank},
            "data_study": {"rank": rank, "trials": [_stable(r) for r in found.data_rows],
                           "chosen_fraction": fraction},
        })

    base_params = parameter_count(base)
    metrics = {
        "new_concept": new_concept,
        "heldout": rows,
        "crucial_layers": found.crucial,
        "rank": rank,
        "data_fraction": fraction,
        "train_pairs": len(found.subset),
        "rank_search": found.rank_rows,
        "data_study": found.data_rows,
        "adapter_parameters": chosen_row["adapter_parameters"],
        "generator_parameters": base_params,
        "adapter_share": chosen_row["adapter_parameters"] / base_params,
        "adapter_bytes": adapter_bytes,
        "merged_bytes": merged_bytes,
        "merge_max_abs_error": merge_error,
        "full_finetune": {"trainable_parameters": base_params, "train_wall_time_s": full_result.wall_time_s,
                          "lora_train_wall_time_s": chosen_row["train_wall_time_s"],
                          "time_ratio_lora_over_full": chosen_row["train_wall_time_s"] / full_result.wall_time_s,
                          "size_ratio_adapter_over_full": chosen_row["adapter_parameters"] / base_params,
                          "psnr_lora_minus_full": rows["lora"]["psnr"] - rows["full_finetune"]["psnr"]},
        "speedup_vs_teacher": rows["teacher"]["ms_per_edit"] / rows["lora"]["ms_per_edit"],
        "onnxruntime_speedup_vs_teacher": rows["teacher"]["ms_per_edit"] / rows["lora"]["onnxruntime_ms_per_edit"],
        "concept_accuracy_gap": rows["teacher"]["concept_accuracy"] - rows["lora"]["concept_accuracy"],
        "teacher_edit": {"steps": spec.steps, "strength": spec.strength, "guidance_scale": spec.guidance_scale},
    }
    n = min(8, len(heldout))
    save_grid(torch.cat([(heldout.sources[:n] + 1) / 2, (heldout.edits[:n] + 1) / 2,
                         *(edit_images(m, heldout.sources[:n], concept, names) for m in (base, editor, full_ft))]),
              stage.plots / f"{concept}.png", nrow=n)
    return stage.finish(metrics)


def _stable(row: dict) -> dict:
    # Trial timings vary run to run: they go to the metrics file, not the hashed search.json.
    return {k: v for k, v in row.items() if k != "train_wall_time_s"}


def main() -> None:
    stage_main("lora", run, items="concepts")


if __name__ == "__main__":
    main()
