"""lora@<concept> — a per-concept LoRA on the base GAN, with rank search and a data study.

Method: "Distilling GANs from diffusion models for real-time on-device editing" (METHODS.md): instead of
a new GAN per concept, fine-tune the base GAN with peft LoRA on its crucial layers only.
1. Crucial layers, measured: a short full fine-tune (`probe_steps`) on the concept's pairs; the
   `crucial_layers` layers whose weights moved most (relative Frobenius change) get the LoRA.
2. Rank search over `ranks` on all the concept's training pairs; keep the smallest rank whose validation
   PSNR (against the teacher's edits) is within `tolerance_db` of the best.
3. Data study at that rank over `data_fractions` (nested subsets); keep the least data within
   `tolerance_db` of the largest fraction, as the paper keeps the least data that holds quality.
4. Full fine-tuning of the base on the same data and steps, for comparison: size, time, quality.
A concept outside gan_base.concepts is new to the base: it gets a new concept code, initialised at the
mean of the base codes and trained along with the LoRA (it counts in the adapter's size).

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

import copy
import time

import numpy as np
import torch
from accelerate import Accelerator

from condenser import editor as E
from condenser.config import LoraParams
from condenser.distill_data import load_img2img
from condenser.io import Manifest, StagePaths, atomic_dir, write_json
from condenser.judge import load_judge
from condenser.plots import save_grid
from condenser.stage import StageError, stage_main


def run(cfg: LoraParams, paths: StagePaths, concept: str) -> dict:
    if concept not in cfg.concepts:
        raise StageError(f"lora.concepts has no concept '{concept}' (known: {', '.join(cfg.concepts)})")
    gan_dir, concept_dir = paths.data("gan_base"), paths.data("distill_data", concept)
    training = E.load_training(gan_dir)
    settings = E.concept_settings(concept_dir)
    pairs, heldout = E.load_pairs(concept_dir, concept), E.load_pairs(concept_dir, concept, "heldout.safetensors")
    judge, _ = load_judge(paths.data("evaluator"))
    manifest = Manifest("lora", paths.root, {"concept": concept, **cfg.model_dump(exclude={"concepts"})},
                        seed=cfg.seed)
    for p in (gan_dir, concept_dir, paths.data("evaluator"), paths.data("teacher")):
        manifest.add_input(p)

    new_concept = concept not in training["concepts"]
    base = E.with_concept(E.load_generator(gan_dir), concept)
    base_disc = E.with_concept(E.load_discriminator(gan_dir), concept)
    names = base.config.concepts
    train_idx, val_idx = E.split_pairs(len(pairs), training["validation_fraction"], training["seed"])
    val = pairs.subset(val_idx)
    accelerator = Accelerator()

    def fit(generator, data, lr, steps, desc):
        return E.train_gan(generator, copy.deepcopy(base_disc), data, names, steps, cfg.batch_size, lr, cfg.disc_lr,
                           training["l1_weight"], training["adv_weight"], cfg.seed, accelerator, desc=desc)

    def score(generator, data):
        return E.edit_quality(E.edit_images(generator, data.sources, concept, names), data, judge,
                              settings["head"])

    # 1. Crucial layers: where a short full fine-tune moves the weights most.
    probe = copy.deepcopy(base).requires_grad_(True)
    fit(probe, pairs.subset(train_idx), cfg.full_lr, cfg.probe_steps, f"lora@{concept}: probe")
    changes = E.layer_change(base, probe)
    crucial = [row["layer"] for row in changes[:cfg.crucial_layers]]

    # 2. Rank search on all training pairs.
    def lora_trial(rank: int, fraction: float, subset: np.ndarray) -> tuple[dict, object]:
        model = E.with_lora(base, crucial, rank, train_codes=new_concept)
        result = fit(model, pairs.subset(subset), cfg.lr, cfg.steps, f"lora@{concept}: rank {rank}, {fraction:.0%}")
        adapter = E.adapter_parameters(model)
        row = {"rank": rank, "data_fraction": fraction, "train_pairs": len(subset), "adapter_parameters": adapter,
               "adapter_share": adapter / E.parameter_count(base), "train_wall_time_s": result.wall_time_s,
               **{f"val_{k}": v for k, v in score(model, val).items()}}
        return row, model

    full = max(cfg.data_fractions)
    full_subset = E.data_fraction(train_idx, full, cfg.seed)
    trials = {(r, full): lora_trial(r, full, full_subset) for r in sorted(cfg.ranks)}
    rank_rows = [trials[(r, full)][0] for r in sorted(cfg.ranks)]
    best = max(row["val_psnr"] for row in rank_rows)
    rank = min(row["rank"] for row in rank_rows if row["val_psnr"] >= best - cfg.tolerance_db)

    # 3. Data study at the chosen rank.
    for f in sorted(cfg.data_fractions):
        if (rank, f) not in trials:
            trials[(rank, f)] = lora_trial(rank, f, E.data_fraction(train_idx, f, cfg.seed))
    data_rows = [trials[(rank, f)][0] for f in sorted(cfg.data_fractions)]
    reference = trials[(rank, full)][0]["val_psnr"]
    fraction = min(row["data_fraction"] for row in data_rows if row["val_psnr"] >= reference - cfg.tolerance_db)
    chosen_row, chosen = trials[(rank, fraction)]
    subset = E.data_fraction(train_idx, fraction, cfg.seed)

    # 4. Full fine-tuning on the same data, for comparison.
    full_ft = copy.deepcopy(base).requires_grad_(True)
    full_result = fit(full_ft, pairs.subset(subset), cfg.full_lr, cfg.steps, f"lora@{concept}: full fine-tune")
    full_ft.eval()

    editor = E.merged(chosen, concept)
    x = heldout.sources[:16]
    c = torch.full((len(x),), names.index(concept), dtype=torch.long)
    with torch.no_grad():
        merge_error = float((editor(x) - chosen(x, c)).abs().max())

    # Held-out scores, and batch-1 latency against the teacher's img2img edit.
    rows = {"teacher": {k: v for k, v in E.edit_quality((heldout.edits + 1) / 2, heldout, judge, settings["head"]).items()
                        if k in ("concept_accuracy", "content_preservation")},
            "base": score(base, heldout), "lora": score(editor, heldout), "full_finetune": score(full_ft, heldout)}
    one = heldout.sources[:1]
    rows["lora"]["ms_per_edit"] = E.latency_ms(lambda: editor(one), cfg.latency_repeats)
    rows["teacher"]["ms_per_edit"] = _teacher_latency(paths, settings, (one + 1) / 2, cfg.teacher_latency_repeats)

    with atomic_dir(paths.data("lora", concept)) as tmp:
        chosen.save_pretrained(str(tmp / "adapter"))
        (tmp / "adapter" / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        E.save_model(editor, tmp / "merged")
        E.export_onnx(editor, tmp / "merged" / "generator.onnx", int(one.shape[-1]))
        rows["lora"]["onnxruntime_ms_per_edit"] = _onnx_latency(tmp / "merged" / "generator.onnx", one,
                                                                  cfg.latency_repeats)
        adapter_bytes = sum(f.stat().st_size for f in (tmp / "adapter").iterdir())
        merged_bytes = (tmp / "merged" / E.GENERATOR_WEIGHTS).stat().st_size
        write_json(tmp / "search.json", {
            "crucial_layers": {"probe_steps": cfg.probe_steps, "chosen": crucial, "layers": changes},
            "rank_search": {"trials": [_stable(r) for r in rank_rows], "chosen_rank": rank},
            "data_study": {"rank": rank, "trials": [_stable(r) for r in data_rows], "chosen_fraction": fraction},
        })
        manifest.write(tmp, artifact=f"LoRA (rank {rank}, {fraction:.0%} of the pairs) on the base GAN for "
                                     f"concept '{concept}', and the merged single-concept editor",
                       new_concept=new_concept, crucial_layers=crucial)

    base_params = E.parameter_count(base)
    metrics = {
        "new_concept": new_concept,
        "heldout": rows,
        "crucial_layers": crucial,
        "rank": rank,
        "data_fraction": fraction,
        "train_pairs": len(subset),
        "rank_search": rank_rows,
        "data_study": data_rows,
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
        "teacher_edit": {k: settings[k] for k in ("steps", "strength", "guidance_scale")},
    }
    n = min(8, len(heldout))
    save_grid(torch.cat([(heldout.sources[:n] + 1) / 2, (heldout.edits[:n] + 1) / 2,
                         *(E.edit_images(m, heldout.sources[:n], concept, names) for m in (base, editor, full_ft))]),
              paths.plots("lora") / f"{concept}.png", nrow=n)
    metrics["run"] = manifest.run_record()
    write_json(paths.metrics("lora", concept), metrics)
    return metrics


def _stable(row: dict) -> dict:
    # Trial timings vary run to run: they go to the metrics file, not the hashed search.json.
    return {k: v for k, v in row.items() if k != "train_wall_time_s"}


def _teacher_latency(paths: StagePaths, settings: dict, image: torch.Tensor, repeats: int) -> float:
    """ms per img2img edit at batch 1, with the concept's distill_data settings."""
    pipe = load_img2img(paths.data("teacher"))
    prompt = settings["prompt"].format(digit="seven", style="bold", color="red")
    return E.latency_ms(lambda: pipe(prompt=[prompt], image=image, strength=settings["strength"],
                                     num_inference_steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                                     output_type="pt"), repeats, warmup=1)


def _onnx_latency(path, image: torch.Tensor, repeats: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"image": image.numpy()}
    return E.latency_ms(lambda: session.run(None, feed), repeats)


def main() -> None:
    stage_main("lora", run, items="concepts")


if __name__ == "__main__":
    main()
