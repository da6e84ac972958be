"""The suite's pytest plugins, as one.

An installed suite loads this through its ``pytest11`` entry point, before pytest parses its
arguments, so that pytest knows every option at pre-parse and reads ``--report-dir DIR`` (a space,
not ``=``) as an option and its value instead of a test path. conftest.py loads it for a checkout
that is not installed; a module registered twice is loaded once.
"""
pytest_plugins = ["markers.plugin", "fixtures.session", "fixtures.models", "fixtures.data", "fixtures.parity",
                  "fixtures.benchmark", "fixtures.training", "fixtures.params"]
