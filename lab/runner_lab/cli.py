"""`runner lab up|down|status|env`: the lab's command line. Progress goes to stderr, results to
stdout (JSON with --json)."""
from __future__ import annotations

import functools
import json
import sys
import traceback

import click

from runner.errors import RunnerError
from runner_lab import host, layout
from runner_lab.errors import LabError


def _exits(fn):
    """Our own errors: one clear line and their exit code. Anything else is a bug: traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RunnerError as exc:
            click.echo(f"runner lab: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("runner lab: interrupted", err=True)
            sys.exit(130)
        except Exception:
            click.echo("runner lab: internal error (a bug in runner):\n" + traceback.format_exc(),
                       err=True)
            sys.exit(1)
    return wrapper


def _lab():
    from runner_lab.lab import Lab  # after the machine check: nothing else is needed before it
    return Lab()


def _print_human(info: dict) -> None:
    click.echo(f"registry     {info['registry']}")
    auth = info["auth_registry"]
    click.echo(f"registry     {auth['address']} (login {auth['username']}, password in "
               f"{auth['password_file']})")
    token = info["token_registry"]
    click.echo(f"registry     {token['address']} (token auth, issuer {token['realm']}; login "
               f"{token['username']}, password in {token['password_file']}; loopback only)")
    click.echo(f"build engine {info['docker_host']}")
    click.echo(f"proxy image  {info['proxy_image']} (Caddy 2, pulled by the servers)")
    db = info["database"]
    # the URL carries the password: shown masked, the file named instead
    click.echo(f"database     {layout.masked_database_url()} (PostgreSQL "
               f"{layout.POSTGRES_VERSION}; password in {db['password_file']}; "
               "RUNNER_DATABASE_URL in `runner lab env`)")
    for s in info["servers"]:
        click.echo(f"{s['name']:<12} ssh {s['user']}@{s['host']}:{s['port']}  engine {s['docker_host']}")
    if info["servers"]:
        first = info["servers"][0]
        click.echo(f"ssh key      {first['key_file']}\nknown_hosts  {first['known_hosts']}")
    click.echo("use it from a shell with: eval \"$(runner lab env)\"")


@click.group()
def lab() -> None:
    """A local lab: build engine, registries, PostgreSQL, and SSH servers with their own Docker
    engines."""


@lab.command()
@click.option("--servers", "count", type=click.IntRange(1, layout.MAX_SERVERS), default=3,
              show_default=True,
              help="How many SSH servers (more are added if fewer run; none are removed).")
@click.option("--json", "as_json", is_flag=True, help="Print the lab's description as JSON.")
@_exits
def up(count: int, as_json: bool) -> None:
    """Start the lab (idempotent: only what is missing or dead is started)."""
    host.require_supported()
    info = _lab().up(count)
    if as_json:
        click.echo(json.dumps(info))
    else:
        _print_human(info)


@lab.command()
@_exits
def down() -> None:
    """Stop everything `up` started (by pid) and remove the lab's network. Idempotent."""
    host.require_supported()
    _lab().down()


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@_exits
def status(as_json: bool) -> None:
    """Is the lab up? Exit 0 either way; the problems say what is missing."""
    host.require_supported()
    info = _lab().status()
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo("the lab is up" if info["up"] else "the lab is NOT up")
    for problem in info["problems"]:
        click.echo(f"  - {problem}")
    if info["servers"]:
        _print_human(info)


@lab.command()
@_exits
def env() -> None:
    """Print `export NAME=value` lines for REGISTRY, DOCKER_HOST, DEPLOY_HOSTS, SSH_KEY_FILE,
    KNOWN_HOSTS_FILE, AUTH_REGISTRY, AUTH_REGISTRY_USER, AUTH_REGISTRY_PASSWORD_FILE,
    TOKEN_REGISTRY, TOKEN_REGISTRY_USER, TOKEN_REGISTRY_PASSWORD_FILE, PROXY_IMAGE, RUNNER_DATABASE_URL (with the password of the lab's PostgreSQL role).
    Use: eval "$(runner lab env)"."""
    lab_ = _lab()
    lab_.load()
    info = lab_.describe()
    if not info["servers"]:
        raise LabError("the lab is not up: run `runner lab up` first")
    click.echo("\n".join(layout.env_lines(info)))
