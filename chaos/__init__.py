"""The chaos suite: faults injected into a real, private dockvm stack, with what must hold after.

``python -m chaos`` (``make chaos``) starts its own five services (and two throwaway registries)
on a fresh RabbitMQ vhost, database and state dir, on loopback, so a running ``make run`` is not
disturbed; then runs each scenario of :data:`chaos.scenarios.SCENARIOS` several times and prints
a table. The restarts of RabbitMQ, FerretDB and dockerd are the exception: those are shared, so
they disturb everything on the machine, and ``make test`` never runs them.
"""
