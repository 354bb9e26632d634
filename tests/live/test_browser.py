"""The UI as a person uses it: headless Chromium opens progressive/manual, fills the Custom run form, submits,
waits for Completed and looks at the artifacts; then launches a run that resumes from a stored iteration.

Debian's `chromium` (install.sh installs it where apt-get is available and we are root), driven by
Playwright through `executable_path`: no browser download. Screenshots are written to $TIERPRUNE_SCREENSHOTS,
or to the test's temporary folder, and their folder is printed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live.conftest import TINY_FINETUNE

pytestmark = pytest.mark.slow

RUN_SECONDS = 600  # a tiny-model run takes ~30 s alone; room for a busy machine


def chromium_path() -> str | None:
    for candidate in (os.environ.get("TIERPRUNE_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: install.sh installs Debian's chromium with apt-get as root")
        pytest.skip("no chromium here (install.sh installs Debian's chromium with apt-get as root; "
                    "or set TIERPRUNE_CHROMIUM)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers with a small /dev/shm.
        launched = playwright.chromium.launch(executable_path=executable, headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(90_000)  # page loads on a busy 2-core machine
    yield context.new_page()
    context.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TIERPRUNE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


def _field(page, name: str):
    """The form's field for one parameter (its label reads 'name (Optional)')."""
    label = page.locator("span.schema-form-property__label", has_text=re.compile(rf"^{re.escape(name)} \(Optional\)$"))
    return page.locator("div.schema-form-property").filter(has=label)


def _fill(page, values: dict) -> None:
    for name, value in values.items():
        field = _field(page, name)
        # An optional field (str | None, int | None) shows a type switch set to None: pick the value's type first.
        kind = {str: "str", int: "int"}[type(value)]
        switch = field.get_by_role("button", name=kind, exact=True)
        if switch.count():
            switch.click()
        field.locator("textarea, input").first.fill(str(value))


def _show(page, name: str) -> None:
    """Scroll the form so that the field `name` is at the top (the page scrolls inside the app, not the body)."""
    _field(page, name).evaluate("element => element.scrollIntoView({block: 'start'})")


def _open_custom_run(page, url: str) -> None:
    """Deployments → progressive/manual → Run → Custom run."""
    page.goto(f"{url}/deployments", wait_until="networkidle")
    flow = page.locator(".deployment-list__flow-name", has_text=re.compile(r"^\s*progressive\s*$"))
    row = page.locator("tr").filter(has=page.locator('a.deployment-list__name[title="manual"]')).filter(has=flow)
    row.locator("a.deployment-list__name").click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    _field(page, "plan").wait_for()


def _submit_and_wait(page, live_prefect, run: str, screenshot: Path) -> str:
    """Submit the form, open the flow run it created, wait for its final state; the flow run's id.

    The run is found through the API, not through the notice's "View run" button: the notice slides in late
    and leaves again on its own, so on a loaded 2-core machine it could be missed (CI saw it once). Nor by waiting
    for the UI to leave the form: that once took more than 90 s on CI while the run was being created.
    """
    from playwright.sync_api import expect

    form = page.url
    page.get_by_role("button", name="Submit").click()
    deadline = time.monotonic() + 180
    while not (created := [r for r in live_prefect.post("/flow_runs/filter", {})
                           if r["parameters"].get("run") == run]):
        where = "left" if page.url != form else "is still on"
        assert time.monotonic() < deadline, \
            f"submitting the form created no flow run for {run!r} in 180 s (the page {where} the form)"
        time.sleep(1)
    assert len(created) == 1, f"the form created {len(created)} flow runs for {run!r}"  # submitted once
    run_id = created[0]["id"]
    page.goto(f"{live_prefect.url}/runs/flow-run/{run_id}", wait_until="networkidle")
    final = page.get_by_text(re.compile(r"^(Completed|Failed|Crashed|Cancelled)$")).first
    final.wait_for(timeout=RUN_SECONDS * 1000)
    page.screenshot(path=screenshot)
    expect(final).to_have_text("Completed")
    return run_id


def _open_artifact(page, run_id: str, url: str, key: str) -> None:
    page.goto(f"{url}/runs/flow-run/{run_id}", wait_until="networkidle")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text(key, exact=True).click()
    page.wait_for_url(re.compile(r"/artifacts/artifact/"))
    page.wait_for_load_state("networkidle")


def _runs_show(run: Path) -> dict:
    done = subprocess.run([str(Path(sys.executable).parent / "tierprune"), "runs", "show", str(run), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_launch_from_the_form_see_the_artifacts_and_resume(page, live_prefect, tiny_llama_dir, data_dir, screenshots):
    from playwright.sync_api import expect

    url = live_prefect.url
    quick = {"model": str(tiny_llama_dir), "calib": f"c4:{data_dir}/c4-subset", "calib_samples": 4,
             "calib_seqlen": 32, "calib_batch_size": 2, "eval": f"wikitext2:{data_dir}/wikitext-2-raw",
             "eval_seqlen": 32, "eval_max_windows": 2, **TINY_FINETUNE}

    _open_custom_run(page, url)
    expect(_field(page, "store").locator("textarea, input").first).to_have_value(str(live_prefect.store))
    _fill(page, {"run": "from-the-ui", **quick})
    _show(page, "plan")
    page.screenshot(path=screenshots / "01-custom-run-form.png")
    run_id = _submit_and_wait(page, live_prefect, "from-the-ui", screenshots / "02-run-completed.png")
    shown = _runs_show(live_prefect.store / "from-the-ui")
    assert [it["iteration"] for it in shown["iterations"]] == [0, 1, 2, 3]

    # The iteration table: a table artifact with the numbers of the store.
    _open_artifact(page, run_id, url, "iteration-3")
    table = page.locator("table").first
    expect(table).to_contain_text("ppl")
    expect(table).to_contain_text(f"{shown['iterations'][-1]['sparsity']:.4f}".rstrip("0"))
    page.screenshot(path=screenshots / "03-iteration-table.png")

    # The tier heatmaps: one picture per layer, decoded by the browser and on screen.
    _open_artifact(page, run_id, url, "tier-maps-3")
    expect(page.get_by_text("tier fractions (blocks)")).to_be_visible()
    heatmaps = page.locator("img[src^='data:image/png']")
    expect(heatmaps).to_have_count(2)  # the tiny LLaMA's two layers
    for i in range(2):
        expect(heatmaps.nth(i)).to_be_visible()
        assert heatmaps.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
    page.screenshot(path=screenshots / "04-tier-heatmaps.png")

    # Resume from a stored tier map through the form's resume_from: a new run that continues at iteration 2.
    _open_custom_run(page, url)
    _fill(page, {"run": "resumed-in-the-ui",
                 "resume_from": str(live_prefect.store / "from-the-ui" / "iter-001"), **quick})
    _show(page, "store")
    page.screenshot(path=screenshots / "05-resume-form.png")
    _submit_and_wait(page, live_prefect, "resumed-in-the-ui", screenshots / "06-resumed-completed.png")
    resumed = _runs_show(live_prefect.store / "resumed-in-the-ui")
    assert [it["iteration"] for it in resumed["iterations"]] == [2, 3]
    assert [it["tiers"] for it in resumed["iterations"]] == [it["tiers"] for it in shown["iterations"][2:]]
