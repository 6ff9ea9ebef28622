"""Polling and cron, on one APScheduler BackgroundScheduler per daemon (in-memory job store: the
durable state, which commits each ref was last seen at, lives in the run store instead).

A poll runs `git ls-remote` (argv, no shell; URL and refs checked by runner.gitsafety) and queues
a run for each branch or tag that moved to a commit this pipeline has never run, exactly as a push
webhook would have. It reaches the repository as the checkout stage does (runner.gitaccess): the
same git environment and the credentials the pipeline file names (repository.token /
repository.ssh_key), read from `secrets:` as `runner exec` reads them (a repository's pipeline:
the daemon entry's own token / ssh_key), in a private temporary
directory removed when ls-remote is done. A pipeline whose repository secret cannot be read polls
nothing and says which secret; one whose file cannot be loaded is polled without credentials (its
runs will report the file's problems). An HTTPS token goes only to the host of the pipeline's own
repository.url, even if the daemon's `repo:` names another.

coalesce=True and max_instances=1: a poll that fell behind runs once, not in a burst;
misfire_grace_time (config) keeps a busy daemon from silently skipping a schedule.

Several daemons sharing one store: only the leader (Store.try_lead: an advisory lock on
PostgreSQL, a lock file on SQLite) polls, fires cron, prunes the store and fails queued runs
that no live daemon serves. Every daemon tries for the leadership every `lease_seconds / 3`;
when the leader dies, the next try elsewhere takes it and schedules from then on. Each cron tick
is also recorded as a delivery keyed by pipeline, schedule and second, so that two daemons that
both believe they lead (a leader that lost its connection but has not noticed yet) still queue
one run per tick.

Each poll with something to say is a delivery too (provider "poll"): the runs it queued, why the
refs that moved started nothing, or why it failed; a poll that saw nothing move records nothing.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from runner.daemon.config import DaemonConfig, PipelineEntry, cron_schedule, repository_pipeline
from runner.daemon.store import DeliveryAbout
from runner.daemon.webhooks import new_run, push_filter
from runner.errors import InvalidInput
from runner.gitaccess import remote, repository_access
from runner.gitsafety import check_ref, check_repo_url, is_local_path, redact_url
from runner.loader import load_pipeline
from runner.model import Repository
from runner.pipeline_file import read_secrets
from runner.repository_pipeline import credential, repository_of
from runner.secrets import Masker, SecretStore

log = logging.getLogger("runner.daemon.scheduler")
MAX_POLL_REASONS = 50  # refs named in one poll delivery's reason


def ls_remote_argv(url: str) -> list[str]:
    check_repo_url(url)
    return ["git", "-c", "protocol.ext.allow=never", "ls-remote", url, "refs/heads/*", "refs/tags/*"]


def parse_ls_remote(text: str) -> dict[str, str]:
    """`git ls-remote` output -> {ref: commit}. Annotated tags resolve to the commit they point at
    (the peeled `^{}` line). Refs git would accept but runner.gitsafety refuses are dropped."""
    refs: dict[str, str] = {}
    peeled: dict[str, str] = {}
    for line in text.splitlines():
        sha, _, ref = line.strip().partition("\t")
        if not ref or len(sha) not in (40, 64):
            continue
        if ref.endswith("^{}"):
            peeled[ref[:-3]] = sha
            continue
        try:
            check_ref(ref)
        except InvalidInput:
            continue
        refs[ref] = sha
    refs.update({k: v for k, v in peeled.items() if k in refs})
    return refs


@dataclass(frozen=True)
class RepositoryCredentials:
    """The repository section of a pipeline file and the values of the secrets it names."""

    repository: Repository
    secrets: SecretStore


class CredentialsUnavailable(Exception):
    """A secret the pipeline's repository needs cannot be read. The message names the pipeline
    and the secret, never a value."""


def pipeline_credentials(p: PipelineEntry, config: DaemonConfig, masker: Masker,
                         environ: Mapping[str, str] | None = None,
                         warn: Callable[[str], None] = log.warning) -> RepositoryCredentials | None:
    """What `runner exec` would use to reach the repository of pipeline `p`: its file loaded
    with the entry's vars and `environ` (default: this process's environment, which the runs
    inherit), and only the secrets repository.token / repository.ssh_key name, registered with
    `masker`; for a repository's pipeline (`pipeline:`), the entry's token / ssh_key. None when
    it names none, or when the file cannot be loaded (`warn` is told).
    Raises CredentialsUnavailable."""
    environ = os.environ if environ is None else environ
    if p.file is None:  # a repository's pipeline (pipeline:): the entry's own credentials
        source = repository_pipeline(p, config)
        if source is None or not source.credentials:
            return None
        try:
            values = {name: credential(source, name, environ) for name in source.credentials}
        except InvalidInput as exc:
            raise CredentialsUnavailable(f"pipeline {p.name!r}: the repository's credentials cannot "
                                         f"be read, nothing polled: {exc}") from None
        return RepositoryCredentials(repository_of(source), SecretStore(values, masker))
    try:
        pipeline = load_pipeline(config.path(p.file), variables=dict(p.vars), environ=environ,
                                 destination=p.destination)
    except InvalidInput as exc:
        warn(f"pipeline {p.name!r}: polling without the repository's credentials: "
             f"{str(exc).splitlines()[0]}")
        return None
    repo = pipeline.repository
    names = [n for n in (repo.token_secret, repo.ssh_key_secret) if n]
    if not names:
        return None
    try:
        store = read_secrets(pipeline, environ, masker, only=names)
    except InvalidInput as exc:
        why = "; ".join(pr.message for pr in exc.problems) or str(exc)
        raise CredentialsUnavailable(f"pipeline {p.name!r}: the repository's credentials cannot "
                                     f"be read, nothing polled: {why}") from None
    return RepositoryCredentials(repo, store)


def ls_remote(url: str, timeout: float, credentials: RepositoryCredentials | None = None,
              masker: Masker | None = None,
              warn: Callable[[str], None] = log.warning) -> dict[str, str]:
    """{ref: commit} of the repository at `url`, reached as the checkout stage reaches it.
    Errors hold git's stderr with every credential masked."""
    where = remote(check_repo_url(url))
    repo = credentials.repository if credentials else Repository(url=url)
    if credentials and credentials.repository.token_secret and where.kind in ("http", "https"):
        own = remote(credentials.repository.url)
        if own.kind not in ("http", "https") or own.host.lower() != where.host.lower():
            raise CredentialsUnavailable(
                f"repository.token is for {own.redacted}, not for {where.host} "
                f"({where.redacted}): not sending it there")

    def secret(name: str, field_name: str) -> str:
        assert credentials is not None  # repository_access asks only for secrets `repo` names
        return credentials.secrets.value(name)

    # mkdtemp makes the directory 0700: the askpass script and the key file are ours alone.
    private = Path(tempfile.mkdtemp(prefix="runner-poll-"))
    try:
        access = repository_access(repo, where, secret, private, warn)
        try:
            proc = subprocess.run(ls_remote_argv(where.fetch_url), capture_output=True, text=True,
                                  timeout=timeout, env=access.env, stdin=subprocess.DEVNULL,
                                  check=False)
        finally:
            access.cleanup()
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if proc.returncode != 0:
        err = access.mask(proc.stderr.strip())
        if masker is not None:
            err = masker.mask(err)
        raise RuntimeError(f"git ls-remote failed ({proc.returncode}): {err[-300:]}")
    return parse_ls_remote(proc.stdout)


