"""The runner daemon: webhooks, polling and cron, a durable queue, workers, run history.

    runner daemon --config daemon.yaml      (example: daemon.example.yaml)

Layout (one way: nothing here is imported by the engine or the stages):
  config.py     the YAML config -> frozen pydantic model, read by runner.loader's machinery (every
                problem with file:line:col, in the pipeline's words); `--check`
  reference.py  docs/daemon-config.md's generated part, from config.py's model
  store.py      Store, the contract: runs, stages, log_lines, deliveries, leases, poll_state,
                daemons, leadership
  store_sql.py  the queries both backends share; store_sqlite.py (one host, WAL) and
                store_pg.py (PostgreSQL: several daemons on several hosts, LISTEN/NOTIFY,
                advisory-lock leader); migrations.py, the versioned schema of both
  leases.py     when one daemon may expire another's lease, and whether the run is queued again
  webhooks.py   signature checks (GitHub sha256=, Gitea bare hex, GitLab token, generic HMAC),
                filters, and the /hooks/{github,gitea,gitlab,generic} handlers
  scheduler.py  APScheduler: leadership (every daemon tries), and on the leader git ls-remote
                polling, cron, retention, failing runs no daemon serves. A poll (and the ref lookup of
                cron and manual triggers) loads the entry's pipeline file and reaches the
                repository with the credentials it names (repository.token / ssh_key, read
                from `secrets:` as `runner exec` reads them), exactly as the checkout stage
                does (runner/gitaccess.py); a repository secret that cannot be read is logged
                by pipeline and secret name and nothing is polled
  worker.py     the pool: claims runs, runs `runner exec --json` per run (`-d` for the entry's
                destination; a rollback run: `runner rollback --json`, a tag's run of an entry
                with triggers.tag: `runner promote --json`, each report as the deploy stage) in its own process
                group, stores its events, leases with heartbeat, cancellation by SIGINT
  status.py     commit status back to GitHub / Gitea
  api.py        the ASGI app: webhooks, /healthz, /metrics and the JSON API; the h11 protocol
                with a read timeout
  ids.py        run ids and positions from a URL (1 or 0 to 2**63-1: beyond, a path is 404
                and a query 400, never an overflow in the store)
  dashboard/    the web dashboard on the same listener (docs/dashboard.md): runs, a run's live
                log (server-sent events), deliveries, servers; login, cancel, retry, rollback
  metrics.py    Prometheus metrics, one registry per daemon
  service.py    Daemon: wires the above, crash recovery on start, graceful SIGTERM
  cli.py        `runner daemon`, `runner runs [--deliveries|--daemons]`, `runner logs [--follow]`,
                `runner cancel`, `runner trigger`, `runner retry`
  spawn.py      `runner daemon` as a child process on a free loopback port, waited for until
                /healthz answers, stopped by its pid (the daemon tests, bench/webhooks.py)

HTTP API (docs/daemon.md; reads need the token unless read_requires_token is off, writes always
need `Authorization: Bearer TOKEN`):
  GET  /healthz                            open
  GET  /metrics
  GET  /api/runs?pipeline=&status=&branch=&trigger=&limit=&before=
  GET  /api/runs/{id}                      the run and its stages (with outputs)
  GET  /api/runs/{id}/logs?stage=&after=&limit=
  GET  /api/runs/{id}/stages/{stage}/log?after=
  POST /api/runs/{id}/cancel               token
  POST /api/runs/{id}/retry                token; the same commit again, linked (retry_of)
  POST /api/pipelines/{name}/trigger       token; body {"branch"|"tag"|"ref", "commit"?, "vars"?}
  GET  /api/deliveries?provider=&limit=    every delivery with its outcome and reason
  GET  /api/daemons                        the daemons sharing the store
  GET  /api/pipelines
  GET  /, /runs, /runs/{id}, /deliveries, /servers   the dashboard (dashboard/routes.py lists all)

Run statuses: queued -> running -> success | failed | invalid | cancelled | interrupted.
"""
