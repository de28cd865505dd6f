"""What a user sees of a pipeline run in the Prefect UI, checked in a real browser.

A real `prefect server start` (UI included) on a free port, the flow run on a tiny scratch project against it,
then headless Chromium (flows/ui.py) on the run's page: the run's lineage, report and lineage-graph artifacts
with the md5s dvc.lock holds, each stage's lineage and metrics tables, the graph's picture decoded, and each
stage's `dvc repro` lines in the Logs tab; an unknown flow run id is named as such.
"""

from __future__ import annotations

import os
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import tiny_params
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from bench.pipeline import scratch_project
from condenser.core.environment import git_revision
from condenser.lineage import read_lock
from condenser.report.browser import WIDTH, BrowserMissing, require_chromium
from flows.pipeline import condenser_pipeline
from flows.serve import OFFLINE_ENV, free_port, start_server
from flows.ui import RUN_ARTIFACTS, UiError, inspect_flow_run

LOGS = ("Running stage 'prepare'", "> python -m tasks.prepare", "> python -m tasks.evaluator", "evaluator done:")



def test_flow_run_lineage_report_and_logs_show_in_the_ui(tmp_path):
    try:
        require_chromium()
    except BrowserMissing as err:
        pytest.skip(str(err))
    params = tiny_params()
    params["evaluator"]["epochs"] = 1
    root = scratch_project(tmp_path / "project", params)
    env = {**os.environ, **OFFLINE_ENV, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    server, api_url = start_server("127.0.0.1", free_port(), env, root)
    ui_url = api_url.removesuffix("/api")
    try:
        with ThreadPoolExecutor(1) as pool:
            # A run the server never saw is named as such, not waited on for ever; checked while the flow runs,
            # since it needs only the server.
            unknown = pool.submit(inspect_flow_run, ui_url, str(uuid.uuid4()), tmp_path / "unknown", timeout_s=30)
            with temporary_settings({PREFECT_API_URL: api_url, PREFECT_LOCAL_STORAGE_PATH: tmp_path / "storage"}):
                state = condenser_pipeline(root=str(root), targets=["evaluator"], return_state=True)
            with pytest.raises(UiError, match="no flow run"):
                unknown.result()
        assert state.is_completed(), state.message
        found = inspect_flow_run(ui_url, str(state.state_details.flow_run_id), tmp_path / "shots", logs=LOGS)
    finally:
        server.stop()

    assert found["state"] == "Completed" and found["name"]
    assert {k: found["artifacts"][k]["type"] for k in RUN_ARTIFACTS} == {
        "pipeline-lineage": "markdown", "pipeline-report": "markdown", "pipeline-lineage-graph": "image"}
    # Below them, each stage's own lineage and metrics tables.
    for stage in ("prepare", "evaluator"):
        for kind in ("lineage", "metrics"):
            assert found["artifacts"][f"{stage}-{kind}"]["type"] == "table", (stage, kind, found["artifacts"])

    # The lineage page: the commit the run was for, and every output in dvc.lock with its md5, row by row.
    records = read_lock(root)
    assert set(records) == {"prepare", "evaluator"}
    lineage = [row for table in found["pages"]["pipeline-lineage"]["tables"] for row in table]
    assert ["revision", git_revision(root)] in lineage
    for stage, record in records.items():
        for out, md5 in record.outs.items():
            assert any(row[:3] == [stage, out, md5] for row in lineage), (stage, out, md5, lineage)
    assert "flowchart LR" in found["pages"]["pipeline-lineage"]["text"]

    # The report page: one row per stage, executed, with its data output's md5 (the first 12 digits).
    report = {row[0]: row for table in found["pages"]["pipeline-report"]["tables"] for row in table}
    for stage, record in records.items():
        assert report[stage][1] == "executed"
        assert record.outs[f"data/{stage}"][:12] in report[stage][2]

    # The lineage graph, a data: URL PNG, is drawn by the browser (decoded to a picture with a size).
    [image] = found["pages"]["pipeline-lineage-graph"]["images"]
    assert image["scheme"] == "data" and image["rendered"] and image["width"] > 100

    # Each stage's own lines, under its task run.
    for text in LOGS:
        stage = "evaluator" if "evaluator" in text else "prepare"
        assert found["logs"][text]["task_run"].startswith(f"{stage}-"), found["logs"][text]
        assert found["logs"][text]["level"] == "INFO"

    for view, path in found["screenshots"].items():
        head = path.read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n", view
        assert struct.unpack(">II", head[16:24])[0] == WIDTH, view
