"""The web dashboard the daemon serves beside its JSON API: server-rendered pages (Starlette +
Jinja2, no build step), a little plain JavaScript for the live parts (server-sent events).

  routes.py     the pages, the forms (cancel, retry, rollback, login/logout), the event streams
  views.py      pure: ANSI colours to HTML, times, forge links, the runs page's query
  session.py    the API token exchanged for a session cookie; CSRF tokens
  live.py       wake-ups from the worker threads to the event streams
  servers.py    what runs where, asked of the servers over SSH (cached a few seconds)
  templates/    the pages (Jinja2, autoescaped); static/ their CSS and JavaScript
"""
