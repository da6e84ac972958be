"""Loads the suite's pytest plugins and the Hypothesis profiles."""
import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["markers.conformance"]

settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
