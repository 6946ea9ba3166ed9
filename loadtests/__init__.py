"""Locust scenarios on the HTTP contract and the headless runner (loadtests/run.py)."""
