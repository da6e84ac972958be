"""A regular (not editable) ``pip install .`` holds everything the plugins import, and declares the
pytest11 entry point that loads the suite before pytest parses its arguments."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
# the checkout's editable install, which make's venv puts first, is not what this looks at
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable___detr")]
import markers.conformance as plugin
for name in ["markers.conformance", *plugin.pytest_plugins, "markers.hookspec", "markers.expectations",
             "training.launch", "training.report", "training.convergence", "training.train", "parity.compare"]:
    module = importlib.import_module(name)
    assert module.__file__.startswith(sys.argv[1]), (name, module.__file__)
"""


def test_a_regular_install_imports_every_plugin_module(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(ROOT)], check=True, timeout=300,
                   capture_output=True)
    # outside the checkout, so that nothing is imported from it
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    (entry_points,) = target.glob("detr_conformance-*.dist-info/entry_points.txt")
    assert "[pytest11]\nmarkers.conformance = markers.conformance" in entry_points.read_text()


def test_tox_passes_on_every_backends_device_variables():
    import configparser

    from runtime.device import BACKENDS

    tox = configparser.ConfigParser()
    tox.read(ROOT / "tox.ini")
    passed = set(tox["testenv"]["passenv"].split())
    wanted = {name for backend in BACKENDS.values() for name in backend.visible_devices}
    assert wanted and sorted(wanted - passed) == []


def test_the_suite_wins_over_pypi_packages_named_fixtures_and_markers(tmp_path):
    """PyPI has packages named ``fixtures`` and ``markers``. Installed beside the suite (here, earlier
    on the path than site-packages), the suite's own are still the ones its plugin imports, also when
    pytest starts outside the checkout: make's venv puts the suite's finder first."""
    import importlib.util
    import os

    first = Path(importlib.util.find_spec("runtime").origin).parents[1]  # the suite as installed
    if not any(Path(p).joinpath("detr-conformance-first.pth").is_file() for p in sys.path):
        pytest.skip(f"the suite at {first} was not installed by make (no detr-conformance-first.pth)")
    for name in ("fixtures", "markers"):
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text("raise ImportError('the PyPI package, not the suite')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q",
                           str(ROOT / "suite" / "test_heads.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "test_postprocess[fp32]" in done.stdout, done.stdout + done.stderr
