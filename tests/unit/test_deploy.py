"""The deployment files hold what docs/deploy.md says, checked without a Docker engine.

- ``docker-compose.yml`` is valid against the Compose Specification's JSON schema
  (vendored in ``compose_spec/``, see its README), before and after interpolation,
  and its topology is the documented one: PostgreSQL, Redis, a one-shot migration,
  one ``scp``, one ``api``, two workers, ``beat``, GPU workers behind a profile, one
  storage volume, and Orthanc configured both ways.
- Every ``LUNGNODE_*`` variable the deployment files name is a real setting, and the
  environment of each role loads as valid settings.
- The Dockerfile, parsed into instructions: two stages, no compilers in the final
  one, a non-root user, the two ports, a health check. (That it copies no tests is
  ``test_packaging.py``'s.)
- ``scripts/run_scaled.sh`` parses, and starts the roles the compose file runs.

The health checks and the demo PACS run for real in ``tests/e2e/test_deploy_checks.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from lungnode.config import Settings, load_settings
from lungnode.peers import Peer
from tests.deploy_files import (
    DOTENV,
    ROOT,
    Instruction,
    MissingVariable,
    arguments,
    exec_form,
    image_healthcheck,
    interpolate,
    load_compose,
    load_dockerfile,
    lungnode_services,
)

SCHEMA_DIR = Path(__file__).with_name("compose_spec")
ROLES = {"scp": ["scp"], "api": ["api"], "beat": ["beat"], "migrate": ["db", "upgrade"]}


@pytest.fixture(scope="module")
def compose_raw() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as ``docker compose`` sees it, with the secrets of a .env."""
    return load_compose(DOTENV)


@pytest.fixture(scope="module")
def compose_validator() -> Any:
    schema = json.loads((SCHEMA_DIR / "compose-spec.json").read_text())
    return jsonschema_rs.validator_for(schema)


def schema_errors(validator: Any, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


# -- compose: the schema ------------------------------------------------------------


def test_vendored_schema_is_the_copy_its_readme_names() -> None:
    readme = (SCHEMA_DIR / "README.md").read_text()
    digest = hashlib.sha256((SCHEMA_DIR / "compose-spec.json").read_bytes()).hexdigest()
    assert digest in readme
    assert "Apache License" in (SCHEMA_DIR / "LICENSE").read_text()


def test_compose_file_is_valid_against_the_compose_specification(
    compose_validator: Any, compose_raw: dict[str, Any], compose: dict[str, Any]
) -> None:
    assert schema_errors(compose_validator, compose_raw) == []
    assert schema_errors(compose_validator, compose) == []


def test_the_schema_check_rejects_what_compose_rejects(
    compose_validator: Any, compose: dict[str, Any]
) -> None:
    """The validator is not vacuous: a wrong condition and an unknown key are errors."""
    wrong_condition = copy.deepcopy(compose)
    wrong_condition["services"]["scp"]["depends_on"]["migrate"]["condition"] = "service_done"
    unknown_key = copy.deepcopy(compose)
    unknown_key["services"]["api"]["healthcheck_test"] = ["CMD", "true"]
    assert schema_errors(compose_validator, wrong_condition) != []
    assert schema_errors(compose_validator, unknown_key) != []


def test_secrets_are_required_not_defaulted(compose_raw: dict[str, Any]) -> None:
    for missing in DOTENV:
        variables = {name: value for name, value in DOTENV.items() if name != missing}
        with pytest.raises(MissingVariable, match=missing):
            interpolate(compose_raw, variables)


# -- compose: the topology ----------------------------------------------------------


def test_topology_has_every_role_once_and_two_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "orthanc"} <= services.keys()
    roles = lungnode_services(compose)
    for name, command in ROLES.items():
        assert roles[name]["command"] == command, name
    default_workers = [
        name
        for name, service in roles.items()
        if service["command"] == ["worker"] and not service.get("profiles")
    ]
    assert len(default_workers) == 2, default_workers
    assert [name for name, s in roles.items() if s["command"] == ["scp"]] == ["scp"]
    assert [name for name, s in roles.items() if s["command"] == ["api"]] == ["api"]


def test_gpu_workers_are_behind_a_profile_with_a_device_each(compose: dict[str, Any]) -> None:
    gpu = {
        name: service
        for name, service in lungnode_services(compose).items()
        if "gpu" in service.get("profiles", [])
    }
    assert gpu, "no GPU worker variant"
    for name, service in gpu.items():
        assert service["command"] == ["worker"], name
        assert service["build"]["args"]["TENSORFLOW_VARIANT"] == "cuda", name
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1, name
        # Inside the container the one reserved GPU is device 0.
        assert service["environment"]["CUDA_VISIBLE_DEVICES"] == "0", name


