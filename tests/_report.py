"""Counters the reliability tests fill and the test run prints at the end (see conftest.pytest_terminal_summary)."""

RELIABILITY = {"bad inputs tried": 0, "tamper cases detected": 0, "fuzz cases": 0, "property examples run": 0,
               "architectures round-tripped": 0}
