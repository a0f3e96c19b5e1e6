"""Benchmarks behind `batchmates bench {losses,modules,curation}`. Speed/memory targets live here, not in tests."""
