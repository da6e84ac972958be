"""A regular (not editable) ``pip install .`` holds everything the plugins import, and declares the
pytest11 entry point that loads the suite before pytest parses its arguments."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
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
