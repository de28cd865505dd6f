"""validate@<target> on tiny real deliverables: measured targets run the deployed files (ONNX Runtime,
ExecuTorch), virtual ones estimate from the graph (op count, roofline, the dataflow accelerator), cuda is
skipped with its reason here, and a broken budget fails a `gate: fail` target naming the budget and the
margin while `gate: warn` records it and passes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from condenser.core.config import parse_params
from condenser.core.errors import StageError
from condenser.core.io import StagePaths
from tasks import validate
from tests.conftest import LOOSE_BUDGETS, validate_raw

LOOSE = LOOSE_BUDGETS


def _run(root: Path, targets: dict, name: str) -> dict:
    return validate.run(parse_params(validate_raw(targets)), StagePaths(root), name)


@pytest.fixture(scope="module")
def root(quantized: dict, quantized_root: Path) -> Path:
    return quantized_root


@pytest.fixture(scope="module")
def cpu(root: Path) -> dict:
    targets = {"cpu": {"kind": "onnxruntime", "repeats": 20, "budgets": {
        "gan_editor": {**LOOSE, "min_quality": {"psnr": 0.0}},
        "sd_unet": {**LOOSE, "min_quality": {"fd": 1e9}, "max_drop": {"prompt_accuracy.digit": 1.0}}}}}
    return _run(root, targets, "cpu")


def test_cpu_runs_every_level_that_exists(cpu, root):
    assert cpu["status"] == "pass" and cpu["measured"] and cpu["summary"]["failed"] == 0
    editor, student = cpu["deliverables"]["editor_bold"], cpu["deliverables"]["student"]
    # The editor's chain is filter-pruned: dense, sparse and int8; the student's is dense: no sparse level.
    assert list(editor["levels"]) == ["dense", "sparse", "int8"]
    assert list(student["levels"]) == ["dense", "int8"]
    for d in (editor, student):
        for level, row in d["levels"].items():
            assert row["status"] == "pass" and row["latency_ms"]["median"] > 0
            assert row["peak_memory_bytes"] > 0 and row["size_bytes"] > 0 and row["operators"]
            assert row["quality"], level
            # Float files compute what PyTorch does; int8 is within quantization error of it.
            assert row["parity"]["max_abs"] < (1e-3 if level != "int8" else 0.5)
        # The contract: dense against the most compressed level, the int8 file far smaller.
        assert d["ratio"]["size_bytes"] < 0.5
        assert d["reference"]["latency_ms"]["cpu"]["median"] > 0
    # The dense editor was exported here (the chain is not dense), and kept in the output.
    assert (root / editor["levels"]["dense"]["file"]).is_file()
    assert editor["levels"]["sparse"]["macs"] < editor["levels"]["dense"]["macs"]
    # Against the teacher: the student's digit accuracy, from step_distill's 50-step teacher.
    assert "prompt_accuracy.digit" in student["levels"]["int8"]["quality_drop"]
    out = root / "data" / "validate" / "cpu"
    assert "| editor_bold | int8 |" in (out / "table.md").read_text()
    for name in ("student", "editor_bold"):
        assert (out / "samples" / f"{name}.png").stat().st_size > 500


def test_a_broken_budget_fails_the_gate_naming_budget_and_margin(root, cpu):
    tight = {"cpu": {"kind": "onnxruntime", "repeats": 5, "gate": "fail",
                     "budgets": {"editor_bold": {"latency_p50_ms": 1e-6}}}}
    before = (root / "data" / "validate" / "cpu" / "manifest.json").read_text()
    with pytest.raises(StageError) as err:
        _run(root, tight, "cpu")
    message = str(err.value)
    assert "latency p50" in message and "over the 1e-06 ms budget by" in message and "editor_bold" in message
    # The failed run wrote nothing: the previous output is as it was.
    assert (root / "data" / "validate" / "cpu" / "manifest.json").read_text() == before

    warn = {"cpu": {**tight["cpu"], "gate": "warn"}}
    m = _run(root, warn, "cpu")
    assert m["status"] == "warn" and m["summary"]["failed"] == 3
    failure = m["deliverables"]["editor_bold"]["levels"]["int8"]["failures"][0]
    assert failure["budget"] == "latency_p50_ms" and failure["margin"] > 0 and failure["limit"] == 1e-6
    # Budgets by deliverable name apply to that deliverable only.
    assert all(r["status"] == "pass" for r in m["deliverables"]["student"]["levels"].values())


def test_mcu_names_operators_outside_its_list_and_estimates(root):
    targets = {"mcu": {"kind": "virtual", "estimator": "opcount", "opcount": {"ms_per_mop": 2.5, "overhead_ms": 2},
                       "levels": ["int8"], "int8_only": True, "gate": "warn",
                       "operators": ["Conv", "Add", "Mul", "Relu", "Reshape", "Concat"],
                       "budgets": {"gan_editor": {"peak_memory_bytes": 320_000}}}}
    m = _run(root, targets, "mcu")
    row = m["deliverables"]["editor_bold"]["levels"]["int8"]
    assert not m["measured"] and m["estimator"] == "opcount" and row["status"] == "fail"
    ops = [f for f in row["failures"] if f["budget"] == "operators"]
    # The editor's GroupNorm exports as InstanceNormalization: not a CMSIS-NN kernel. Named by node.
    norm = next(f for f in ops if f["value"] == "InstanceNormalization")
    assert norm["node"] and norm["node"] in norm["message"]
    # Latency linear in the op count; the memory planner's figure sits beside the liveness pass.
    assert row["latency_ms"]["median"] == pytest.approx(2 + 2.5 * row["estimate"]["ops"] / 1e6)
    assert row["peak_memory_planner_bytes"] > 0 and row["peak_memory_bytes"] > 0


def test_npu_roofline_and_dataflow_estimates(root):
    targets = {"npu": {"kind": "virtual", "estimator": "roofline", "gate": "warn",
                       "roofline": {"int8_tops": 4, "float_tops": 1, "bandwidth_gbps": 10, "op_overhead_us": 5}},
               "dataflow": {"kind": "virtual", "estimator": "dataflow", "gate": "warn",
                            "dataflow": {"units": 256, "clock_mhz": 200}}}
    npu = _run(root, targets, "npu")["deliverables"]["editor_bold"]["levels"]
    # int8 operators run at the int8 peak: the int8 graph is estimated faster than its float one.
    assert 0 < npu["int8"]["latency_ms"]["median"] < npu["sparse"]["latency_ms"]["median"]
    flow = _run(root, targets, "dataflow")["deliverables"]["editor_bold"]["levels"]
    # Filter pruning removes MACs, so the pipeline's slowest stage gets faster; int8 keeps the MACs.
    assert flow["sparse"]["latency_ms"]["median"] < flow["dense"]["latency_ms"]["median"]
    assert flow["int8"]["latency_ms"]["median"] == pytest.approx(flow["sparse"]["latency_ms"]["median"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: validate@cuda measures it")
def test_cuda_is_skipped_with_its_reason_here(root):
    m = _run(root, {"cuda": {"kind": "cuda", "levels": ["dense", "sparse"]}}, "cuda")
    assert m["status"] == "skipped" and "no CUDA device" in m["skipped"]
    rows = [r for d in m["deliverables"].values() for r in d["levels"].values()]
    assert rows and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in rows)
    assert "skipped" in (root / "data" / "validate" / "cuda" / "table.md").read_text()


def test_mobile_runs_the_pte_files(root):
    targets = {"mobile": {"kind": "executorch", "repeats": 10, "budgets": {"gan_editor": LOOSE}}}
    m = _run(root, targets, "mobile")
    editor = m["deliverables"]["editor_bold"]["levels"]
    assert set(editor) == {"dense", "sparse", "int8"} and all(r["status"] == "pass" for r in editor.values())
    assert editor["int8"]["file"].endswith("model.int8.pte") and editor["int8"]["peak_memory_planner_bytes"] > 0
    # The student was not lowered to ExecuTorch in the fixture: its rows say so instead of passing.
    student = m["deliverables"]["student"]["levels"]
    assert all(r["status"] == "skipped" and "executorch" in r["reason"] for r in student.values())
    assert json.loads((root / "metrics" / "validate" / "mobile.json").read_text())["target"] == "mobile"


def test_a_quality_budget_on_an_unknown_metric_is_refused_before_any_work(root):
    targets = {"cpu": {"kind": "onnxruntime", "budgets": {"gan_editor": {"min_quality": {"fid": 10}}}}}
    with pytest.raises(Exception, match=r"targets\.cpu\.budgets\.gan_editor\.min_quality\.fid"):
        _run(root, targets, "cpu")
