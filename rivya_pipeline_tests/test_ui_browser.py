"""The Dagster UI, checked the way a person uses it: Debian's Chromium driven by Playwright against
`rivya-pipeline dev` (embedded emulator + local S3 + webserver + daemon) on free ports and a temp instance.

Covers the asset graph and its edges, one partition materialized from the UI (partition added in the
launch dialog), the run, the stored video's partition page and checks, and the sensor and schedule
under Automation. Screenshots, the stack's log and a Playwright trace of each failed test go to test-output/ui/
(open one with `playwright show-trace`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from rivya_pipeline.settings import REPO_ROOT
from rivya_pipeline_tests.helpers import free_ports

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (.ci/ensure-chromium); Playwright downloads nothing
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # The machine's network is closed: nothing in the browser may try to reach out.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OUTPUT = REPO_ROOT / "test-output" / "ui"
GROUP = "video_generation"
ASSETS = ["video_brief", "reference_uploads", "generation_task", "stored_video"]
EDGES = {
    ("video_brief", "reference_uploads"),
    ("video_brief", "generation_task"),
    ("reference_uploads", "generation_task"),
    ("generation_task", "stored_video"),
}
CHECKS = ["decodable_mp4", "duration_matches", "aspect_ratio_matches", "sha256_matches"]  # blocking
QC_CHECKS = ["audio_matches", "not_black", "not_frozen"]  # not blocking
PICTURES = {"poster": "poster.jpg", "contact_sheet": "sheet.jpg"}  # metadata label -> the full-size object's suffix
BRIEF_FILE = "one-reference.yaml"  # one reference image, so every asset of the run does real work
NEVER = "0 0 1 1 *"  # brief_discovery must not launch runs of its own while the test drives the UI
STARTUP_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 60
UI_TIMEOUT_MS = 30_000
RUN_TIMEOUT_MS = 150_000

ASSET_NODES_QUERY = "{ assetNodes { assetKey { path } groupName description dependencyKeys { path } } }"


@dataclass(frozen=True)
class DevStack:
    url: str
    s3_url: str
    requests: Path

    def graphql(self, query: str) -> dict[str, Any]:
        answer = httpx.post(f"{self.url}/graphql", json={"query": query}, timeout=30).raise_for_status().json()
        if "errors" in answer:
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def asset_nodes(self) -> dict[str, dict[str, Any]]:
        return {node["assetKey"]["path"][-1]: node for node in self.graphql(ASSET_NODES_QUERY)["assetNodes"]}


def wait_until_loaded(stack: DevStack, process: subprocess.Popen, log: Path) -> None:
    """The webserver answers and the code location is loaded (all four assets known)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`rivya-pipeline dev` exited with {process.returncode}; see {log}")
        try:
            if set(stack.asset_nodes()) == set(ASSETS):
                return
        except (httpx.HTTPError, AssertionError, TypeError):
            pass  # not serving yet, or the code location is still loading
        time.sleep(0.5)
    pytest.fail(f"the Dagster UI did not load the definitions within {STARTUP_TIMEOUT_SECONDS} s; see {log}")


