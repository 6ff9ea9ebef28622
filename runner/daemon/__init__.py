"""The runner daemon: webhooks, polling and cron, a durable queue, workers, run history.

    runner daemon --config daemon.yaml      (example: tests/data/daemon/daemon.example.yaml)

Layout (one way: nothing here is imported by the engine or the stages):
  config.py     the YAML config -> frozen pydantic model; every problem with file:line:col
  store.py      Store (the contract) and SqliteStore (WAL): runs, stages, log_lines,
                deliveries, leases, poll_state. A PostgreSQL store would implement Store.
  webhooks.py   signature checks (GitHub sha256=, Gitea bare hex, GitLab token, generic HMAC),
                filters, and the /hooks/{github,gitea,gitlab,generic} handlers
  scheduler.py  APScheduler: git ls-remote polling, cron, retention. A poll (and the ref lookup of
                cron and manual triggers) loads the entry's pipeline file and reaches the
                repository with the credentials it names (repository.token / ssh_key, read
                from `secrets:` as `runner exec` reads them), exactly as the checkout stage
                does (runner/gitaccess.py); a repository secret that cannot be read is logged
                by pipeline and secret name and nothing is polled
  worker.py     the pool: claims runs, runs `runner exec --json` per run in its own process
                group, stores its events, leases with heartbeat, cancellation by SIGINT
  status.py     commit status back to GitHub / Gitea
  api.py        the ASGI app: webhooks, /healthz and the JSON API
  service.py    Daemon: wires the above, crash recovery on start, graceful SIGTERM
  cli.py        `runner daemon`, `runner runs [--deliveries]`, `runner logs [--follow]`,
                `runner cancel`
  spawn.py      `runner daemon` as a child process on a free loopback port, waited for until
                /healthz answers, stopped by its pid (the daemon tests, bench/webhooks.py)

HTTP API (reads are open unless read_requires_token; writes need `Authorization: Bearer TOKEN`):
  GET  /healthz
  GET  /api/runs?pipeline=&status=&branch=&trigger=&limit=&before=
  GET  /api/runs/{id}                      the run and its stages (with outputs)
  GET  /api/runs/{id}/logs?stage=&after=&limit=
  GET  /api/runs/{id}/stages/{stage}/log?after=
  POST /api/runs/{id}/cancel               token
  POST /api/pipelines/{name}/trigger       token; body {"branch"|"tag", "commit"?, "vars"?}
  GET  /api/deliveries?provider=&limit=    every delivery with its outcome and reason
  GET  /api/pipelines

Run statuses: queued -> running -> success | failed | invalid | cancelled | interrupted.
"""
