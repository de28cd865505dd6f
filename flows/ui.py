"""See a flow run in the Prefect UI with a real browser.

The flow publishes the run's lineage and report as artifacts and forwards each stage's `dvc repro` output to
the run's logs (flows/pipeline.py). This opens what a user opens, the flow run's page in the UI that
`prefect server start` serves, in headless Chromium (condenser/report/browser.py), and reads what it shows:
the Artifacts tab's cards, each run-level artifact's own page (the tables its Markdown renders to; whether an
image artifact's picture decoded) and the Logs tab's lines. It saves a screenshot of each view; the README's
come from here:

    python -m flows.ui http://127.0.0.1:4200 FLOW_RUN_ID docs/

What the pages look like is Prefect's (3.8.8's default UI; the selectors below were read off its pages): a
Prefect upgrade that redraws them fails here with the view and what was not found, not silently.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from condenser.report.browser import HEIGHT, WIDTH, chromium, save_full_page
from flows.serve import healthy

# The run-level artifacts flows/pipeline.py publishes (publish_run).
RUN_ARTIFACTS = ("pipeline-lineage", "pipeline-report", "pipeline-lineage-graph")
LOG_TEXTS = ("Running stage 'prepare'",)
TIMEOUT_S = 60.0
# Screenshots, named for the docs folder: the flow run (Artifacts tab open), its logs, each run-level artifact.
SHOT = "prefect-{}.png"
# A long artifact page is cut at this height: the top of a table says what the rest holds.
MAX_SHOT_HEIGHT = 2400

# The default UI's pages scroll inside this element, not the document.
SCROLLER = "div.app-router-view"
SCROLL = f"""const e = document.querySelector("{SCROLLER}"); if (e) e.scrollTop = arguments[0] ? e.scrollHeight : 0"""
TAB = "li.p-tab#{}"
RUN_HEADING = ".page-heading-flow-run"
CRUMB = ".p-bread-crumbs__crumb"
STATE_BADGE = ".page-heading-flow-run__meta .state-badge"
ARTIFACT_CARD = "a[href*='/artifacts/artifact/']"
CARD_TITLE, CARD_TYPE = ".artifact-card__title", ".artifact-card__subheader"
CARD_DESCRIPTION = ".artifact-card__description"
ARTIFACT_VIEW = ".artifact-data-view"
LOG_ROW, LOG_LEVEL, LOG_MESSAGE = ".log-row", ".log-row__leading", ".log-row__content"
LOG_TRAILING = ".log-row__trailing > div"
TASK_LOGGER = "prefect.task_runs"


class UiError(RuntimeError):
    """The UI did not show what was expected; the message names the page, what is missing and what it showed."""


def inspect_flow_run(ui_url: str, flow_run_id: str, out_dir: Path, logs: Sequence[str] = LOG_TEXTS,
                     artifacts: Sequence[str] = RUN_ARTIFACTS, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Open flow run `flow_run_id` in the UI at `ui_url` and return what a user sees there.

    `artifacts`: keys that must be on the run's Artifacts tab; each one's page is opened and read. `logs`: texts
    that must each be in some line of the Logs tab. Raises UiError when one is not shown within `timeout_s`
    (a screenshot of what was shown is saved beside the others), BrowserMissing without Chromium.

    Returns {"url", "name", "state", "artifacts": {key: {"type", "description", "url"}} (every card on the tab),
    "pages": {key: {"url", "text", "tables": [[cells of each row]], "images": [{"scheme", "rendered", "width",
    "height"}]}}, "logs": {text: {"message", "task_run", "level"}}, "screenshots": {view: path}}.
    """
    from selenium.webdriver.common.by import By

    ui_url = ui_url.rstrip("/").removesuffix("/api")
    if not healthy(f"{ui_url}/api"):
        raise UiError(f"no Prefect server answers at {ui_url} ({ui_url}/api/health); start one (`prefect server "
                      "start`) or pass the URL of the one the flow ran against")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_url = f"{ui_url}/runs/flow-run/{flow_run_id}"
    found: dict[str, Any] = {"url": run_url, "pages": {}, "screenshots": {}}

    with chromium(WIDTH, HEIGHT) as driver:
        def wait(what: str, condition: Callable[[], Any]) -> Any:
            return _wait(driver, what, condition, timeout_s, out_dir)

        def shot(view: str, full: bool = True, ready: Callable[[], Any] | None = None) -> None:
            path = out_dir / SHOT.format(view)
            if full:
                save_full_page(driver, path, SCROLLER, MAX_SHOT_HEIGHT, ready)
                driver.set_window_size(WIDTH, HEIGHT)
            else:
                driver.save_screenshot(str(path))
            found["screenshots"][view] = path

        driver.get(run_url)
        # An unknown id sends the single-page app to its "Page not found" view.
        wait(f"the page of flow run {flow_run_id}", lambda: driver.find_elements(By.CSS_SELECTOR, RUN_HEADING)
             or _not_found(driver, flow_run_id, ui_url))
        found["name"] = wait("the run's name", lambda: _crumb(driver))
        found["state"] = wait("the run's state", lambda: _text(driver, STATE_BADGE))

        # Logs: the tab a run's page opens on; clicked anyway, as a user coming back to it would.
        wait("the Logs tab", lambda: _click(driver, TAB.format("logs")))
        found["logs"] = _find_logs(driver, list(logs), timeout_s, out_dir)
        if logs:
            driver.execute_script(TOP_OF_LOGS)
            wait(f"the log line holding {logs[0]!r}", lambda: driver.execute_script(SHOW_LOG, logs[0]))
        shot("logs", full=False)

        wait("the Artifacts tab", lambda: _click(driver, TAB.format("artifacts")))
        try:
            wait(f"the artifact cards {', '.join(artifacts)}", lambda: _cards(driver, artifacts))
        except UiError as err:
            raise UiError(f"{err}; the cards shown: {', '.join(_cards(driver, ())) or 'none'}") from None
        # The task runs' cards (each stage's lineage and metrics) render once scrolled to.
        found["artifacts"] = _until_stable(driver, lambda: _cards(driver, ()))
        driver.execute_script(SCROLL, False)
        # Back at the top they are dropped again, until the taller window brings them into view.
        shot("flow-run", ready=lambda: wait("the task runs' artifact cards in the taller window",
                                            lambda: len(_cards(driver, ())) >= len(found["artifacts"])))

        for key in artifacts:
            url = found["artifacts"][key]["url"]
            driver.get(url)
            page = wait(f"the content of artifact {key}", lambda: _artifact_view(driver))
            found["pages"][key] = {"url": url, **page}
            shot(key.removeprefix("pipeline-"))
    return found