def skip_community_dialog(stack: DevStack) -> None:
    """A fresh instance greets its first visitor with a "Join the Dagster community" dialog, a second after any page
    loads and over whatever is open (a launch dialog included, whose backdrop then blocks its Skip button). The UI's
    own Skip records it as seen on the instance; do the same before the first page is opened."""
    stack.graphql("mutation { setNuxSeen }")
    assert stack.graphql("{ shouldShowNux }") == {"shouldShowNux": False}


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C to the session started for the stack (saves its bucket), then kill whatever of it is left."""
    try:
        os.killpg(process.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    root = tmp_path_factory.mktemp("ui")
    requests = shutil.copytree(REPO_ROOT / "requests", root / "requests")
    ui, api, media, s3 = free_ports(4)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIVYA_", "AWS_"))}
    env |= {
        "DAGSTER_HOME": str(root / "dagster_home"),
        "RIVYA_REQUESTS_PATH": str(requests),
        "RIVYA_DISCOVERY_CRON": NEVER,
    }
    command = [
        str(Path(sys.executable).with_name("rivya-pipeline")),
        "dev",
        "--port",
        str(ui),
        "--api-port",
        str(api),
        "--media-port",
        str(media),
        "--s3-port",
        str(s3),
        "--data-dir",
        str(root / "data"),
    ]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    log = OUTPUT / "dev.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    stack = DevStack(url=f"http://127.0.0.1:{ui}", s3_url=f"http://127.0.0.1:{s3}", requests=requests)
    try:
        wait_until_loaded(stack, process, log)
        skip_community_dialog(stack)
        yield stack
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run .ci/ensure-chromium (make test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, dev_stack: DevStack, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(base_url=dev_stack.url, viewport={"width": 1440, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    context.tracing.start(screenshots=True, snapshots=True)
    failed_before = request.session.testsfailed
    page = context.new_page()
    yield page
    screenshot(page, f"last-{request.node.name}")  # what the page showed at the end, pass or fail
    failed = request.session.testsfailed > failed_before  # the test's own report is counted before this teardown
    context.tracing.stop(path=OUTPUT / f"trace-{request.node.name}.zip" if failed else None)
    context.close()


def add_partition_in_launch_dialog(page: Page, launch_dialog: Locator, partition: str) -> None:
    """Add the partition with the launch dialog's own "Add a partition", and return once the dialog is settled.

    Save sets off a reload of the selected assets in the background, and when that reload's last query
    (LaunchAssetLoaderResourceQuery) returns, the UI sets the launch dialog open again. A dialog closed before then
    (by Cancel, or by a launch) opens again by itself, with nothing selected, and its backdrop takes the next click on
    the page. So wait for that reply: from then on the dialog only closes when the test closes it.
    """
    launch_dialog.get_by_text("Add a partition", exact=True).click()
    add_partition = page.get_by_role("dialog").filter(has_text="Add a partition for")
    add_partition.get_by_role("textbox").fill(partition)  # its "Partition name" is not tied to the input as a label
    with page.expect_response(lambda response: response.url.endswith("op=LaunchAssetLoaderResourceQuery")) as reload:
        add_partition.get_by_role("button", name="Save").click()
    assert reload.value.finished() is None, "the launch dialog's reload after Save failed"
    expect(add_partition).to_be_hidden()


def screenshot(page: Page, name: str) -> None:
    page.screenshot(path=OUTPUT / f"{name}.png", full_page=True)


def metadata_row(page: Page, label: str) -> Locator:
    """One row of a metadata table, found by its label."""
    return page.locator("tr", has=page.get_by_text(label, exact=True)).first


def lineage_links(page: Page, heading: str) -> Locator:
    """The asset links under a heading of an asset's Lineage section ("Upstream assets", "Downstream assets")."""
    return page.get_by_text(heading, exact=True).locator("xpath=..").locator("a[href^='/assets/']")


def test_asset_graph_shows_the_four_assets_their_edges_and_descriptions(page: Page, dev_stack: DevStack) -> None:
    nodes = dev_stack.asset_nodes()
    assert {(dep["path"][-1], name) for name, node in nodes.items() for dep in node["dependencyKeys"]} == EDGES
    assert {node["groupName"] for node in nodes.values()} == {GROUP}

    page.goto(f"/locations/rivya_pipeline/asset-groups/{GROUP}")
    expect(page.get_by_text("Asset Group in")).to_be_visible()
    for name in ASSETS:
        expect(page.get_by_text(name, exact=True)).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Loading"))).to_have_count(0)  # the nodes' partition counts are in
    screenshot(page, "01-asset-graph")

    for name in ASSETS:
        page.goto(f"/assets/{name}")
        description = nodes[name]["description"]
        assert description, f"{name} has no description"
        expect(page.get_by_text(description.split("(")[0].strip()).first).to_be_visible()
        expect(page.get_by_role("link", name=GROUP)).to_be_visible()
        upstream, downstream = {a for a, b in EDGES if b == name}, {b for a, b in EDGES if a == name}
        # The non-empty list first: once it is shown, the section has loaded and an empty one is really empty.
        sections = sorted([("Upstream assets", upstream), ("Downstream assets", downstream)], key=lambda s: -len(s[1]))
        for heading, expected in sections:
            links = lineage_links(page, heading)
            expect(links).to_have_count(len(expected))
            shown = {(link.get_attribute("href") or "").removeprefix("/assets/") for link in links.all()}
            assert shown == expected, f"{heading} of {name} in the UI"
        if name == "generation_task":
            screenshot(page, "02-asset-generation_task")


