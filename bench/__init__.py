"""Benchmarks and the incident replay: ``python -m bench.run`` (``make bench``).

Three apps take the same payments under the same gunicorn settings and the same load:
the real service (``wsgi:app``), ``bench.naive_app`` (the design that failed in
production, rebuilt for comparison only) and ``bench.floor_app`` (the least any app
must do per payment: the floor for our overhead). Nothing in the product imports this
package.
"""
