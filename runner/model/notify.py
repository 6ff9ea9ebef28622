"""`notify:`: who is told how a run ended, through Apprise (one URL scheme per service: Slack,
Discord, Matrix, Teams, e-mail, ntfy, a JSON webhook, ...). The URL usually holds a token, so the
file names a secret that holds it, never the URL itself."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from runner.model.base import Model

# What a notifier may be told about; docs/notifications.md says when each happens.
NotifyEvent = Literal["failure", "recovered", "deployed", "rollback"]


class Notifier(Model):
    """One place to tell (an Apprise URL, held by a secret) and the outcomes it hears of. A
    notifier that cannot be reached is a warning of the run, never its failure."""

    url_secret: str = Field(alias="url", examples=["slack_url"])
    """The name of a `secrets:` entry whose value is the Apprise URL (`slack://...`,
    `ntfys://...`, `json://host/path`, `mailtos://...`): it usually holds a token."""
    on: tuple[NotifyEvent, ...] = Field(default=("failure", "recovered"),
                                        examples=[["failure", "recovered", "deployed"]])
    """When to send: `failure` (the run failed), `recovered` (it succeeded and the pipeline's
    previous run had failed), `deployed` (its deploy succeeded), `rollback` (a `runner
    rollback` ended, either way)."""

    @field_validator("on")
    @classmethod
    def _some(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # Not min_length: pydantic would add "too short" to a list whose one word is misspelt.
        if not v:
            raise ValueError("name at least one of failure, recovered, deployed, rollback")
        return v
