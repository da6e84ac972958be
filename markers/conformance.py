"""The suite's pytest plugins, as one.

An installed suite loads this through its ``pytest11`` entry point, before pytest parses its
arguments, so that pytest knows every option at pre-parse and reads ``--report-dir DIR`` (a space,
not ``=``) as an option and its value instead of a test path. conftest.py loads it for a checkout
that is not installed; a module registered twice is loaded once.
"""
import gc

pytest_plugins = ["markers.plugin", "fixtures.session", "fixtures.models", "fixtures.data", "fixtures.parity",
                  "fixtures.benchmark", "fixtures.training", "fixtures.params"]


def pytest_collection_finish(session) -> None:
    """Freezes what exists once the tests are collected (torch, the plugins, the test modules:
    about 400,000 objects) out of the cyclic garbage collector's reach. Every later full
    collection, pytest's five at the end of the session included, then scans only what the tests
    made: 0.14 s a collection instead of 0.56 s, measured on the tiny suite."""
    gc.freeze()
