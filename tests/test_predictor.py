"""The predictor stage on a tiny real population: variants built, exported (fp32 and QDQ int8), lowered to
ExecuTorch and timed on this machine's runtimes; the GNN trained on them against the constant and op-count
baselines; the dataset persisting and growing across two runs; the saved predictor reloading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from condenser.core.config import PredictorParams
from condenser.core.errors import ConfigError
from condenser.core.io import StagePaths
from condenser.targets.graph import load_graph
from condenser.targets.population import EDITOR, UNET, Space, Variant, export_variant, sample_population
from condenser.targets.predictor import Predictor, held_out, load_dataset, save_dataset, train
from tasks import predictor as stage

# Tiny widths and inputs: each variant exports, quantizes and times in well under a second.
TINY = Space(
    unet_share=0.2,
    editor={"channels": (4, 8), "blocks": (1, 2), "block": ("resnet", "inception"), "code_dim": (4, 8),
            "resolution": (8, 16), "prune": (0.0, 0.5), "int8": (False, True)},
    unet={"channels": (8,), "levels": (2,), "layers_per_block": (1,), "attention": (True, False),
          "sample_size": (4, 8), "prune": (0.0,), "int8": (False,)})
# Enough distinct variants for a split's share to be measured.
TINY_WIDE = Space(unet_share=0.5, editor={**TINY.editor, "channels": tuple(range(4, 40))}, unet=TINY.unet)
RAW = {"seed": 0, "variants": 36, "batch": 32, "mobile_batch": 1, "repeats": 20, "threads": 1, "holdout": 0.25,
       "hidden": 32, "layers": 3, "steps": 400, "lr": 0.003}
OTHER_MACHINE = "another CPU"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two stage runs on one project folder; between them one row is marked as measured on another machine."""
    root = tmp_path_factory.mktemp("project")
    paths = StagePaths(root)
    params = PredictorParams(**RAW)
    first = stage.run(params, paths, space=TINY)
    dataset = paths.data("predictor") / stage.DATASET
    rows = load_dataset(dataset)
    rows[0].machine = OTHER_MACHINE
    save_dataset(rows, dataset)
    second = stage.run(params, paths, space=TINY)
    return {"paths": paths, "params": params, "first": first, "first_rows": rows, "second": second,
            "second_rows": load_dataset(dataset)}


def test_population_is_deterministic_and_grows_by_prefix():
    longer = sample_population(3, 30, TINY)
    assert [v.id for v in sample_population(3, 12, TINY)] == [v.id for v in longer[:12]]
    assert len({v.id for v in longer}) == 30
    assert {v.family for v in longer} == {EDITOR, UNET}
    assert Variant(longer[0].family, dict(longer[0].config)).id == longer[0].id


def test_predictor_beats_constant_and_opcount_on_held_out(runs):
    cpu = runs["first"]["held_out"]["cpu"]
    assert cpu["held_out"] >= 5 and cpu["train"] >= 20
    latency = cpu["latency"]
    assert latency["predictor"]["mape"] < latency["constant"]["mape"]
    assert latency["predictor"]["mape"] < latency["opcount"]["mape"]
    # A floor well above what the tiny population reaches, well below the baselines.
    assert latency["predictor"]["mape"] < 35
    assert cpu["peak_memory"]["predictor"]["mape"] < cpu["peak_memory"]["constant"]["mape"]
    assert set(runs["first"]["goal"]) >= {"reached", "max_mape", "predictor_mape", "opcount_mape"}


def test_rows_carry_graph_labels_and_mobile_measurements(runs):
    rows = runs["first_rows"]
    assert len(rows) == RAW["batch"]
    assert {r.family for r in rows} == {EDITOR, UNET} and any(r.quantized for r in rows)
    for r in rows:
        cpu = r.targets["cpu"]
        assert 0 < cpu["latency_ms"]["min"] <= cpu["latency_ms"]["median"] <= cpu["latency_ms"]["p95"]
        assert cpu["peak_memory_bytes"] > 0 and len(r.graph.ops) == len(r.graph.numbers) > 5
        assert all(0 <= i < len(r.graph.ops) and 0 <= j < len(r.graph.ops) for i, j in r.graph.edges)
    mobile = [r for r in rows if "mobile" in r.targets]
    assert len(mobile) == RAW["mobile_batch"] and all(r.family == EDITOR for r in mobile)
    assert all(r.targets["mobile"]["latency_ms"]["median"] > 0 and r.targets["mobile"]["peak_memory_bytes"] > 0
               for r in mobile)
    assert runs["first"]["dataset"]["per_target"] == {"cpu": RAW["batch"], "mobile": RAW["mobile_batch"]}


