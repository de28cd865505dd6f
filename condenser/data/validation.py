"""Data validation with Great Expectations, before anyone trains on the data.

`check(table, expectations, ...)` runs a suite on a pandas table (one row per image or pair) and returns
a report whose failures name the expectation and the offending rows by their `file` column.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from condenser.core.config import PairChecks
from condenser.data.images import ImageSet
from condenser.data.pairs import Pairs


@dataclass
class ExpectationReport:
    suite: str
    success: bool
    results: list[dict[str, Any]]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r["success"]]

    def describe(self, max_rows: int = 5) -> str:
        lines = [f"Great Expectations suite '{self.suite}' failed {len(self.failures)} of "
                 f"{len(self.results)} expectations:"]
        for f in self.failures:
            rows = f["offending_rows"]
            shown = ", ".join(str(r) for r in rows[:max_rows]) + (" ..." if len(rows) > max_rows else "")
            lines.append(f"  - {f['expectation']}({f['kwargs']}): {f['unexpected_count']} offending rows"
                         + (f": {shown}" if rows else f"; observed {f['observed_value']}"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "success": self.success, "evaluated": len(self.results),
                "failed": len(self.failures), "results": self.results}


def check(table: pd.DataFrame, expectations: list, suite_name: str, index_column: str = "file"
          ) -> ExpectationReport:
    """Validate `table` against GX expectation objects in an ephemeral (in-memory) context."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas(suite_name).add_dataframe_asset(suite_name)
    batch = asset.add_batch_definition_whole_dataframe(suite_name).get_batch(
        batch_parameters={"dataframe": table})
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    result = batch.validate(suite, result_format={"result_format": "COMPLETE",
                                                  "unexpected_index_column_names": [index_column]})
    results = []
    for r in result.to_json_dict()["results"]:
        cfg, res = r["expectation_config"], r["result"]
        kwargs = {k: v for k, v in cfg["kwargs"].items() if k != "batch_id"}
        offending = [row.get(index_column) for row in (res.get("unexpected_index_list") or [])
                     if isinstance(row, dict)]
        results.append({"expectation": cfg["type"], "kwargs": kwargs, "success": bool(r["success"]),
                        "unexpected_count": res.get("unexpected_count", 0) or 0,
                        "observed_value": res.get("observed_value"),
                        "offending_rows": sorted(set(offending), key=offending.index)})
    return ExpectationReport(suite_name, bool(result.success), results)


def image_table(raw: np.ndarray, data: ImageSet, split_of: np.ndarray) -> pd.DataFrame:
    """One row per image: the statistics the prepared-data suite checks."""
    flat = raw.reshape(len(raw), -1)
    return pd.DataFrame({
        "file": data.files if len(set(data.files)) == len(data.files)
        else [f"{f}#{i}" for i, f in enumerate(data.files)],
        "split": split_of,
        "caption": data.captions,
        "digit": data.digit.numpy(), "style": data.style.numpy(), "color": data.color.numpy(),
        "channels": raw.shape[1], "height": raw.shape[2], "width": raw.shape[3],
        "nan_count": np.isnan(flat).sum(1),
        "min": np.nanmin(np.where(np.isnan(flat), np.inf, flat), axis=1),
        "max": np.nanmax(np.where(np.isnan(flat), -np.inf, flat), axis=1),
    })


def prepared_expectations(resolution: int, n_styles: int, n_colors: int, labelled: dict[str, bool],
                          ) -> list:
    import great_expectations as gx

    E = gx.expectations
    expectations = [
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]),
        E.ExpectColumnValuesToBeInSet(column="height", value_set=[resolution]),
        E.ExpectColumnValuesToBeInSet(column="width", value_set=[resolution]),
        E.ExpectColumnValuesToBeBetween(column="nan_count", min_value=0, max_value=0),
        E.ExpectColumnValuesToBeBetween(column="min", min_value=0, max_value=255),
        E.ExpectColumnValuesToBeBetween(column="max", min_value=0, max_value=255),
        # An all-black image is almost surely a broken file, not a drawing.
        E.ExpectColumnValuesToBeBetween(column="max", min_value=1, max_value=255),
        E.ExpectColumnValuesToNotBeNull(column="caption"),
        E.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=1),
        E.ExpectColumnDistinctValuesToEqualSet(column="split", value_set=["train", "validation", "test"]),
    ]
    vocab = {"digit": list(range(10)), "style": list(range(n_styles)), "color": list(range(n_colors))}
    for head, values in vocab.items():
        if labelled[head]:
            expectations.append(E.ExpectColumnDistinctValuesToContainSet(column=head, value_set=values))
    return expectations


def pair_table(pairs: Pairs, judged: dict[str, torch.Tensor], head: str, label: str = "pair") -> pd.DataFrame:
    """One row per pair, named `<label> <i> (<source file>)`: the statistics the pair suite checks, with
    judge verdicts on the edit."""
    edits = pairs.edits.double()
    flat = edits.flatten(1)
    finite = torch.isfinite(flat)
    diff = (torch.nan_to_num(edits, nan=0.0) - pairs.sources.double()).abs().flatten(1).mean(1)
    target = pairs.target_style if head == "style" else pairs.target_color
    pair_hash = [hashlib.md5(s.numpy().tobytes() + e.numpy().tobytes()).hexdigest()
                 for s, e in zip((pairs.sources * 255).round().to(torch.uint8),
                                 (torch.nan_to_num(pairs.edits).clamp(0, 1) * 255).round().to(torch.uint8))]
    return pd.DataFrame({
        "file": [f"{label} {i} ({f})" for i, f in enumerate(pairs.source_files)],
        "pair_hash": pair_hash,
        "prompt": pairs.prompts,
        "channels": edits.shape[1], "height": edits.shape[2], "width": edits.shape[3],
        "nonfinite_count": (~finite).sum(1).numpy(),
        "min": torch.where(finite, flat, torch.inf).min(1).values.numpy(),
        "max": torch.where(finite, flat, -torch.inf).max(1).values.numpy(),
        "mean_abs_diff": diff.numpy(),
        "digit_preserved": (judged["digit"] == pairs.digit).numpy().astype(float),
        "concept_shown": (judged[head] == target).numpy().astype(float),
    })


def pair_expectations(n: int, resolution: int, checks: PairChecks) -> list:
    import great_expectations as gx

    E = gx.expectations
    return [
        E.ExpectTableRowCountToEqual(value=n),
        E.ExpectColumnValuesToBeInSet(column="channels", value_set=[3]),
        E.ExpectColumnValuesToBeInSet(column="height", value_set=[resolution]),
        E.ExpectColumnValuesToBeInSet(column="width", value_set=[resolution]),
        E.ExpectColumnValuesToBeBetween(column="nonfinite_count", min_value=0, max_value=0),
        E.ExpectColumnValuesToBeBetween(column="min", min_value=0, max_value=1),
        E.ExpectColumnValuesToBeBetween(column="max", min_value=0, max_value=1),
        E.ExpectColumnValuesToBeUnique(column="pair_hash"),
        # An edit that changed nothing (or everything) is no edit: bounds from distill_data.checks.
        E.ExpectColumnValuesToBeBetween(column="mean_abs_diff", min_value=checks.min_mean_abs_diff,
                                        max_value=checks.max_mean_abs_diff),
        E.ExpectColumnMeanToBeBetween(column="digit_preserved", min_value=checks.min_digit_agreement),
        E.ExpectColumnMeanToBeBetween(column="concept_shown", min_value=checks.min_concept_accuracy),
    ]
