"""The runner daemon: webhooks, polling and cron, a durable queue, workers, run history."""
