"""Telling people how a run ended (`notify:`), through Apprise.

`RunOutcome` is what a message may say of a run, as plain values; `events_of` says which of the
notifiers' words (`failure`, `recovered`, `deployed`, `rollback`) it is, `message` writes it
(both pure). `deliver` sends one message per notifier that listens to one of those words: its
URL read from its secret, title and body masked, each send bounded by a deadline and any failure
a warning (the run's outcome is already decided and recorded: a notifier never changes it).

`recovered` needs the pipeline's previous run: the daemon gives its status from its store in
the run's request; a run without one reads `run.json` of the newest earlier run of the same
pipeline and destination in this data directory (`previous_local_status`).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from runner.errors import SecretWithheld
from runner.model.notify import Notifier, NotifyEvent
from runner.secrets import Masker

DEADLINE = 15.0  # seconds all of a run's notifications may take, whatever a service does
REASON_LIMIT = 1500  # characters of the failure's reason a message quotes
ENDED = ("success", "failed")  # the statuses that say how a pipeline is doing (not cancelled)


@dataclass(frozen=True)
class RunOutcome:
    pipeline: str
    status: str  # success | failed | cancelled
    what: str = "run"  # run | rollback (`runner rollback`)
    destination: str = ""  # "" when the pipeline has none
    failed_stage: str | None = None
    reason: str | None = None  # why it failed: the failed stage's error, else the run's
    commit: str | None = None
    ref: str | None = None  # the branch or tag built
    who: str | None = None  # who pushed or asked for the run
    run_url: str | None = None  # the run's page on the daemon's dashboard
    deployed: bool = False  # the deploy stage succeeded
    previous: str | None = None  # the pipeline's previous run: success | failed | None (unknown)


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    kind: str  # Apprise's notify type: success | warning | failure


def events_of(outcome: RunOutcome) -> tuple[NotifyEvent, ...]:
    """The notifiers' words this outcome is. A cancelled run is none of them."""
    if outcome.what == "rollback":
        return ("rollback",) if outcome.status in ENDED else ()
    if outcome.status == "failed":
        return ("failure",)
    if outcome.status != "success":
        return ()
    events: list[NotifyEvent] = []
    if outcome.previous == "failed":
        events.append("recovered")
    if outcome.deployed:
        events.append("deployed")
    return tuple(events)


def message(outcome: RunOutcome, events: Iterable[NotifyEvent]) -> Message:
    """The message for `events` (those of `outcome` a notifier listens to). Pure."""
    events = tuple(events)
    name = outcome.pipeline + (f" ({outcome.destination})" if outcome.destination else "")
    failed = outcome.status == "failed"
    if "rollback" in events:
        title = f"{name}: rollback {'failed' if failed else 'done'}"
        kind = "failure" if failed else "warning"
    elif "failure" in events:
        title = f"{name}: failed" + (f" at {outcome.failed_stage}" if outcome.failed_stage else "")
        kind = "failure"
    else:
        title = f"{name}: " + " and ".join(e for e in ("recovered", "deployed") if e in events)
        kind = "success"
    lines = [f"Pipeline: {outcome.pipeline}"]
    if outcome.destination:
        lines.append(f"Destination: {outcome.destination}")
    if outcome.commit:
        lines.append(f"Commit: {outcome.commit[:12]}" + (f" ({outcome.ref})" if outcome.ref else ""))
    if outcome.who:
        lines.append(f"By: {outcome.who}")
    if failed:
        if outcome.failed_stage:
            lines.append(f"Failed stage: {outcome.failed_stage}")
        if outcome.reason:
            reason = outcome.reason
            if len(reason) > REASON_LIMIT:
                reason = reason[:REASON_LIMIT] + " [...]"
            lines.append(f"Why: {reason}")
    if "recovered" in events:
        lines.append("The previous run of this pipeline had failed.")
    if outcome.run_url:
        lines.append(f"Run: {outcome.run_url}")
    return Message(title, "\n".join(lines), kind)


