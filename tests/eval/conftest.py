"""Markers of the evaluation tests."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts an external process such as the METEOR 1.5 JVM (make test-fast skips it)")
