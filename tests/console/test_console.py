"""The web console in a real browser, against a real node receiving over DICOM.

The tests run in order on one node and one browser (the module's fixture): an
admin logs in, watches a series arrive, opens its result, retries its dead
deliveries, predicts on a PNG and visits every page; then a viewer logs in.
Every page is photographed at 1280x800 into docs/img/ for the README.
"""

from __future__ import annotations

import requests
from selenium.webdriver.common.by import By

from tests.console.conftest import ADMIN_PASSWORD, Console
from tests.dicom.helpers import store_all
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
            "return window.localStorage.length + window.sessionStorage.length + document.cookie.length"
        )
        == 0
    )
    # Sent over DICOM while the page is open; the page polls, nobody reloads it.
    assert store_all(console.node.scp.port, SERIES) == [0] * len(SERIES)
    row = f"#latest-table tr[data-study='{STUDY}']"
    console.find(row, timeout=120)
    console.wait().until(lambda d: "8 instances received" in console.find("#hourly-summary").text)
    console.screenshot("overview")