def _wait(driver, what: str, condition: Callable[[], Any], timeout_s: float, out_dir: Path) -> Any:
    """The first truthy value of `condition()`; after `timeout_s`, UiError with the page's URL and text."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
            if value:
                return value
        # The app re-renders while it loads: an element read a moment ago may be gone.
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        if time.monotonic() > deadline:
            raise _missing(driver, what, timeout_s, out_dir)
        time.sleep(0.25)


def _missing(driver, what: str, timeout_s: float, out_dir: Path) -> UiError:
    from selenium.webdriver.common.by import By

    path = out_dir / SHOT.format("missing")
    driver.save_screenshot(str(path))
    text = driver.find_element(By.TAG_NAME, "body").text.strip().replace("\n", " | ")
    return UiError(f"{driver.current_url}: {what} did not show within {timeout_s:.0f} s; the page shows: "
                   f"{text[-1500:]!r} (screenshot: {path})")


def _until_stable(driver, read: Callable[[], Any], settle_s: float = 1.0, timeout_s: float = 10.0) -> Any:
    """What `read()` returns once it stops changing for `settle_s` while the page is scrolled to its end: a
    list of cards is a virtual scroller that renders a chunk when it comes into view."""
    value, since, deadline = read(), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < settle_s and time.monotonic() < deadline:
        driver.execute_script(SCROLL, True)
        time.sleep(0.25)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def _not_found(driver, flow_run_id: str, ui_url: str) -> None:
    from selenium.webdriver.common.by import By

    if "Page not found" in driver.find_element(By.TAG_NAME, "body").text:
        raise UiError(f"{ui_url}: the UI has no flow run {flow_run_id} ('Page not found'); check the id and that "
                      "this is the server the flow ran against (PREFECT_API_URL)")


def _text(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, selector)).strip()


def _crumb(driver) -> str:
    # The heading reads "Runs / <run name>".
    from selenium.webdriver.common.by import By

    crumbs = [c.text.strip() for c in driver.find_elements(By.CSS_SELECTOR, f"{RUN_HEADING} {CRUMB}")]
    return crumbs[-1] if len(crumbs) > 1 and crumbs[-1] else ""


def _click(driver, selector: str) -> bool:
    from selenium.webdriver.common.by import By

    tabs = driver.find_elements(By.CSS_SELECTOR, selector)
    if not tabs:
        return False
    # The click event the app's handler gets from the mouse: WebDriver's native click took 2 to 4 s per tab here.
    driver.execute_script("arguments[0].click()", tabs[0])
    return True


# Each view is read in one script: reading 40 log rows element by element took 39 s on this busy machine.
READ_CARDS = f"""return Array.from(document.querySelectorAll("{ARTIFACT_CARD}")).map(c => {{
  const text = s => (c.querySelector(s) || {{innerText: ""}}).innerText.trim();
  return [text("{CARD_TITLE}"), text("{CARD_TYPE}"), text("{CARD_DESCRIPTION}"), c.href]; }})"""
READ_VIEW = f"""const view = document.querySelector("{ARTIFACT_VIEW}");
if (!view) return null;
return {{text: view.innerText,
  tables: Array.from(view.querySelectorAll("table")).map(t => Array.from(t.querySelectorAll("tr")).map(
    r => Array.from(r.querySelectorAll("th, td")).map(c => c.innerText.trim()))),
  images: Array.from(view.querySelectorAll("img")).map(
    i => [i.complete, i.naturalWidth, i.naturalHeight, i.getAttribute("src") || ""])}}"""
READ_LOGS = f"""const rows = Array.from(document.querySelectorAll("{LOG_ROW}"));
// The list renders rows as they come into view: bring its last one in, for the next read to see more.
if (rows.length) rows[rows.length - 1].scrollIntoView({{block: "end"}});
return rows.map(r => [(r.querySelector("{LOG_MESSAGE}") || {{innerText: ""}}).innerText.trim(),
  Array.from(r.querySelectorAll("{LOG_TRAILING}")).map(d => d.innerText.trim()),
  (r.querySelector("{LOG_LEVEL}") || {{innerText: ""}}).innerText.trim()])"""

# The logs' screenshot: the tab bar on top, and the first line asked for in view (on top if it is further down).
# Rows far from the view are not rendered and each row fetches its task run's name when it is: scrolled a chunk
# at a time until the line is rendered, then ready once every task run's line in view shows its name.
TOP_OF_LOGS = f"""document.querySelector("{TAB.format('logs')}").scrollIntoView({{block: "start"}})"""
SHOW_LOG = f"""const rows = Array.from(document.querySelectorAll("{LOG_ROW}"));
const row = rows.find(r => (r.querySelector("{LOG_MESSAGE}") || {{innerText: ""}}).innerText.includes(arguments[0]));
if (!row) {{
  if (rows.length) rows[rows.length - 1].scrollIntoView({{block: "end"}});
  return false;
}}
if (row.getBoundingClientRect().bottom > window.innerHeight) row.scrollIntoView({{block: "start"}});
return rows.every(r => r.getBoundingClientRect().top > window.innerHeight || r.getBoundingClientRect().bottom < 0
  || !r.innerText.includes("{TASK_LOGGER}") || r.querySelectorAll("{LOG_TRAILING}").length > 2);"""


def _cards(driver, keys: Sequence[str]) -> dict[str, dict] | None:
    """Every artifact card on the tab, once all of `keys` are among them."""
    cards = {title: {"type": kind.lower(), "description": description, "url": href}
             for title, kind, description, href in driver.execute_script(READ_CARDS) if title}
    return cards if set(keys) <= set(cards) else None


def _artifact_view(driver) -> dict | None:
    """An artifact page's content: its text, the rows of each table, and each image with whether it decoded."""
    view = driver.execute_script(READ_VIEW)
    if not view or not view["text"].strip() and not view["images"]:
        return None
    if not all(complete for complete, *_ in view["images"]):
        return None
    # A picture the browser could not decode is complete with no natural size.
    view["images"] = [{"scheme": src.split(":", 1)[0], "rendered": width > 0, "width": width, "height": height}
                      for _, width, height, src in view["images"]]
    return view


