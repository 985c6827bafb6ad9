"""The web console in a real browser, against a real node receiving over DICOM.

The tests run in order on one node and one browser (the module's fixture): an
admin logs in, watches a series arrive, opens its result, retries its dead
deliveries, predicts on a PNG and visits every page; then a viewer logs in.
Every page is photographed at 1280x800: into build/console/, or with
LUNGNODE_SCREENSHOTS=docs (`make screenshots`) into docs/img/ for the README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import requests
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from sqlalchemy import select

from lungnode.db.models import AuditEvent, Delivery
from tests.console.conftest import (
    ADMIN_PASSWORD,
    DESKTOP,
    PASSWORD,
    Console,
    set_viewport,
)
from tests.dicom.helpers import store_all, wait_until
from tests.support.synthetic import make_ct_series

SERIES = make_ct_series(8, rows=64, columns=64, seed=15)
STUDY = str(SERIES[0].StudyInstanceUID)


def test_the_shell_and_its_assets_are_served_by_the_node(console: Console) -> None:
    shell = requests.get(f"{console.url}/", timeout=30)
    assert shell.status_code == 200 and shell.headers["Cache-Control"] == "no-store"
    assert "script-src 'self'" in shell.headers["Content-Security-Policy"]
    assets = [
        a.get_attribute("src") or a.get_attribute("href")
        for a in console.driver.find_elements(By.CSS_SELECTOR, "script[src], link[rel=stylesheet]")
    ]
    assert len(assets) == 3 and all(str(a).startswith(f"{console.url}/console/") for a in assets)
    for asset in assets:
        answer = requests.get(str(asset), timeout=30)
        assert answer.status_code == 200
        assert "immutable" in answer.headers["Cache-Control"]
    wrong_version = str(assets[0]).replace("/console/", "/console/x", 1)
    assert requests.get(wrong_version, timeout=30).status_code == 404
    console.find("#login-form")
    console.screenshot("login")


def test_admin_watches_a_series_arrive_on_the_overview(console: Console) -> None:
    console.log_in("admin", ADMIN_PASSWORD)
    console.find("#health-status")
    console.find("#latest-table")
    assert (
        console.driver.execute_script(
            "return localStorage.length + sessionStorage.length + document.cookie.length"
        )
        == 0
    )
    # Sent over DICOM while the page is open; the page polls, nobody reloads it.
    assert store_all(console.node.scp.port, SERIES) == [0] * len(SERIES)
    row = f"#latest-table tr[data-study='{STUDY}']"
    console.find(row, timeout=120)
    console.wait().until(lambda d: "8 instances received" in console.find("#hourly-summary").text)
    console.screenshot("overview")


def test_the_result_page_shows_heatmaps_scores_model_and_report(console: Console) -> None:
    console.open("#/results")
    row = console.find(f"#results-table tr[data-study='{STUDY}']")
    console.wait().until(lambda _: console.image_widths("#results-table img.thumb") > [0])
    console.screenshot("results")
    row.find_element(By.CSS_SELECTOR, "a").click()
    console.find("#verdict")
    heatmaps = "#heatmaps img"
    console.wait().until(lambda _: console.image_widths(heatmaps))
    console.wait().until(lambda _: all(width > 0 for width in console.image_widths(heatmaps)))
    assert "synthetic" in console.find("#synthetic-notice").text
    console.find("#scores-chart")
    deliveries = console.find("#result-deliveries")
    assert "pacs" in deliveries.text and "Encapsulated PDF" in deliveries.text
    report = console.find("#report-link")
    report.click()
    console.wait().until(lambda _: report.get_attribute("data-status") == "200")
    pdf = console.api("GET", str(report.get_attribute("data-url")))
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    console.screenshot("result")


def test_results_are_filtered_and_paged(console: Console) -> None:
    console.open("#/overview")
    console.find("#latest-table")
    console.open("#/results")
    row = f"#results-table tr[data-study='{STUDY}']"
    console.find(row)

    def filter_by(study: str, source: str = "") -> None:
        box = console.find("#filter-study")
        box.clear()
        box.send_keys(study)
        Select(console.find("#filter-source")).select_by_value(source)
        console.find("#results-filter button[type='submit']").click()

    filter_by("1.2.3.999")
    console.wait().until(lambda d: not d.find_elements(By.CSS_SELECTOR, row))
    assert "0 result(s)" in console.find("#results-table caption").text
    filter_by(STUDY, "upload")  # the study's result came by DICOM, not by upload
    console.wait().until(lambda _: "0 result(s)" in console.find("#results-table caption").text)
    filter_by(STUDY, "dicom")
    console.find(row)
    assert "1 result(s)" in console.find("#results-table caption").text
    assert console.find("#page-next").get_attribute("disabled") is not None
    assert console.find("#page-previous").get_attribute("disabled") is not None


def _dead(console: Console) -> list[int]:
    with console.node.sessions() as session:
        return list(session.scalars(select(Delivery.id).where(Delivery.state == "dead")))


def test_admin_retries_a_dead_delivery(console: Console) -> None:
    # The only destination refuses and one attempt is allowed: every delivery dies.
    assert wait_until(lambda: len(_dead(console)) >= 4, timeout=60)
    first = _dead(console)[0]
    console.open("#/deliveries")
    console.find(f"#dead-table tr[data-delivery='{first}']")
    console.screenshot("deliveries")
    console.find(f"button[data-retry='{first}']").click()
    console.wait().until(lambda _: "queued again" in console.find("#status").text)
    with console.node.sessions() as session:
        retried = session.scalars(
            select(AuditEvent.target).where(AuditEvent.action == "delivery.retry")
        ).all()
    assert retried == [str(first)]
    console.find("#retry-all").click()
    console.wait().until(lambda _: "queued again" in console.find("#status").text)
    assert wait_until(lambda: _audited(console, "delivery.retry") > 1)


def _audited(console: Console, action: str) -> int:
    with console.node.sessions() as session:
        return len(session.scalars(select(AuditEvent).where(AuditEvent.action == action)).all())


def test_admin_uploads_a_png_and_sees_its_verdict(console: Console, tmp_path: Path) -> None:
    picture = np.random.default_rng(15).integers(0, 255, (128, 128), dtype=np.uint8)
    path = tmp_path / "slice.png"
    Image.fromarray(picture).save(path)
    console.open("#/predict")
    console.find("#predict-files").send_keys(str(path))
    console.find("#predict-submit").click()
    card = console.find("#predict-results [data-prediction]", timeout=60)
    assert card.find_element(By.CSS_SELECTOR, ".verdict").text
    console.wait().until(lambda _: console.image_widths("#predict-results img") > [0])
    console.screenshot("predict")


def test_series_jobs_users_and_peers_pages(console: Console) -> None:
    series_uid = str(SERIES[0].SeriesInstanceUID)
    console.open("#/series")
    row = console.find(f"#series-table tr[data-series='{series_uid}']")
    assert "complete" in row.text and " 8 " in f" {row.text} "
    # Which stages a job lists depends on how many slices were scored while the
    # series arrived (none left to score: no ``inference``); every job has these.
    jobs = console.find("#jobs-table").text
    assert "aggregate" in jobs and "job " in jobs
    console.screenshot("series")

    console.open("#/users")
    console.find("#users-table tr[data-user='viewer']")
    console.find("#new-username").send_keys("reader")
    console.find("#new-password").send_keys("reader-password")
    console.find("#add-user button[type=submit]").click()
    row = console.find("#users-table tr[data-user='reader']")
    assert "viewer" in row.text
    console.find("#users-table button[data-toggle='reader']").click()
    console.wait().until(
        lambda _: "disabled" in console.find("#users-table tr[data-user='reader']").text
    )
    console.screenshot("users")

    console.open("#/peers")
    assert "yes" in console.find("#peers-table tr[data-peer='pacs']").text
    secret = console.find("#settings-table tr[data-setting='secret_key']").text
    assert secret.endswith("********")
    assert "LUNGNODE" in console.find("#settings-table tr[data-setting='ae_title']").text
    console.screenshot("peers")


def test_a_viewer_sees_no_admin_pages_and_is_refused_their_calls(console: Console) -> None:
    console.log_out()
    console.log_in("viewer", PASSWORD)
    pages = [
        a.get_attribute("data-page")
        for a in console.driver.find_elements(By.CSS_SELECTOR, "#nav a")
    ]
    assert pages == ["overview", "results"]
    console.find("#latest-table")
    console.open("#/deliveries")
    console.wait().until(lambda _: "Not available" in console.find("main h1").text)
    assert console.driver.find_elements(By.CSS_SELECTOR, "#retry-all") == []
    for method, path in (
        ("GET", "/api/v1/deliveries"),
        ("POST", "/api/v1/deliveries/1/retry"),
        ("GET", "/api/v1/series"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/users"),
        ("GET", "/api/v1/peers"),
        ("GET", "/api/v1/settings"),
        ("POST", "/api/v1/upload"),
    ):
        assert console.api(method, path, "viewer").status_code == 403, path
    console.open("#/overview")
    console.find("#latest-table")
    console.screenshot("overview-viewer")
    console.log_out()


def test_usable_at_tablet_width(console: Console) -> None:
    set_viewport(console.driver, 800, 1100)
    try:
        console.log_in("radiologist", PASSWORD)
        console.find("#latest-table")
        console.wait().until(lambda _: "instances received" in console.find("#hourly-summary").text)
        overflow = console.driver.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        console.screenshot("overview-tablet")
    finally:
        set_viewport(console.driver, *DESKTOP)
