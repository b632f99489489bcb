"""The `steering` report: its shape, defined once as a typed model, and the
one place it is built.

The worker builds each choice's report (`single`) and sends it with the
request's outputs as a plain dict (`wire`); the HTTP frontend merges the
reports of a response's choices (`merge`), validates the result against the
same model, and renders it into the response. /openapi.json documents this
model. Low in the package (it imports only the steering contract), so the
worker uses it without importing `adaras.api`.

JSON keys follow what applies, not the model's defaults: the answer probe's
fields only with `answer_probe`, `error` only when there is one, `choices`
only when the report covers several, a choice's `sample` only when
`order_choices` reordered it (`wire` drops what was never set).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adaras.steering import MODES, Resolved

ModeField = Literal[MODES]  # type: ignore[valid-type]


class ChoiceReport(BaseModel):
    """One choice's part of a report that covers several."""

    model_config = ConfigDict(extra="forbid")

    index: int
    sample: int | None = Field(None, description="with order_choices: the choice's index as "
                                                 "generated, before ordering")
    failure_probability: float | None = None
    applied: bool
    answer_failure_probability: float | None = Field(
        None, description="with answer_probe: this choice's own")
    error: str | None = None


class SteeringReport(BaseModel):
    """The `steering` report of every response (in a stream: the chunk that
    carries the finish_reason, and the usage chunk)."""

    model_config = ConfigDict(title="SteeringReport", extra="forbid")

    mode: ModeField
    profile: str | None = None
    alpha: float | None = None
    failure_probability: float | None = Field(
        None, description="adaptive: the predictor's p_fail for the prompt")
    applied: bool = Field(description="whether the decode steps were steered")
    neurons: int = Field(description="K, the profile's number of steered neurons (0 when off)")
    threshold: float | None = Field(None, description="adaptive only")
    answer_failure_probability: float | None = Field(
        None, description="with answer_probe: the answer head's probability that this answer "
        "is wrong, pooled over the positions the model read after the prompt (every generated "
        "token but the last); null when it read none. Trained on unsteered greedy and sampled "
        "answers: see `applied` for whether this one was steered")
    error: str | None = Field(None, description="why the request was not gated or probed")
    choices: list[ChoiceReport] | None = Field(
        None, description="when the report covers several choices (n > 1, or several prompts): "
        "each one's own values")

    def wire(self) -> dict:
        """The JSON object sent: only the fields that apply (see the module doc)."""
        return self.model_dump(mode="json", exclude_unset=True)


def single(resolved: Resolved, failure_probability: float | None = None,
           applied: bool | None = None, error: str | None = None,
           answer_failure_probability: float | None = None) -> SteeringReport:
    """One choice's report. `applied` defaults to what the mode implies before
    the gate decides (always: True). With the answer probe it carries
    `answer_failure_probability` (None until the model has read a generated token)."""
    return SteeringReport(
        mode=resolved.mode, profile=resolved.profile, alpha=resolved.alpha,
        failure_probability=failure_probability,
        applied=resolved.mode == "always" if applied is None else applied,
        neurons=resolved.neurons if resolved.mode != "off" else 0,
        threshold=resolved.threshold if resolved.mode == "adaptive" else None,
        **({"answer_failure_probability": answer_failure_probability}
           if resolved.answer_probe else {}),
        **({"error": error} if error else {}))


def merge(resolved: Resolved, choices: Iterable[tuple[int, dict | None, int | None]]
          ) -> SteeringReport:
    """The report of a response's choices from each one's engine report
    (index, the engine's dict or None, its index as generated when
    `order_choices` moved it): one choice's own, or for several, what they
    share (failure_probability and answer_failure_probability when equal,
    applied when any was steered, the first error) plus `choices`."""
    per = [(i, engine or {}, sample) for i, engine, sample in choices]
    p_values = {e.get("failure_probability") for _, e, _ in per}
    a_values = {e.get("answer_failure_probability") for _, e, _ in per}
    applied = [e["applied"] for _, e, _ in per if e.get("applied") is not None]
    out = single(resolved, p_values.pop() if len(p_values) == 1 else None,
                 any(applied) if applied else None,
                 next((e["error"] for _, e, _ in per if e.get("error")), None),
                 a_values.pop() if len(a_values) == 1 else None)
    if len(per) > 1 and (resolved.mode != "off" or resolved.answer_probe):
        out.choices = [ChoiceReport(
            index=i, failure_probability=e.get("failure_probability"),
            applied=resolved.mode == "always" if e.get("applied") is None else e["applied"],
            **({"sample": sample} if sample is not None else {}),
            **({"answer_failure_probability": e.get("answer_failure_probability")}
               if resolved.answer_probe else {}),
            **({"error": e["error"]} if e.get("error") else {})) for i, e, sample in per]
    return out


def answer_p_fails(report: SteeringReport) -> list[float | None]:
    """Each choice's answer_failure_probability (the report's own for one)."""
    return [c.answer_failure_probability for c in report.choices or [report]]
