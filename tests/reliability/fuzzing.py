"""Drive schemathesis-generated requests at a live server and collect what broke.

Each operation of a schema gets its own Hypothesis run of `max_examples`
cases, positive (schema-valid) and negative (schema-violating). Every response
must be below 500, every 4xx must carry the OpenAI error body, and every
documented response must match its schema. Half of the generated bodies get the
served model id, so the fuzzer reaches past the `model` check into sampling,
limits and generation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import hypothesis.errors
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import CheckFunction
from schemathesis.specs.openapi.schemas import OpenApiSchema

ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class FuzzTally:
    """Cases sent, responses per status code, and the problems seen."""

    cases: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # nothing to generate (no inputs)

    def count(self, status: int) -> None:
        self.cases += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1


def error_shape_problem(status: int, body: bytes) -> str | None:
    """Why a 4xx/5xx body is not `{"error": {message, type, param, code}}`, or None."""
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{status} body is not JSON: {body[:200]!r}"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or set(error) != ERROR_KEYS:
        return f"{status} body is not an OpenAI error: {body[:200]!r}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return f"{status} error message/type are not strings: {body[:200]!r}"
    return None


def _with_model(model_id: str) -> Callable[[tuple[Case, bool]], Case]:
    def apply(drawn: tuple[Case, bool]) -> Case:
        case, use_served = drawn
        if use_served and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model_id
        return case

    return apply


def fuzz_schema(
    schema: OpenApiSchema,
    base_url: str,
    *,
    max_examples: int,
    checks: list[CheckFunction],
    headers_for: Callable[[str], dict[str, str]],
    model_id: str,
    modes: Iterable[GenerationMode] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
    derandomize: bool = True,
) -> FuzzTally:
    """Fuzz every operation of `schema`; problems are collected, not raised,
    so one run reports everything it found. `derandomize` makes CI send the
    same cases every run; the nightly run explores new ones."""
    tally = FuzzTally()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in modes:
            _fuzz_operation(operation, mode, tally, base_url=base_url,
                            max_examples=max_examples, checks=checks,
                            headers=headers_for(operation.path), model_id=model_id,
                            derandomize=derandomize)
    return tally


def _fuzz_operation(
    operation: APIOperation,
    mode: GenerationMode,
    tally: FuzzTally,
    *,
    base_url: str,
    max_examples: int,
    checks: list[CheckFunction],
    headers: dict[str, str],
    model_id: str,
    derandomize: bool,
) -> None:
    strategy = st.tuples(operation.as_strategy(generation_mode=mode), st.booleans())

    @hypothesis.settings(max_examples=max_examples, deadline=None, database=None,
                         phases=[Phase.generate], derandomize=derandomize,
                         suppress_health_check=list(HealthCheck))
    @given(case=strategy.map(_with_model(model_id)))
    def run(case: Case) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=60)
        tally.count(response.status_code)
        where = f"{operation.label} [{mode.value}] {response.status_code}"
        if response.status_code >= 400:
            problem = error_shape_problem(response.status_code, response.content)
            if problem:
                tally.problems.append(f"{where}: {problem}")
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as exc:  # every failed check, grouped
            tally.problems.append(f"{where}: {str(exc)[:4000]}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        tally.skipped.append(f"{operation.label} [{mode.value}]")


def status_summary(tally: FuzzTally) -> dict[str, Any]:
    return {"cases": tally.cases, "statuses": dict(sorted(tally.statuses.items())),
            "skipped": tally.skipped}