def test_dataset_round_trips(runs, tmp_path):
    rows = runs["second_rows"]
    save_dataset(rows, tmp_path / "copy.jsonl")
    again = load_dataset(tmp_path / "copy.jsonl")
    assert [r.to_dict() for r in again] == [r.to_dict() for r in rows]
    assert (tmp_path / "copy.jsonl").read_bytes() == (runs["paths"].data("predictor") / stage.DATASET).read_bytes()


def test_second_run_keeps_rows_adds_new_ones_and_sets_other_machines_aside(runs):
    first, second = runs["first_rows"], runs["second_rows"]
    assert [r.to_dict() for r in second[:len(first)]] == [r.to_dict() for r in first]
    assert len(second) == RAW["variants"] and len({r.id for r in second}) == RAW["variants"]
    dataset = runs["second"]["dataset"]
    assert dataset["new"] == RAW["variants"] - RAW["batch"] and dataset["not_yet_measured"] == 0
    assert dataset["other_machines"]["rows"] == 1 and dataset["trained_on"] == RAW["variants"] - 1
    held = runs["second"]["held_out"]["cpu"]
    assert held["train"] + held["held_out"] == RAW["variants"] - 1
    plot = (runs["paths"].root / "plots" / "predictor.tsv").read_text().splitlines()
    assert plot[0].split("\t") == ["id", "family", "target", "measured_ms", "predicted_ms", "opcount_ms"]
    assert len(plot) - 1 == held["held_out"] + runs["second"]["held_out"]["mobile"]["held_out"]
    manifest = json.loads((runs["paths"].data("predictor") / "manifest.json").read_text())
    assert manifest["params"]["variants"] == RAW["variants"]


def test_saved_predictor_reloads_to_identical_predictions(runs, tmp_path):
    folder = runs["paths"].data("predictor") / stage.MODEL
    loaded = Predictor.load(folder)
    variant = next(v for v in sample_population(0, RAW["variants"], TINY) if v.family == UNET)
    export_variant(variant, tmp_path)
    graph = load_graph(next(tmp_path.glob(f"{variant.id}.*.onnx")))
    predicted = loaded.predict(graph)
    assert set(predicted) == {"cpu", "mobile"}
    assert all(math.isfinite(v) and v > 0 for target in predicted.values() for v in target.values())
    # What validate records beside a measured latency: the predictor's and the op-count model's estimates.
    estimates = loaded.estimates(graph, "cpu")
    assert estimates["latency_ms"] == predicted["cpu"]["latency_ms"] and math.isfinite(estimates["opcount_latency_ms"])
    # Training is seeded: the same rows give the same predictor, whose saved files give the same predictions.
    rows = [r for r in runs["second_rows"] if r.machine != OTHER_MACHINE]
    trained, _ = train(rows, runs["params"])
    trained.save(tmp_path / "model")
    assert Predictor.load(tmp_path / "model").predict(graph) == trained.predict(graph) == predicted


def test_held_out_split_is_stable_and_near_its_fraction():
    ids = [v.id for v in sample_population(0, 400, TINY_WIDE)]
    share = sum(held_out(i, 0, 0.2) for i in ids) / len(ids)
    assert 0.14 < share < 0.26
    assert [held_out(i, 0, 0.2) for i in ids[:50]] == [held_out(i, 0, 0.2) for i in ids[:50]]


def test_mobile_batch_over_batch_fails_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="predictor.mobile_batch"):
        stage.run(PredictorParams(**{**RAW, "batch": 2, "mobile_batch": 3}), StagePaths(Path(tmp_path)), space=TINY)