def test_materialize_one_partition_from_the_ui(page: Page, dev_stack: DevStack) -> None:
    brief = yaml.safe_load((dev_stack.requests / BRIEF_FILE).read_text())
    partition = brief["id"]

    # Catalog: select the four assets, Materialize, add the brief's partition in the dialog, launch one run.
    page.goto("/assets")
    for name in ASSETS:
        checkbox = page.get_by_test_id(f"checkbox-{name}")
        page.locator("label", has=checkbox).click()  # the input itself is drawn over by its label
        expect(checkbox).to_be_checked()
    materialize = page.get_by_role("button", name="Materialize selected")
    launch_dialog = page.get_by_role("dialog").filter(has_text=f"Launch runs to materialize {len(ASSETS)} assets")
    loading = launch_dialog.get_by_text(re.compile(r"^Loading"))
    materialize.click()
    expect(loading).to_have_count(0)
    add_partition_in_launch_dialog(page, launch_dialog, partition)
    # Save selects the new partition only when the partitions' status did not reload while it was saving, so tick it
    # in the list, as a person would: check() leaves an already ticked box alone.
    launch_dialog.get_by_role("img", name="expand_more").click()  # opens the partition list
    listed = launch_dialog.get_by_role("menuitem", name=partition)
    listed.locator("label", has=page.get_by_role("checkbox")).check()  # the box is drawn over by its label
    launch_dialog.get_by_text(f"Launch runs to materialize {len(ASSETS)} assets").click()  # closes the list
    expect(launch_dialog.get_by_text("1 partition", exact=True)).to_be_visible()
    launch = launch_dialog.get_by_role("button", name="Launch 1 run")
    expect(launch).to_be_enabled()
    screenshot(page, "03-launch-dialog")
    launch.click()
    expect(launch_dialog).to_be_hidden()

    # The toast names the run and links to it; the run page follows it live to its end.
    expect(page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))).to_be_visible()
    view = page.get_by_role("link", name="View", exact=True)
    expect(view).to_have_attribute("href", re.compile(r"^/runs/[0-9a-f-]{36}$"))
    run_path = view.get_attribute("href") or ""
    view.click()
    expect(page).to_have_url(re.compile(re.escape(run_path)))
    outcome = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(outcome).to_be_visible(timeout=RUN_TIMEOUT_MS)
    screenshot(page, "04-run")
    assert outcome.inner_text() == "Success", f"{run_path} ended {outcome.inner_text()}; see test-output/ui/dev.log"
    expect(page.get_by_text(f"partition: {partition}")).to_be_visible()

    # The stored video's partition page: task id, prompt, credits, a working S3 link, duration and resolution.
    page.goto(f"/assets/stored_video?view=partitions&partition={partition}")
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible()
    task_id = metadata_row(page, "task_id").locator("td").nth(1).inner_text().strip()
    assert re.fullmatch(r"task_\w+", task_id), task_id
    s3_link = metadata_row(page, "s3_link").get_by_role("link", name=re.compile(r"^http"))
    href = s3_link.get_attribute("href") or ""
    assert href == f"{dev_stack.s3_url}/rivya-videos/videos/{partition}/{task_id}.mp4"
    expect(metadata_row(page, "duration_seconds")).to_contain_text(str(brief["params"]["duration"]))
    expect(metadata_row(page, "resolution")).to_contain_text(re.compile(r"\d+x\d+"))
    expect(metadata_row(page, "final_credits")).to_contain_text("90")
    expect(metadata_row(page, "prompt")).to_contain_text(brief["prompt"][:40])
    screenshot(page, "05-partition-stored_video")

    # The poster and the contact sheet: a long Markdown value sits behind "[Show Markdown]", whose dialog shows the
    # inline thumbnail (it loads from the event log, whoever may read the bucket) and names the full-size JPEG.
    for label, suffix in PICTURES.items():
        expect(metadata_row(page, f"{label}_uri")).to_contain_text(f"/{partition}/{task_id}.{suffix}")
        metadata_row(page, label).get_by_text("[Show Markdown]").click()
        dialog = page.get_by_role("dialog").filter(has_text=label)  # the dialog's title is the label
        image = dialog.locator("img[src^='data:image/jpeg;base64,']")
        expect(image).to_be_visible()
        assert image.evaluate("img => img.complete && img.naturalWidth") > 0, f"the {label} did not load"
        expect(dialog).to_contain_text(f"{task_id}.{suffix}")
        screenshot(page, f"05-partition-stored_video-{label}")
        dialog.get_by_role("button", name="Close").click()
        expect(dialog).to_be_hidden()

    # Clicking the S3 link opens the video in a new tab; the bytes behind it are the stored MP4.
    with page.context.expect_event("response", lambda response: response.url == href) as opened:
        s3_link.click()
    assert opened.value.status in (200, 206) and opened.value.header_value("content-type") == "video/mp4"
    assert httpx.get(href, timeout=30).raise_for_status().content[4:8] == b"ftyp"

    # Its checks passed for this partition: the four blocking ones and the three of QC.
    page.get_by_role("tab", name="Checks").click()
    for check in CHECKS + QC_CHECKS:
        expect(page.get_by_title(check, exact=True).locator("xpath=..")).to_contain_text("Succeeded")
    screenshot(page, "06-checks-stored_video")

    # The generation task's partition page: the prompt, the same task id and what it cost.
    page.goto(f"/assets/generation_task?view=partitions&partition={partition}")
    expect(metadata_row(page, "task_id")).to_contain_text(task_id)
    expect(metadata_row(page, "prompt")).to_contain_text(brief["prompt"][:40])
    expect(metadata_row(page, "final_credits")).to_contain_text("90")
    screenshot(page, "07-partition-generation_task")


