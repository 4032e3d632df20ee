import os

import pytest


def pytest_collection_modifyitems(config, items):
    # services that CI has (PostgreSQL, Redis) must never be silently skipped there
    if os.environ.get("CHEAPPROXY_REQUIRE_SERVICES"):
        config._cheapproxy_require_services = True
