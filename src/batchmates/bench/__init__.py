"""Benchmarks behind ``batchmates bench {losses,modules,curation,all}``, one module per thing measured.

Paper: none here; each benchmark module says which of its figures a paper states (most state none).
Library choices: speed and memory targets live in the benchmark modules, not in tests; :mod:`.runner` owns the
group table, the JSON files and the ``docs/benchmarks.md`` sections; :mod:`.common` times and formats rows.
"""
