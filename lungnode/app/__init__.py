"""Wiring of the node's process roles: the one place that joins the layers.

- :mod:`lungnode.app.node`: the embedded node (``lungnode serve``): SCP,
  completion timer, job workers, outbox, housekeeping and API in one process.
- :mod:`lungnode.app.ingest_worker`: the main of an ingest worker process.
- :mod:`lungnode.app.wsgi`: the API alone, for a WSGI server;
  :mod:`lungnode.app.api_server` and :mod:`lungnode.app.gunicorn_conf`: the
  ``api`` role, gunicorn configured from the settings.
- :mod:`lungnode.app.commands`, :mod:`lungnode.app.model_commands`: what the
  ``lungnode`` commands do (``lungnode.cli`` parses their arguments).
- :mod:`lungnode.app.database`, :mod:`lungnode.app.metrics`,
  :mod:`lungnode.app.housekeeping`: what every role opens the same way.

No layer below imports this package (``make lint`` checks the contracts).
"""
