"""The lab's PostgreSQL service image, <registry>/lab/postgres:15, for test stages' `services:`.

Nothing can be pulled from Docker Hub here, so it is made like the proxy image: FROM the lab's
debootstrapped python image (bookworm), with Debian's `postgresql-15` installed from the Debian
mirror this host's apt uses (runner_lab.images.debian_mirror), built once by BuildKit on the build
engine and pushed to the lab registry. The image carries a digest of its recipe as a label, so a
changed recipe makes it again and an unchanged one costs two small registry GETs.

Its entrypoint behaves like the official image's for what tests use: `POSTGRES_PASSWORD`
(required) is the password of `POSTGRES_USER` (default `postgres`; another name is created as a
superuser beside `postgres`, which then has no password), `POSTGRES_DB` (default: the user's
name) is created unless it is `postgres`, and postgres runs as the `postgres` user (never root),
listening on 0.0.0.0:5432 with password (scram) logins from the network.

It starts in well under a second: the cluster is initialised when the image is built (initdb
was 2.4-2.8 s of every start, bench/README.md), so a container's first start only sets the
password and creates the role and database asked for, in one single-user backend, and then runs
the server. Durability is off (`fsync=off`, initdb `--no-sync`): a throwaway database for tests.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

from runner_lab import host, layout
from runner_lab.errors import LabError
from runner_lab.images import buildkit_docker_cli, debian_mirror

REPO = "lab/postgres"
TAG = layout.POSTGRES_VERSION
IMAGE = f"{layout.REGISTRY}/{REPO}:{TAG}"
BIN = f"/usr/lib/postgresql/{layout.POSTGRES_VERSION}/bin"

DATA = "/var/lib/postgresql/data"
# At build time: the cluster, its superuser `postgres` without a password yet (local trust only).
INITDB = (f"install -d -o postgres -g postgres -m 700 {DATA} "
          f"&& setpriv --reuid=postgres --regid=postgres --init-groups -- {BIN}/initdb --no-sync "
          f"-D {DATA} -U postgres -E UTF8 --locale=C.UTF-8 --auth-local=trust "
          f"--auth-host=scram-sha-256 >/dev/null "
          f"&& echo 'host all all 0.0.0.0/0 scram-sha-256' >> {DATA}/pg_hba.conf")

# The path in its comment is where this module was (runner/lab/) when the image was first made:
# the text is part of the recipe, whose digest `up` and `status` compare, so it stays as it is.
ENTRYPOINT = f"""#!/bin/sh
# The cluster was initialised at build time; the first start sets the password and makes the role
# and database asked for, then postgres runs as the postgres user (runner/lab/postgres_image.py).
set -eu
: "${{POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}}"
user="${{POSTGRES_USER:-postgres}}"
db="${{POSTGRES_DB:-$user}}"
data={DATA}
# SQL quoting of the environment's values: a literal's ' and an identifier's " doubled.
literal() {{ printf "'%s'" "$(printf '%s' "$1" | sed "s/'/''/g")"; }}
ident() {{ printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }}
if [ ! -e "$data/lab-setup-done" ]; then
    if [ "$user" = postgres ]; then
        sql="ALTER ROLE postgres PASSWORD $(literal "$POSTGRES_PASSWORD");"
    else
        sql="CREATE ROLE $(ident "$user") SUPERUSER LOGIN PASSWORD $(literal "$POSTGRES_PASSWORD");"
    fi
    if [ "$db" != postgres ]; then
        sql="$sql

CREATE DATABASE $(ident "$db") OWNER $(ident "$user");"
    fi
    # A single-user backend reports a failed statement and carries on: its ERROR lines (the
    # role or database, never the password) fail the start.
    if ! said=$(printf '%s\n\n' "$sql" | setpriv --reuid=postgres --regid=postgres \
            --init-groups -- {BIN}/postgres --single -F -D "$data" -j postgres 2>&1) ||
        printf '%s\n' "$said" | grep -qE '(ERROR|FATAL|PANIC): '; then
        printf '%s\n' "$said" | grep -E '(ERROR|FATAL|PANIC): ' >&2 || true
        exit 1
    fi
    touch "$data/lab-setup-done"
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups -- {BIN}/postgres -D "$data" \
    -c listen_addresses='*' -c fsync=off -c synchronous_commit=off -c full_page_writes=off
"""


def _dockerfile_lines(mirror: str) -> list[str]:
    return [
        f"FROM {layout.PYTHON_IMAGE}",
        # Only the mirror's main suite: the python image's sources may name others.
        f'RUN echo "deb {mirror} {layout.DEBIAN_SUITE} main" > /etc/apt/sources.list '
        "&& rm -f /etc/apt/sources.list.d/* "
        "&& apt-get update -qq "
        f"&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
        f"postgresql-{layout.POSTGRES_VERSION} "
        "&& rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb",
        f"RUN {INITDB}",
        "COPY entrypoint.sh /usr/local/bin/postgres-entrypoint",
        "RUN chmod 755 /usr/local/bin/postgres-entrypoint",
        "EXPOSE 5432",
        'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]',
    ]


def recipe(mirror: str) -> str:
    """A digest of how the image is made: the image carries it as a label."""
    text = "\n".join(_dockerfile_lines(mirror)) + "\n" + ENTRYPOINT
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def dockerfile(mirror: str) -> str:
    return "\n".join([*_dockerfile_lines(mirror),
                      f"LABEL {layout.PROXY_RECIPE_LABEL}={recipe(mirror)}", ""])


def _made_here(labels: dict | None, mirror: str) -> bool:
    return labels is not None and labels.get(layout.PROXY_RECIPE_LABEL) == recipe(mirror)


def in_registry() -> bool:
    """The registry has IMAGE made by this version's recipe (two small GETs). `runner lab up`
    counts anything else as a problem, so a kept lab whose recipe changed makes it again
    instead of serving the old one."""
    return _made_here(host.registry_image_labels(REPO, TAG), debian_mirror())


def ensure_postgres_image(state: Path, log: host.Log) -> None:
    """IMAGE in the lab registry (built on the build engine FROM local/python:3.11 when the
    engine does not have this recipe's, then pushed). About a minute the first time."""
    if in_registry():
        return
    mirror = debian_mirror()
    started = time.monotonic()
    docker = buildkit_docker_cli()
    if not _made_here(host.image_labels(layout.BUILD_SOCK, IMAGE), mirror):
        context = state / "cache" / "postgres-image"
        context.mkdir(parents=True, exist_ok=True)
        host.write_if_changed(context / "Dockerfile", dockerfile(mirror))
        host.write_if_changed(context / "entrypoint.sh", ENTRYPOINT)
        log(f"building {IMAGE} (Debian's postgresql-{layout.POSTGRES_VERSION} from {mirror} on "
            f"{layout.PYTHON_IMAGE}) with BuildKit")
        host.run([docker, "-H", layout.BUILD_DOCKER_HOST, "build", "--progress=plain", "-t", IMAGE,
                  str(context)], env={"DOCKER_BUILDKIT": "1"}, timeout=900)
        check = host.run([docker, "-H", layout.BUILD_DOCKER_HOST, "run", "--rm", "--network",
                          "none", "--entrypoint", f"{BIN}/postgres", IMAGE, "--version"],
                         check=False, timeout=120)
        out = (check.stdout + check.stderr).decode(errors="replace").strip()
        if check.returncode != 0 or f"PostgreSQL) {layout.POSTGRES_VERSION}" not in out:
            host.run([docker, "-H", layout.BUILD_DOCKER_HOST, "rmi", IMAGE], check=False)
            raise LabError(f"{IMAGE} does not run `postgres --version` "
                           f"(exit {check.returncode}): {out}")
    log(f"pushing {IMAGE}")
    host.run([docker, "-H", layout.BUILD_DOCKER_HOST, "push", IMAGE], timeout=600)
    log(f"{IMAGE} is in the registry ({time.monotonic() - started:.1f}s)")