def default_branch(p: PipelineEntry) -> str:
    """The branch a run that no push names is for (cron, manual, rollback): the first
    triggers.push.branches entry that is not a pattern, else "main"."""
    return next((b for b in (p.triggers.push.branches if p.triggers.push else ())
                 if not any(c in b for c in "*?[")), "main")


def poll_delivery_id(pipeline: str) -> str:
    """A poll's delivery id: its pipeline, the time and a random part, so that it is never taken
    for a duplicate of another poll (deliveries are deduplicated by provider and id)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{pipeline}:{stamp}:{secrets.token_hex(4)}"


def branch_and_tag(ref: str) -> tuple[str | None, str | None]:
    if ref.startswith("refs/heads/"):
        return ref[len("refs/heads/"):], None
    if ref.startswith("refs/tags/"):
        return None, ref[len("refs/tags/"):]
    return None, None


def poll_decisions(p: PipelineEntry, seen: dict[str, str], first_time: bool, current: dict[str, str]
                   ) -> tuple[list[tuple[str, str | None, str | None, str | None, str]], list[str]]:
    """What a poll does about the refs that moved since the last one (new, moved or deleted).
    Pure. Returns ([(ref, branch, tag, before, commit)] to start runs for, [why each other one
    starts nothing]): the push filter's reason (the words a webhook's ignored push gets), a
    deletion, or a ref that was already there at the first poll with `initial: skip`. Refs that
    did not move are in neither."""
    runs: list[tuple[str, str | None, str | None, str | None, str]] = []
    ignored: list[str] = []
    for ref in sorted(set(current) | set(seen)):
        sha, before = current.get(ref), seen.get(ref)
        if before == sha:
            continue
        branch, tag = branch_and_tag(ref)
        why = push_filter(p, branch, tag)
        if why is not None:
            # The delivery names the pipeline already: the ref leads instead.
            ignored.append(f"{ref}: {why.removeprefix(p.name + ': ')}")
        elif sha is None:
            ignored.append(f"{ref}: deleted (was {(before or '')[:12]})")
        elif before is None and first_time and p.triggers.poll and p.triggers.poll.initial == "skip":
            ignored.append(f"{ref}: {sha[:12]} was there at the first poll (triggers.poll.initial: skip)")
        else:
            runs.append((ref, branch, tag, before, sha))
    return runs, ignored


def poll_about(where: str, seen: Mapping[str, str], current: Mapping[str, str]) -> DeliveryAbout:
    """What a poll's delivery was about, as a webhook's says it (pure): the repository polled and
    the refs that moved ("refs/heads/a, refs/tags/v1 and 2 more"); one ref's action is "created"
    or "deleted" as a push's is."""
    moved = sorted(r for r in set(current) | set(seen) if current.get(r) != seen.get(r))
    ref = ", ".join(moved[:3]) + (f" and {len(moved) - 3} more" if len(moved) > 3 else "")
    action = ""
    if len(moved) == 1:
        action = "created" if moved[0] not in seen else "deleted" if moved[0] not in current else ""
    return DeliveryAbout(where, ref, action)


