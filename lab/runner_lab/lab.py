"""Bringing the lab up, checking it, and taking it down: the order of its parts.

state.json (runner_lab.state) records every process `up` started (pid + start time) and the
network pieces it made, so that `down` stops exactly those, by pid. `up` is a health check first:
a part that answers is left alone, a dead one is restarted, a missing server is added.

The parts, each in its own module: network (bridges, firewall), registries (three registries and
the token issuer), postgres, build_engine (the host's dockerd and its images), servers (namespaces
with their dockerd and sshd, known_hosts).
"""
from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner_lab import build_engine, host, layout, network, postgres, registries, servers
from runner_lab.errors import LabError
from runner_lab.layout import LabServer
from runner_lab.state import State


class Lab:
    def __init__(self, state: Path | None = None, log: host.Log = host.stderr_log):
        self.state = State(state or layout.state_dir(), log)
        self.log = log

    def load(self) -> dict:
        return self.state.load()

    def servers(self) -> list[LabServer]:
        return self.state.servers()

    def describe(self) -> dict:
        return layout.describe(self.state.dir, self.servers(), postgres.password(self.state))

    # ---- status ----------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every part that is missing or not answering, each as one line. Empty: the lab is up."""
        if not self.state.data["servers"]:
            return ["the lab is not up: run `runner lab up`"]
        found = network.problems()
        found += registries.problems(self.state)
        found += postgres.problems(self.state)
        found += build_engine.problems(self.state)
        for s in self.servers():
            found += servers.problems(self.state, s)
        return found

    def status(self) -> dict:
        self.load()
        problems = self.problems()
        return {"up": not problems, **self.describe(), "problems": problems}

    # ---- up --------------------------------------------------------------------------------

    def up(self, count: int) -> dict:
        """Servers srv1..srvCOUNT (and those already up) with everything else; only what is
        missing, dead or outdated is (re)started. Returns describe(); raises LabError naming
        every part that failed."""
        if not 1 <= count <= layout.MAX_SERVERS:
            raise LabError(f"--servers must be between 1 and {layout.MAX_SERVERS}")
        with self.state.locked():
            host.ensure_packages(self.log)  # ~30 ms when everything is installed
            self.load()
            wanted = sorted({int(n[3:]) for n in self.state.data["servers"]}
                            | set(range(1, count + 1)))
            if set(wanted) == {s.index for s in self.servers()} and not self.problems():
                return self.describe()  # everything answers: the fast path
            started = time.monotonic()
            layout.RUN_DIR.mkdir(parents=True, exist_ok=True)
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation dir
            network.ensure(self.state)
            servers.ensure_client_key(self.state)
            registries.ensure(self.state)
            build_rec = build_engine.start(self.state)
            wanted_servers = [LabServer(i, self.state.dir) for i in wanted]
            # The slow parts side by side: the engine's images, initdb, each server's dockerd.
            with ThreadPoolExecutor(max_workers=len(wanted_servers) + 2) as pool:
                futures = {"build engine": pool.submit(build_engine.finish, self.state,
                                                       build_rec),
                           "postgres": pool.submit(postgres.ensure, self.state)}
                for s in wanted_servers:
                    futures[s.name] = pool.submit(servers.ensure, self.state, s)
                errors = []
                for what, fut in futures.items():
                    try:
                        fut.result()
                    except Exception as exc:  # collect every failure, not just the first
                        errors.append(f"{what}: {exc}")
            self.state.add_servers([s.name for s in wanted_servers
                                    if not any(e.startswith(f"{s.name}:") for e in errors)])
            servers.write_known_hosts(self.state)
            if errors:
                raise LabError("the lab is not fully up:\n" + "\n".join(errors))
            problems = self.problems()
            if problems:
                raise LabError("the lab started but does not answer:\n" + "\n".join(problems))
            self.log(f"up in {time.monotonic() - started:.1f}s: registry {layout.REGISTRY}, "
                     f"registry with login {layout.AUTH_REGISTRY}, registry with token auth "
                     f"{layout.TOKEN_REGISTRY} (issuer {layout.TOKEN_REALM}), proxy image "
                     f"{layout.PROXY_IMAGE}, postgres {layout.POSTGRES_HOST}:"
                     f"{layout.POSTGRES_PORT}, build engine {layout.BUILD_DOCKER_HOST}, servers "
                     + ", ".join(f"{s.name}={s.ip}" for s in self.servers()))
            return self.describe()

    # ---- down ------------------------------------------------------------------------------

    def down(self) -> None:
        """Stop every process of the lab (recorded, or found by its own paths), then remove its
        mounts, network and runtime dir. Kept: the state dir's data, keys and passwords."""
        with self.state.locked():
            self.load()
            procs = dict(self.state.data["procs"])
            names = set(self.state.data["servers"]) | {f"srv{i}"
                                                       for i in servers.netns_indexes()}
            # Processes of ours that lost their record (an interrupted `up`) are found by the
            # lab's own config and pid file paths in their argv.
            markers = [*registries.markers(self.state), *build_engine.markers(),
                       *postgres.markers(self.state), *servers.markers(self.state, names)]
            for key, marker, exe in markers:
                if not host.alive(procs.get(key)):
                    for found in host.pids_with_arg(marker, exe):
                        procs[f"{key}:{found['pid']}"] = found
            live = {k: r for k, r in procs.items() if host.alive(r)}
            for key, rec in list(live.items()):
                if "sshd" in key:  # open ssh sessions would live on in a deleted namespace
                    for child in host.children(rec["pid"]):
                        live[f"{key}-session:{child['pid']}"] = child
            if live:
                self.log(f"stopping {len(live)} processes: "
                         + ", ".join(f"{k} (pid {r['pid']})" for k, r in sorted(live.items())))
            with ThreadPoolExecutor(max_workers=max(1, len(live))) as pool:
                list(pool.map(_stop_part, live.keys(), live.values()))
            postgres.stop_leftovers(self.state)
            # containerd and shims a killed dockerd may have left, found by our exec-root paths
            host.stop_all(host.pids_using([f"{build_engine.EXEC_ROOT}/"]
                                          + servers.exec_root_prefixes(self.state, names)))
            host.unmount_under([layout.RUN_DIR, self.state.dir])
            for name in sorted(names):
                servers.remove_net(layout.server_from_name(name, self.state.dir))
            network.remove()
            shutil.rmtree(layout.RUN_DIR, ignore_errors=True)
            self.state.reset()
            self.log("down: everything the lab started is stopped")


def _stop_part(key: str, rec: dict) -> None:
    """How `down` stops the process recorded (or found) as `key`."""
    if key == "postgres" or key.startswith("postgres:"):
        postgres.stop(rec)
    else:
        host.stop(rec)