def _find_logs(driver, texts: list[str], timeout_s: float, out_dir: Path) -> dict[str, dict]:
    """For each of `texts`, the first log line holding it. The list is a virtual scroller that renders rows as
    they come into view (the first 40 or so at first): it is scrolled to its end until every text is found."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for message, trailing, level in driver.execute_script(READ_LOGS):
            # Trailing: the time, the task run's name, the logger. A row fetches the name once it is rendered: a
            # task run's line is read when it has come; the flow's own lines have none.
            if trailing[-1:] == [TASK_LOGGER] and len(trailing) < 3:
                continue
            for text in texts:
                if text not in found and text in message:
                    found[text] = {"message": message, "task_run": trailing[1] if len(trailing) > 2 else "",
                                   "level": level.upper()}
        if len(found) == len(texts):
            return found
        if time.monotonic() > deadline:
            missing = [t for t in texts if t not in found]
            raise _missing(driver, f"log lines holding {missing!r}", timeout_s, out_dir)
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from condenser.report.browser import BrowserMissing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ui_url", help="the Prefect UI, e.g. http://127.0.0.1:4200")
    parser.add_argument("flow_run_id", help="a flow run of condenser-pipeline on that server")
    parser.add_argument("out_dir", type=Path, help="where the screenshots go (prefect-*.png)")
    parser.add_argument("--log", action="append", help=f"text a log line must hold (default: {LOG_TEXTS[0]!r})")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for each view")
    args = parser.parse_args(argv)
    try:
        found = inspect_flow_run(args.ui_url, args.flow_run_id, args.out_dir, logs=args.log or LOG_TEXTS,
                                 timeout_s=args.timeout)
    except (UiError, BrowserMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {"run": f"{found['name']} ({found['state']})", "url": found["url"],
               "artifacts": {k: a["type"] for k, a in found["artifacts"].items()},
               "images": {k: p["images"] for k, p in found["pages"].items() if p["images"]},
               "logs": {t: f"{line['task_run'] or 'flow'}: {line['message']}" for t, line in found["logs"].items()},
               "screenshots": {v: str(p) for v, p in found["screenshots"].items()}}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