def previous_local_status(runs_dir: Path, pipeline: str, destination: str,
                          this_run: str) -> str | None:
    """The status (success or failed) of the newest run of `pipeline` to `destination` in
    `runs_dir` that ended before now, other than `this_run`, by when its run.json was written;
    None when there is none. Cancelled runs are passed over: they say nothing of the code."""
    found: list[tuple[float, Path]] = []
    try:
        entries = list(runs_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name == this_run:
            continue
        record = entry / "run.json"
        try:
            found.append((record.stat().st_mtime, record))
        except OSError:
            continue
    for _, record in sorted(found, reverse=True):
        try:
            run = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(run, dict) or run.get("pipeline") != pipeline \
                or (run.get("destination") or "") != destination:
            continue
        if run.get("status") in ENDED:
            return run["status"]
    return None


def deliver(notifiers: Iterable[Notifier], outcome: RunOutcome, secret: Callable[[str], str],
            masker: Masker, say: Callable[[str], None], deadline: float = DEADLINE) -> None:
    """Send each notifier listening to one of the outcome's events its message, masked. `say`
    gets a line per notifier: sent, or a warning saying why not (never the URL). Returns once
    all are sent or `deadline` has passed (what is left is abandoned, in a daemon thread)."""
    events = events_of(outcome)
    jobs: list[tuple[str, str, Message]] = []  # (label, url, message)
    for i, notifier in enumerate(notifiers):
        wanted = [e for e in events if e in notifier.on]
        if not wanted:
            continue
        label = f"notify[{i}] (secret '{notifier.url_secret}')"
        try:
            url = secret(notifier.url_secret)
        except SecretWithheld:
            say(f"warning: {label}: not sent: this run gets no secrets")
            continue
        m = message(outcome, wanted)
        jobs.append((label, url, Message(masker.mask(m.title), masker.mask(m.body), m.kind)))
    if not jobs:
        return
    done = threading.Event()
    said: list[str] = []

    def send_all() -> None:
        for label, url, m in jobs:
            said.append(_send(label, url, m, masker))
        done.set()

    # A daemon thread: a service that hangs past the deadline must not hold the process.
    threading.Thread(target=send_all, name="notify", daemon=True).start()
    finished = done.wait(deadline)
    for line in list(said):
        say(line)
    if not finished:
        left = [label for label, _, _ in jobs[len(said):]]
        say(f"warning: {', '.join(left)}: not sent within {deadline:g}s: given up")


class _Captured(logging.Handler):
    """What Apprise logs while it sends (why a send failed), kept instead of printed: its lines
    may quote parts of the URL."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _send(label: str, url: str, m: Message, masker: Masker) -> str:
    import apprise

    log = logging.getLogger("apprise")
    log.propagate = False  # never to the process's stderr: see _Captured
    captured = _Captured()
    log.addHandler(captured)
    try:
        service = apprise.Apprise.instantiate(url)
        if service is None:
            return (f"warning: {label}: not sent: the secret does not hold a URL Apprise "
                    "supports")
        ok = service.notify(body=m.body, title=m.title, notify_type=apprise.NotifyType(m.kind))
    except Exception as exc:  # noqa: BLE001 - a notifier never fails the run
        return f"warning: {label}: not sent: {_hide(type(exc).__name__, url, masker)}"
    finally:
        log.removeHandler(captured)
    if ok:
        return f"{label}: sent '{m.title}'"
    detail = "; ".join(captured.lines[-2:]) or "Apprise reported a failure"
    return f"warning: {label}: not delivered: {_hide(detail, url, masker)}"


def _hide(text: str, url: str, masker: Masker) -> str:
    """`text` with the run's secrets and every part of `url` that may be a token masked."""
    parts = urlsplit(url)
    private = Masker(on_warning=lambda _: None)
    for piece in (url, parts.netloc, parts.username, parts.password, parts.path,
                  *(unquote(p) for p in parts.path.split("/")),
                  *(v for _, v in parse_qsl(parts.query))):
        if piece:
            private.add(piece)
    return private.mask(masker.mask(text))
