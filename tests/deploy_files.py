"""Reading the deployment files as Docker and Compose do, for the tests: the compose
file with its interpolation, and the Dockerfile as instructions and stages."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: Stand-ins for the secrets an operator puts in .env.
DOTENV = {"LUNGNODE_SECRET_KEY": "s" * 32, "POSTGRES_PASSWORD": "postgres-password"}


# -- compose ----------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(KeyError):
    """A ``${NAME:?message}`` whose variable is not set."""


def interpolate(value: Any, variables: Mapping[str, str]) -> Any:
    """The Compose Specification's interpolation ("Interpolation" in the spec):
    ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``,
    ``${NAME:?error}``, ``${NAME?error}``, ``${NAME:+replacement}`` and ``$$``."""
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["bare"]
        operator, argument = match["operator"], match["argument"] or ""
        present = name in variables
        text = variables.get(name, "")
        set_and_not_empty = present and text != ""
        if operator in (":-", "-"):
            use_default = not set_and_not_empty if operator == ":-" else not present
            return argument if use_default else text
        if operator in (":?", "?"):
            missing = not set_and_not_empty if operator == ":?" else not present
            if missing:
                raise MissingVariable(f"{name}: {argument}")
            return text
        if operator in (":+", "+"):
            return argument if (set_and_not_empty if operator == ":+" else present) else ""
        return text

    return _VARIABLE.sub(replace, value)


def load_compose(variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``docker-compose.yml`` as parsed (YAML merge keys resolved); interpolated when
    ``variables`` are given, as ``docker compose`` does with a .env."""
    document = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    if variables is not None:
        document = interpolate(document, variables)
    assert isinstance(document, dict)
    return document


def lungnode_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose["services"].items()
        if str(service.get("image", "")).startswith("lungnode:")
    }


# -- Dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments dropped (the
    Dockerfile reference: a ``#`` line inside a continuation is removed too)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "a continuation runs off the end of the Dockerfile"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The build stages, each from its FROM; ARGs before the first FROM belong to none."""
    result: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
        else:
            assert instruction.keyword == "ARG", f"{instruction.keyword} before the first FROM"
    return result


def load_dockerfile() -> list[list[Instruction]]:
    return stages(parse_dockerfile((ROOT / "Dockerfile").read_text()))


def arguments(stage: list[Instruction], keyword: str) -> list[str]:
    return [i.arguments for i in stage if i.keyword == keyword]


def exec_form(arguments: str) -> list[str]:
    words = json.loads(arguments)
    assert isinstance(words, list)
    return [str(word) for word in words]


def image_healthcheck(dockerfile: list[list[Instruction]]) -> list[str]:
    (healthcheck,) = arguments(dockerfile[-1], "HEALTHCHECK")
    _options, _, command = healthcheck.partition("CMD ")
    return exec_form(command)
