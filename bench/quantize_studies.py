"""Two design studies behind the quantize stage, measured on the shipped chain models in one run each.

1. ExecuTorch quantizer scope (the student's UNet). XNNPACKQuantizer is set up three ways, each calibrated
   on the same rows as the stage: `global` (its default: conv, linear, add, mul, cat), `operators` (conv
   and linear by operator, what condenser.runtime.executorch ships) and `module_types` (conv and linear by
   module type); on editor_bold, the quantize nodes each set-up puts in. Each converted pt2e graph is run
   in PyTorch before lowering (XNNPACK's int8 numerics: the stage's .pte files match their graph to its
   parity figures) for the output error against fp32 and the student's own quality metrics on
   `quantize.eval_images` test captions, fp32 beside them.
2. Winograd scale starting point (editor_bold and the student). Winograd W8A8 layers start from the
   closed-form tap equalisation or from the paper's all-ones scales, then both are tuned data-free with the
   stage's settings. The table shows the output SQNR against fp32 of each.

    python bench/quantize_studies.py [--skip executorch|winograd] [--out bench/results/quantize_studies.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from condenser.compress.quantize.calibrate import subsample  # noqa: E402
from condenser.compress.quantize.fakequant import sqnr_db  # noqa: E402
from condenser.compress.quantize.layers import calibrate, quantize_  # noqa: E402
from condenser.compress.quantize.winograd import WinogradLayer, input_sizes, tune_scales_, winograd_  # noqa: E402
from condenser.compress.sparse.variants import CHAIN  # noqa: E402
from condenser.core.config import load_params  # noqa: E402
from condenser.core.io import StagePaths  # noqa: E402
from condenser.deliverables import deliverable  # noqa: E402
from tasks.quantize import ET_CALIBRATION, quant_config  # noqa: E402


def _chain(name: str, paths: StagePaths):
    params = load_params(paths.root / "params.yaml")
    d = deliverable(name, params.deliverables[name], paths)
    d = dataclasses.replace(d, path=paths.data("sparse", name) / CHAIN)
    batches = list(d.kind.calibration_batches(d, params.quantize.calibration, params.quantize.batch_size,
                                              params.quantize.seed))
    return params, d, d.kind.load(d.path), batches


def executorch_scope(paths: StagePaths) -> dict:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from condenser.runtime.executorch import calibration_rows

    params, d, model, batches = _chain("student", paths)
    kind, limit = d.kind, params.quantize.eval_images
    exportable = kind.exportable(model)
    example = tuple(kind.example_inputs(d).values())
    rows = calibration_rows([tuple(b.values()) for b in batches], ET_CALIBRATION)
    parity = [tuple(t[i:i + 1] for t in b.values()) for b in subsample(batches, params.quantize.parity_examples)
              for i in range(len(next(iter(b.values()))))]
    config = get_symmetric_quantization_config(is_per_channel=True)
    setups = {
        "global": lambda: XNNPACKQuantizer().set_global(config),
        "operators": lambda: XNNPACKQuantizer().set_operator_type(torch.ops.aten.conv2d.default, config)
        .set_operator_type(torch.ops.aten.linear.default, config),
        "module_types": lambda: XNNPACKQuantizer().set_module_type(torch.nn.Conv2d, config)
        .set_module_type(torch.nn.Linear, config),
    }
    # The editor's convs feed ReLUs: which set-up quantizes them shows in its count of quantize nodes.
    _, editor_d, editor, editor_batches = _chain("editor_bold", paths)
    editor_example = tuple(editor_d.kind.example_inputs(editor_d).values())
    out = {"editor_bold_quantize_nodes": {}}
    for name, make in setups.items():
        graph = prepare_pt2e(torch.export.export(editor, editor_example).module(), make())
        with torch.no_grad():
            graph(*editor_example)
        out["editor_bold_quantize_nodes"][name] = sum("quantize_per" in str(n.target)
                                                      for n in convert_pt2e(graph).graph.nodes)
    out["fp32"] = kind.evaluate(model, d, limit)
    for name, make in setups.items():
        graph = prepare_pt2e(torch.export.export(exportable, example).module(), make())
        with torch.no_grad():
            for row in rows:
                graph(*row)
        graph = convert_pt2e(graph)
        errors = []
        with torch.no_grad():
            for row in parity:
                errors.append((graph(*row) - exportable(*row)).abs())
        error = torch.cat([e.flatten() for e in errors])

        def run(inputs, graph=graph):
            return torch.cat([graph(*(t[i:i + 1] for t in inputs)) for i in range(len(inputs[0]))])

        out[name] = {"quantize_nodes": sum("quantize_per" in str(n.target) for n in graph.graph.nodes),
                     "max_abs": float(error.max()), "mean_abs": float(error.mean()),
                     "quality": kind.evaluate(kind.deployed(model, run), d, limit)}
    return out


def winograd_start(paths: StagePaths, name: str) -> dict:
    params, d, model, batches = _chain(name, paths)
    w, kind = params.quantize.winograd, d.kind
    plain = quantize_(copy.deepcopy(model), quant_config(params.quantize.schemes[w.scheme]))
    calibrate(plain, batches, kind.forward)
    check = {k: torch.cat([b[k] for b in subsample(batches, params.quantize.parity_examples)]) for k in batches[0]}
    with torch.no_grad():
        reference = kind.forward(model, check)

    def sqnr(m) -> float:
        with torch.no_grad():
            return sqnr_db(reference, kind.forward(m, check))

    sizes = input_sizes(plain, lambda: kind.forward(plain, batches[0]))
    out = {"plain_w8a8": sqnr(plain)}
    for m in w.tiles:
        for start in ("equalised", "ones"):
            q = copy.deepcopy(plain)
            winograd_(q, m, group_size=w.group_size, seed=params.quantize.seed, sizes=sizes)
            if start == "ones":
                with torch.no_grad():
                    for layer in q.modules():
                        if isinstance(layer, WinogradLayer):
                            layer.log_g.zero_()
                            layer.log_b.zero_()
            before = sqnr(q)
            tune_scales_(q, steps=w.steps, lr=w.lr, batch=w.batch, seed=params.quantize.seed)
            out[f"f{m}_{start}"] = {"untuned": before, "tuned": sqnr(q)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["executorch", "winograd"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize_studies.json")
    args = parser.parse_args()
    paths = StagePaths(ROOT)
    if not paths.data("sparse", "student").is_dir():
        sys.exit("no data/sparse/<deliverable>/chain: run `dvc repro sparse` (or make pipeline) first")
    results = {}
    if "winograd" not in args.skip:
        results["winograd_start"] = {n: winograd_start(paths, n) for n in ("editor_bold", "student")}
        print("Winograd W8A8, output SQNR dB vs fp32 (simulated): start -> untuned / tuned")
        for n, r in results["winograd_start"].items():
            print(f"  {n}: plain W8A8 {r['plain_w8a8']:.2f}")
            for k, v in r.items():
                if k != "plain_w8a8":
                    print(f"    {k:>14}: {v['untuned']:.2f} / {v['tuned']:.2f}")
    if "executorch" not in args.skip:
        results["executorch_scope"] = r = executorch_scope(paths)
        print("ExecuTorch int8 quantizer scope, student UNet (pt2e graph before lowering):")
        print(f"  fp32: FD {r['fp32']['fd']:.2f}, digit {r['fp32']['prompt_accuracy']['digit']:.4f}")
        print(f"  editor_bold quantize nodes: {r['editor_bold_quantize_nodes']}")
        for k, v in r.items():
            if k not in ("fp32", "editor_bold_quantize_nodes"):
                print(f"  {k:>12}: {v['quantize_nodes']} quantize nodes, |int8 - fp32| max {v['max_abs']:.3f} "
                      f"mean {v['mean_abs']:.4f}, FD {v['quality']['fd']:.2f}, "
                      f"digit {v['quality']['prompt_accuracy']['digit']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
