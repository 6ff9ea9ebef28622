"""The rules by which one daemon expires another's lease (runner/daemon/leases.py): silence as
the database measures it, and re-queueing only runs whose process and daemon are known gone."""
from __future__ import annotations

from runner.daemon.leases import MAX_ATTEMPTS, Holder, fate, known_gone, owner_host, silent_for

OWNER = "a@build-1:/var/lib/runner"


def test_silence_counts_from_the_latest_word_and_never_from_before_the_database_started():
    assert silent_for(100.0, 90.0, 80.0, 0.0) == 10.0  # the lease's heartbeat
    assert silent_for(100.0, 80.0, 95.0, 0.0) == 5.0  # the daemon signed in since
    assert silent_for(100.0, None, None, 0.0) == 100.0  # no lease row, no sign-in
    # A database restarted at 97: nobody could speak while it was down, so the owner that last
    # spoke at 80 (before the outage) has been silent for 3 s, not 20.
    assert silent_for(100.0, 80.0, 80.0, 97.0) == 3.0


def test_an_owner_silent_within_its_lease_keeps_it():
    assert fate(2.0, 2.0, gone=True, requeue=True, cancel_requested=False, attempt=1) is None
    assert fate(1.0, 2.0, gone=False, requeue=False, cancel_requested=False, attempt=1) is None


def test_only_a_run_known_gone_is_queued_again():
    silent, lease = 10.0, 2.0
    assert fate(silent, lease, gone=True, requeue=True, cancel_requested=False, attempt=1) == "queued"
    # Its process may still run (or its daemon holds the result): interrupted, never run twice.
    assert fate(silent, lease, gone=False, requeue=True, cancel_requested=False, attempt=1) == "interrupted"
    assert fate(silent, lease, gone=True, requeue=False, cancel_requested=False, attempt=1) == "interrupted"
    assert fate(silent, lease, gone=True, requeue=True, cancel_requested=True, attempt=1) == "interrupted"
    assert fate(silent, lease, gone=True, requeue=True, cancel_requested=False,
                attempt=MAX_ATTEMPTS) == "interrupted"


def test_the_owner_s_host_is_read_from_its_name():
    assert owner_host(OWNER) == "build-1"
    assert owner_host("old-daemon") is None
    assert owner_host("a@:/data") is None


def _alive(*living: tuple[int, str]):
    return lambda pid, start: (pid, start) in living


def test_gone_only_when_the_daemon_and_the_run_s_process_on_this_host_are_both_gone():
    h = Holder(OWNER, pid=200, pid_start="5000", daemon_pid=100, daemon_pid_start="4000")
    assert known_gone(h, "build-1", _alive())
    # The daemon lives (it lost the database, or hangs): it may record the run's end itself.
    assert not known_gone(h, "build-1", _alive((100, "4000")))
    # The run's process lives on, orphaned.
    assert not known_gone(h, "build-1", _alive((200, "5000")))
    # The same pids, other processes (started at other times): reused pids are not the run's.
    assert known_gone(h, "build-1", _alive((100, "1"), (200, "2")))
    # Another host's processes cannot be looked at.
    assert not known_gone(h, "build-2", _alive())
    # A process not recorded cannot be ruled out.
    assert not known_gone(Holder(OWNER, daemon_pid=100, daemon_pid_start="4000"), "build-1", _alive())
    assert not known_gone(Holder(OWNER, pid=200, pid_start="5000"), "build-1", _alive())