def test_every_role_shares_one_storage_volume(compose: dict[str, Any]) -> None:
    mounts = set()
    for name, service in lungnode_services(compose).items():
        storage_dir = service["environment"]["LUNGNODE_STORAGE_DIR"]
        targets = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert storage_dir in targets, name
        mounts.add(targets[storage_dir])
    (volume,) = mounts
    assert volume in compose["volumes"]


def test_migrations_run_once_before_every_role(compose: dict[str, Any]) -> None:
    roles = lungnode_services(compose)
    migrate = roles.pop("migrate")
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name, service in roles.items():
        assert service["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }, name


def test_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", "orthanc", "scp"):
        assert services[name]["healthcheck"]["test"], name
    for name, service in lungnode_services(compose).items():
        if service["command"] == ["worker"]:
            assert "control.ping" in service["healthcheck"]["test"][-1], name
    # The api keeps the image's HEALTHCHECK (GET /api/v1/health); beat has nothing to
    # probe and says so; the one-shot migration needs none.
    assert "healthcheck" not in services["api"]
    assert services["beat"]["healthcheck"] == {"disable": True}
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_inline_health_checks_are_valid_python(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"<healthcheck of {name}>", "exec")
            checked += 1
    assert checked >= 4  # scp and the three workers


def _settings_from(environment: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for variable in list(os.environ):
        if variable.startswith("LUNGNODE_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("LUNGNODE_CONFIG", str(ROOT / "no-such-file.toml"))
    for variable, value in environment.items():
        if variable.startswith("LUNGNODE_"):
            monkeypatch.setenv(variable, str(value))
    return load_settings()


def test_each_role_gets_valid_scaled_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in lungnode_services(compose).items():
        settings = _settings_from(service["environment"], monkeypatch)
        assert settings.env == "production", name
        assert settings.queue == "celery", name
        assert settings.database_url.startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in settings.database_url, name
        assert settings.broker_url.startswith("redis://redis:6379/"), name
        assert len(settings.secret_key.get_secret_value()) >= 16, name


def _image_environment(dockerfile: list[list[Instruction]]) -> dict[str, str]:
    """The final stage's ``ENV key=value ...`` lines (what every container starts with)."""
    environment: dict[str, str] = {}
    for line in arguments(dockerfile[-1], "ENV"):
        for word in line.split():
            name, _, value = word.partition("=")
            environment[name] = value
    return environment


def test_every_role_that_serves_http_starts_in_production(
    compose: dict[str, Any],
    dockerfile: list[list[Instruction]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The api service, as the image and compose configure it (production, bound to
    0.0.0.0), passes the check that refuses plain HTTP beyond loopback: it says why
    plain HTTP is fine (TLS ends at a proxy) or serves TLS itself."""
    image = _image_environment(dockerfile)
    for name, service in lungnode_services(compose).items():
        if service["command"] != ["api"]:
            continue
        settings = _settings_from({**image, **service["environment"]}, monkeypatch)
        assert settings.env == "production" and settings.http_host == "0.0.0.0", name
        settings.check_safe_to_serve_http()


def test_orthanc_and_lungnode_know_each_other(compose: dict[str, Any]) -> None:
    """Both ways: Orthanc's modality "lungnode" is the scp service, and lungnode's
    peer is Orthanc's AE on the orthanc service."""
    orthanc = compose["services"]["orthanc"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in orthanc["volumes"] if "/" in v}
    config_file = mounts["/etc/orthanc/orthanc.json"]
    config = json.loads(config_file.read_text())
    scp = compose["services"]["scp"]
    modality = config["DicomModalities"]["lungnode"]
    assert modality == {
        "AET": scp["environment"]["LUNGNODE_AE_TITLE"],
        "Host": "scp",
        "Port": int(scp["ports"][0].split(":")[-1]),
    }
    for path in config["LuaScripts"]:
        assert mounts[path].is_file(), path
    peers = [Peer.parse(text) for text in scp["environment"]["LUNGNODE_PEERS"].split(",")]
    assert Peer("orthanc", config["DicomAet"], "orthanc", config["DicomPort"]) in peers


# -- the Dockerfile, statically -----------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> list[list[Instruction]]:
    return load_dockerfile()


COMPILERS = {"gcc", "g++", "cc", "clang", "make", "cmake", "build-essential"}


def test_image_is_multi_stage_on_the_pinned_base(dockerfile: list[list[Instruction]]) -> None:
    assert len(dockerfile) >= 2
    for stage in dockerfile:
        base = stage[0].arguments.split()[0]
        assert base == "python:3.11-slim-bookworm", base


def test_compilers_stay_in_the_builder(dockerfile: list[list[Instruction]]) -> None:
    *builders, final = dockerfile
    builder_words = {
        w for stage in builders for run in arguments(stage, "RUN") for w in run.split()
    }
    assert "build-essential" in builder_words  # what the check below keeps out of the final
    for run in arguments(final, "RUN"):
        words = set(run.split())
        assert not words & COMPILERS, run
        assert not [w for w in words if w.endswith("-dev")], run
    assert any(c.startswith("--from=") for c in arguments(final, "COPY"))


def test_final_stage_runs_as_a_non_root_user(dockerfile: list[list[Instruction]]) -> None:
    users = arguments(dockerfile[-1], "USER")
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", ""), user
    assert user.isdigit(), "a numeric UID lets Kubernetes' runAsNonRoot verify it"


def test_final_stage_ports_volume_and_command(dockerfile: list[list[Instruction]]) -> None:
    final = dockerfile[-1]
    ports = {p.split("/")[0] for line in arguments(final, "EXPOSE") for p in line.split()}
    assert {"11112", "5000"} <= ports
    environment = " ".join(arguments(final, "ENV"))
    match = re.search(r"LUNGNODE_STORAGE_DIR=(\S+)", environment)
    assert match is not None
    volumes = [v for line in arguments(final, "VOLUME") for v in exec_form(line)]
    assert match[1] in volumes
    assert any(c.split()[0] == "models" for c in arguments(final, "COPY"))
    assert exec_form(arguments(final, "ENTRYPOINT")[-1]) == ["lungnode"]
    assert exec_form(arguments(final, "CMD")[-1]) == ["serve"]


def test_image_health_check_asks_the_api(dockerfile: list[list[Instruction]]) -> None:
    command = image_healthcheck(dockerfile)
    assert command[:2] == ["python", "-c"] and "/api/v1/health" in command[2]


# -- scripts/run_scaled.sh --------------------------------------------------------------


def test_run_scaled_starts_the_roles_of_the_compose_file(compose: dict[str, Any]) -> None:
    script = (ROOT / "scripts" / "run_scaled.sh").read_text()
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "run_scaled.sh")], check=True)
    commands = dict(re.findall(r'^\s*\[([\w-]+)\]="([\w ]+)"$', script, re.MULTILINE))
    roles = lungnode_services(compose)
    expected = {
        name: " ".join(service["command"])
        for name, service in roles.items()
        if name != "migrate" and not service.get("profiles")
    }
    assert commands == expected
    assert "db upgrade" in script


def test_run_scaled_status_reports_the_ports_start_was_given(tmp_path: Path) -> None:
    """``start`` keeps the ports it was given in the run folder; ``status`` from
    another shell, without them, reports those and not the defaults."""
    script = ROOT / "scripts" / "run_scaled.sh"
    run_dir = tmp_path / "run"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LUNGNODE_", "DB_"))}
    given = {
        "LUNGNODE_DICOM_PORT": "21112",
        "LUNGNODE_HTTP_PORT": "6001",
        "LUNGNODE_BROKER_URL": "redis://127.0.0.1:6390/2",
        "DB_NAME": "lungnode_elsewhere",
    }
    # What start_all does before it starts the roles, without the roles.
    subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {script}; configure; save_run_config"],
        env={**clean, **given, "RUN_DIR": str(run_dir)},
        check=True,
    )
    status = subprocess.run(
        ["bash", str(script), "status"],
        env={**clean, "RUN_DIR": str(run_dir)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "scp       not running" in status and "api       not running" in status
    assert "broker    redis://127.0.0.1:6390/2" in status
    assert "/lungnode_elsewhere" in status
    # Ports show while the roles run: the script's own view of them.
    ports = subprocess.run(
        [
            "bash",
            "-c",
            f'source {script}; load_run_config; configure; echo "$LUNGNODE_DICOM_PORT $(api_url)"',
        ],
        env={**clean, "RUN_DIR": str(run_dir), "LUNGNODE_HTTP_PORT": "5000"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert ports == ["21112", "http://127.0.0.1:6001/api/v1"]


#: Variables with the prefix that are not settings: the image tag in compose, the
#: script's lungnode command, and the name of the TOML file.
#: Names that are not settings: the image tag, the script's binary, the settings file,
#: and the test suite's choice of database (``tests/conftest.py``).
NOT_SETTINGS = {
    "LUNGNODE_TAG",
    "LUNGNODE_BIN",
    "LUNGNODE_CONFIG",
    "LUNGNODE_TEST_DATABASE",
    "LUNGNODE_TEST_POSTGRES_URL",
}


def test_every_lungnode_variable_the_deployment_names_is_a_setting() -> None:
    for path in ("docs/deploy.md", "docker-compose.yml", "scripts/run_scaled.sh", "README.md"):
        for variable in set(re.findall(r"\bLUNGNODE_[A-Z0-9_]+", (ROOT / path).read_text())):
            if variable not in NOT_SETTINGS:
                field = variable.removeprefix("LUNGNODE_").lower()
                assert field in Settings.model_fields, f"{path}: {variable}"
