"""A node serving the web console, and a headless Chromium driven by Selenium.

Debian's ``chromium`` and ``chromedriver``; under CI=true a missing one fails the
run (``require_tool``). One node and one browser per test module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from lungnode.app.node import Node
from lungnode.db.models import Role, User
from lungnode.passwords import hash_password
from tests.conftest import SENDER_AE, Databases, node_settings, require_tool
from tests.dicom.helpers import free_port

ADMIN_PASSWORD = "console-admin-password"
PASSWORD = "console-user-password"
ROOT = Path(__file__).resolve().parents[2]
#: Where the screenshots go: build/console/ on every run, so that a test run leaves
#: the tree clean; docs/img/ (the README's pictures) with LUNGNODE_SCREENSHOTS=docs
#: (`make screenshots`).
SCREENSHOTS = (
    ROOT / "docs" / "img"
    if os.environ.get("LUNGNODE_SCREENSHOTS") == "docs"
    else ROOT / "build" / "console"
)
#: The desktop size the screenshots are taken at.
DESKTOP = (1280, 800)


@dataclass
class Console:
    """The node under test and the browser looking at its console."""

    node: Node
    driver: WebDriver
    #: Access tokens of the tests' own API calls, by user name (logging in for each
    #: call would run into the login rate limit).
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.node.http_port}"

    def wait(self, timeout: float = 20) -> WebDriverWait[WebDriver]:
        """Waits that look again when a page re-rendered what they were reading."""
        return WebDriverWait(
            self.driver, timeout, ignored_exceptions=[StaleElementReferenceException]
        )

    def find(self, css: str, timeout: float = 20) -> WebElement:
        return self.wait(timeout).until(
            expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, css))
        )

    def open(self, route: str) -> None:
        """Go to a page by its hash route (no reload: the tokens stay in memory)."""
        self.driver.execute_script("location.hash = arguments[0]", route)

    def log_in(self, username: str, password: str) -> None:
        self.find("#username").send_keys(username)
        self.find("#password").send_keys(password)
        self.find("#login-submit").click()
        self.find("#logout")

    def log_out(self) -> None:
        self.find("#logout").click()
        self.find("#login-form")

    def token(self, username: str) -> str:
        if username in self.tokens:
            return self.tokens[username]
        password = ADMIN_PASSWORD if username == "admin" else PASSWORD
        response = requests.post(
            f"{self.url}/api/v1/auth/login",
            json={"username": username, "password": password},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        self.tokens[username] = str(response.json()["access_token"])
        return self.tokens[username]

    def api(self, method: str, path: str, username: str = "admin", **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token(username)}"}
        return requests.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)

    def screenshot(self, page: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(SCREENSHOTS / f"console-{page}.png"))

    def severe_console_entries(self) -> list[dict[str, Any]]:
        """The browser's log since the last call: SEVERE entries are JavaScript errors,
        failed loads (a 4xx or 5xx of any request) and CSP violations."""
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def image_widths(self, css: str) -> list[int]:
        return list(
            self.driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])]"
                ".map(i => i.complete ? i.naturalWidth : 0)",
                css,
            )
        )


def chrome(profile: Path) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(profile / "downloads")}
    )
    service = Service(executable_path=require_tool("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    set_viewport(driver, *DESKTOP)
    return driver


def set_viewport(driver: WebDriver, width: int, height: int) -> None:
    """The page's own size, whatever the window's frame takes (screenshots are this size)."""
    driver.execute_cdp_cmd(  # type: ignore[attr-defined]
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )


@pytest.fixture(scope="module")
def console(
    tmp_path_factory: pytest.TempPathFactory, module_databases: Databases
) -> Iterator[Console]:
    """A node with the demo model whose only result destination refuses (a closed port),
    so that every delivery is dead after one attempt; users of every person's role."""
    work = tmp_path_factory.mktemp("console")
    settings = node_settings(
        work / "storage",
        module_databases,
        model="lung-ct-demo",
        admin_password=ADMIN_PASSWORD,
        peers=f"scu={SENDER_AE}@127.0.0.1:{free_port()},pacs=PACS@127.0.0.1:{free_port()}",
        result_destinations="pacs",
        delivery_max_attempts=1,
        delivery_check_interval=0.2,
        delivery_timeout=2.0,
    )
    node = Node(settings, analyse=True, serve_http=True)
    node.start()
    driver = None
    try:
        with node.sessions.begin() as session:
            for role in (Role.RADIOLOGIST, Role.VIEWER):
                session.add(
                    User(
                        username=role.value,
                        role=role.value,
                        password_hash=hash_password(PASSWORD),
                    )
                )
        driver = chrome(work / "profile")
        driver.get(f"http://127.0.0.1:{node.http_port}/")
        yield Console(node, driver)
    finally:
        if driver is not None:
            driver.quit()
        node.stop()


@pytest.fixture(autouse=True)
def no_console_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each browser test: nothing SEVERE in the browser's console."""
    yield
    if "console" in request.fixturenames:
        console: Console = request.getfixturevalue("console")
        assert console.severe_console_entries() == []
