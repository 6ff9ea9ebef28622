"""The summary that opens a deploy's plan (`runner exec --dry-run`): servers, image, env names,
secret names (never a value), proxy hosts, health probe, strategy, roles; before the argv."""
from __future__ import annotations

import textwrap

import yaml
from click.testing import CliRunner

from pipelines.deploy import DeployStage
from runner.cli import cli
from runner.loader import load_pipeline_text

PIPELINE = textwrap.dedent("""\
    version: 1
    name: shop
    repository: {url: /srv/git/shop}
    image: {name: registry.example.com/shop}
    secrets:
      db_password: {env: SUMMARY_DB_PASSWORD}
      registry_password: {env: SUMMARY_REGISTRY_PASSWORD}
    stages:
      deploy:
        servers: [root@10.0.0.11, root@10.0.0.12]
        ssh: {known_hosts: /kh, key_file: /k}
        registry: {username: me, password: registry_password}
        container:
          name: shop
          env: {APP_MODE: production}
          secret_env: {DATABASE_PASSWORD: db_password}
        healthcheck: {http: {port: 8080, path: /healthz}}
        strategy: {type: rolling, batch_size: 1}
        proxy: {hosts: [shop.example.com], tls: true, app_port: 8080}
        roles:
          web: {}
          worker: {command: [python, -m, shop.worker], servers: [10.0.0.12], proxy: false}
    """)


def test_the_deploy_plan_opens_with_its_summary():
    pipeline = load_pipeline_text(PIPELINE, "/work/p/pipeline.yml", environ={})
    plan = DeployStage().plan(pipeline)
    assert list(plan)[0] == "summary"
    summary = plan["summary"]
    assert summary["servers"] == ["root@10.0.0.11:22", "root@10.0.0.12:22"]
    assert summary["image"] == "registry.example.com/shop@<the digest the push gives>"
    assert summary["strategy"].startswith("rolling, batches ")
    assert summary["secrets"] == ["registry_password (registry password)"]
    web, worker = summary["roles"]["web"], summary["roles"]["worker"]
    assert web["env"] == ["APP_MODE"]
    assert web["secret env"] == ["DATABASE_PASSWORD (secret db_password)"]
    assert web["proxy"] == "https://shop.example.com/ -> container port 8080 (zero downtime)"
    assert web["health"].startswith("GET /healthz on container port 8080, 200")
    assert worker["on"] == ["10.0.0.12/worker"] and worker["container"] == "shop-worker"
    assert worker["proxy"].startswith("none (stop-start")


def test_dry_run_prints_the_summary_first_and_no_secret_value(tmp_path, monkeypatch):
    f = tmp_path / "pipeline.yml"
    f.write_text(PIPELINE)
    monkeypatch.setenv("SUMMARY_DB_PASSWORD", "db-secret-value-1")
    monkeypatch.setenv("SUMMARY_REGISTRY_PASSWORD", "registry-secret-value-2")
    out = CliRunner().invoke(cli, ["exec", str(f), "--dry-run", "--data-dir", str(tmp_path / "d")])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("summary:\n"), out.output[:300]
    printed = yaml.safe_load(out.output)
    assert printed["summary"]["roles"]["web"]["proxy"].startswith("https://shop.example.com/")
    assert "summary" not in printed["stages"][-1]  # said once, at the top
    assert "db-secret-value-1" not in out.output and "registry-secret-value-2" not in out.output