def test_automation_shows_the_sensor_and_the_schedule_with_their_ticks(page: Page) -> None:
    page.goto("/automation")
    expect(page.get_by_role("link", name="pending_generation_tasks")).to_be_visible()
    expect(page.get_by_role("link", name="brief_discovery")).to_be_visible()
    expect(page.get_by_text("Standard sensor")).to_be_visible()  # the rows' details are in
    expect(page.get_by_text(re.compile(r"^Scheduled "))).to_be_visible()
    screenshot(page, "08-automation")

    page.get_by_role("link", name="pending_generation_tasks").click()
    expect(page.locator("tr", has=page.get_by_text("Running", exact=True)).get_by_role("checkbox")).to_be_checked()
    expect(page.get_by_text("Polls Rivya for tasks")).to_be_visible()
    expect(page.get_by_role("button", name="View logs").first).to_be_visible()  # the tick history has ticks
    screenshot(page, "09-sensor")

    page.goto("/automation")
    page.get_by_role("link", name="brief_discovery").click()
    expect(page.locator("tr", has=page.get_by_text("Running", exact=True)).get_by_role("checkbox")).to_be_checked()
    expect(page.get_by_text("Scans the briefs folder")).to_be_visible()
    expect(page.get_by_text("Next tick")).to_be_visible()
    screenshot(page, "10-schedule")