class Schedules:
    def __init__(self, core):
        self.core = core
        cfg = core.config
        self.scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": cfg.misfire_grace_time})
        self.leading = False
        self._leader_jobs: list[str] = []
        self._lead_mutex = threading.Lock()

    def start(self) -> None:
        now = datetime.now(timezone.utc)
        every = max(0.2, self.core.config.lease_seconds / 3)
        self.lead()  # before the scheduler starts: a lone daemon schedules at once
        self.scheduler.add_job(self.lead, IntervalTrigger(seconds=every), id="leadership")
        # Every daemon removes the work directories of runs the leader pruned from the store.
        self.scheduler.add_job(self.core.clean_work_dirs,
                               IntervalTrigger(seconds=self.core.config.retention.interval),
                               id="work-dirs", next_run_time=now)
        self.scheduler.start()

    def lead(self) -> bool:
        """Try for the leadership; start or stop the leader's jobs when it changed."""
        with self._lead_mutex:
            try:
                # Tried every lease/3: silent for two leases means this daemon hangs.
                leading = self.core.store.try_lead(self.core.owner, silent_after=2 * self.core.config.lease_seconds)
            except Exception as exc:  # noqa: BLE001 - the store is unreachable: not the leader now
                log.warning("cannot try for the leadership", extra={"error": str(exc)})
                leading = False
            if leading != self.leading:
                self.leading = leading
                (self._add_leader_jobs if leading else self._remove_leader_jobs)()
                log.info("leader now" if leading else "no longer the leader", extra={"owner": self.core.owner})
                self.core.metrics.leader_changed(leading)
            return leading

    def _add_leader_jobs(self) -> None:
        now = datetime.now(timezone.utc)
        jobs = []
        for p in self.core.config.pipelines:
            if p.triggers.poll is not None and p.repo:
                jobs.append(self.scheduler.add_job(self.poll, IntervalTrigger(seconds=p.triggers.poll.interval),
                                                   args=[p.name], id=f"poll:{p.name}", next_run_time=now))
            for i, c in enumerate(p.triggers.cron):
                jobs.append(self.scheduler.add_job(self.cron_tick, cron_schedule(c.schedule, timezone.utc),
                                                   args=[p.name, i], id=f"cron:{p.name}:{i}"))
        jobs.append(self.scheduler.add_job(self.core.prune, IntervalTrigger(seconds=self.core.config.retention.interval),
                                           id="retention", next_run_time=now))
        jobs.append(self.scheduler.add_job(self.core.fail_unserved, IntervalTrigger(seconds=self.core.config.lease_seconds),
                                           id="unserved", next_run_time=now))
        self._leader_jobs = [j.id for j in jobs]

    def _remove_leader_jobs(self) -> None:
        for job_id in self._leader_jobs:
            try:
                self.scheduler.remove_job(job_id)
            except JobLookupError:
                pass
        self._leader_jobs = []

    def stop(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        with self._lead_mutex:
            if self.leading:
                self.core.store.release_lead()
                self.leading = False

    def refs(self, p: PipelineEntry, url: str) -> dict[str, str]:
        """`ls_remote` of `url` with the credentials pipeline `p` names (poll, cron, manual)."""
        core = self.core

        def warn(message: str) -> None:
            log.warning(message, extra={"pipeline": p.name})

        creds = pipeline_credentials(p, core.config, core.masker, warn=warn)
        return ls_remote(url, core.config.git_timeout, creds, core.masker, warn=warn)

    def head(self, p: PipelineEntry, ref: str) -> str | None:
        """The commit `ref` names now in the repository a run of `p` checks out: its pipeline's
        repository.url, reached with its credentials as the checkout reaches it (the entry's
        `repo:` only says which webhooks start it, and may be absent). The entry's `repo:` for a
        repository's pipeline (`pipeline:`) and when the pipeline file cannot be read. None when
        neither is reachable (logged): the run is then queued on the ref and its checkout records
        the commit it built."""
        core = self.core

        def warn(message: str) -> None:
            log.warning(message, extra={"pipeline": p.name})

        url = ""
        if p.file:  # a repository's pipeline (pipeline:) is read from the entry's repo: itself
            try:
                url = load_pipeline(core.config.path(p.file), variables=dict(p.vars),
                                    destination=p.destination).repository.url
            except InvalidInput as exc:
                warn(f"pipeline {p.name!r}: {str(exc).splitlines()[0]}")
        if not url and p.repo:
            url = str(core.config.path(p.repo)) if is_local_path(p.repo) else p.repo
        if not url:
            return None
        try:
            creds = pipeline_credentials(p, core.config, core.masker, warn=warn)
            return ls_remote(url, core.config.git_timeout, creds, core.masker, warn=warn).get(ref)
        except (CredentialsUnavailable, RuntimeError, InvalidInput, subprocess.TimeoutExpired,
                OSError) as exc:
            warn(f"cannot resolve {ref} of {core.masker.mask(redact_url(url))}: {exc}")
            return None

    def poll(self, name: str) -> list[int]:
        """One poll of pipeline `name`. Its outcome is a delivery (provider "poll", event the
        pipeline's name) when there is something to say: it failed (once per distinct error, not
        every interval of a long outage), it queued runs, or refs moved and it queued nothing
        (why, per ref). A poll that saw nothing move records nothing."""
        core = self.core
        p = core.config.pipeline(name)
        if p is None or not p.repo:
            return []
        url = str(core.config.path(p.repo)) if is_local_path(p.repo) else p.repo
        where = core.masker.mask(redact_url(url))
        try:
            current = self.refs(p, url)
        except CredentialsUnavailable as exc:
            log.error("poll: the repository's credentials are unavailable",
                      extra={"pipeline": name, "error": str(exc)})
            self._poll_failed(name, str(exc), where)
            return []
        except (RuntimeError, InvalidInput, subprocess.TimeoutExpired, OSError) as exc:
            log.warning("poll failed", extra={"pipeline": name, "error": str(exc)})
            self._poll_failed(name, str(exc), where)
            return []
        first = not core.store.has_poll_state(name)
        seen = core.store.poll_state(name)
        decided, ignored = poll_decisions(p, seen, first, current)
        # No event: the run's columns are its whole request (runner.daemon.run_requests).
        runs = [new_run(p, "poll", None, ref, branch, tag, sha, {}) for ref, branch, tag, _, sha in decided]
        if len(ignored) > MAX_POLL_REASONS:  # a first poll of a repository with many tags
            ignored = ignored[:MAX_POLL_REASONS] + [f"and {len(ignored) - MAX_POLL_REASONS} more refs"]
        ids: list[int] = []
        if runs or ignored:
            # The store adds the runs it skipped (the commit already ran) to the reasons.
            acc = core.store.accept_delivery("poll", poll_delivery_id(name), name, runs, ignored, remote=where,
                                             about=poll_about(where, seen, current))
            ids = list(acc.run_ids)
            if ids:
                log.info("poll queued runs", extra={"pipeline": name, "runs": ids})
                core.after_accept(list(acc.cancel_running))
        core.store.set_poll_state(name, current)
        return ids

    def _poll_failed(self, name: str, error: str, where: str) -> None:
        core = self.core
        error = core.masker.mask(error)
        # Recorded when the error is new, not at every interval while it lasts: poll_state
        # keeps when it was last tried.
        if core.store.poll_error(name) != error:
            core.store.record_delivery("poll", poll_delivery_id(name), name, "error", error, 0, remote=where,
                                       about=DeliveryAbout(where))
        core.store.set_poll_state(name, {}, error=error)

    def cron_tick(self, name: str, index: int) -> list[int]:
        """What the scheduler calls: the tick is the second it fired in (a schedule's resolution)."""
        return self.cron(name, index, tick=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def cron(self, name: str, index: int, tick: str | None = None) -> list[int]:
        """Queue a cron run. With `tick`, once per (pipeline, schedule, tick) over the cluster."""
        core = self.core
        p = core.config.pipeline(name)
        if p is None:
            return []
        spec = p.triggers.cron[index]
        branch = spec.branch or default_branch(p)
        ref = f"refs/heads/{branch}"
        sha = None
        url = where = ""
        if p.repo:
            url = str(core.config.path(p.repo)) if is_local_path(p.repo) else p.repo
            where = core.masker.mask(redact_url(url))
            try:
                sha = self.refs(p, url).get(ref)
            except (CredentialsUnavailable, RuntimeError, InvalidInput, subprocess.TimeoutExpired,
                    OSError) as exc:
                log.warning("cron: cannot resolve the branch head; queued on the ref",
                            extra={"pipeline": name, "error": str(exc)})
        run = new_run(p, "cron", None, ref, branch, None, sha, {})
        if tick is None:
            ids, cancel = core.store.enqueue([run])
        else:
            acc = core.store.accept_delivery("cron", f"{name}:{index}:{tick}", spec.schedule, [run], [],
                                             remote=core.owner, about=DeliveryAbout(where, ref))
            if acc.duplicate:
                log.info("cron tick already queued by another daemon", extra={"pipeline": name, "tick": tick})
                return []
            ids, cancel = list(acc.run_ids), list(acc.cancel_running)
        log.info("cron queued run", extra={"pipeline": name, "runs": ids, "schedule": spec.schedule})
        core.after_accept(cancel)
        return ids
