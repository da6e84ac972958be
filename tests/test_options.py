"""The suite's command line: bad values are usage errors (exit 4) that say what is accepted."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--xpu", "tpu9"], "--xpu 'tpu9' is not a torch device"),
        (["--xpu", "mps"], "device type 'mps' is not available here"),
        (
            ["--xpu-plugin", "torch_nosuchvendor"],
            "--xpu-plugin torch_nosuchvendor: import failed with ModuleNotFoundError",
        ),
        (
            ["--precision", "fp32,fp8"],
            "--precision 'fp32,fp8': expected a comma-separated list of fp32, tf32, amp, fp16, bf16",
        ),
        (["--model-config", "r101"], "--model-config 'r101': expected r50 or tiny"),
        (["--coco-path", "/nonexistent/coco"], "--coco-path '/nonexistent/coco': no such folder"),
        (["--inject-fault", "aten.softmax:wobble"], "unknown kind 'wobble'"),
        (["--inject-fault", "softmax:nan"], "must be <namespace>.<op>[.<overload>]"),
        (["--inject-fault", "aten.exp:ulp=-1"], "ulp must not be negative"),
        (["--image-size", "800"], "--image-size '800': expected SHORT,MAX in pixels with 32 <= SHORT <= MAX"),
        (["--image-size", "1333,800"], "--image-size '1333,800': expected SHORT,MAX"),
        (["--image-size", "16,16"], "--image-size '16,16': expected SHORT,MAX"),
        (["--batch-size", "0"], "--batch-size '0': expected an integer >= 1, e.g. 2"),
        (["--image-size", "256,256"], "--image-size '256,256': with 2 images SHORT must be below MAX"),
        (["-m", "xpu and 3x8"], "3x8"),
        (["--compile", "nosuchbackend"], "--compile 'nosuchbackend': unknown backend; torch.compile knows"),
        (["--compile-mode", "max-autotune"], "--compile-mode needs --compile BACKEND"),
        (["--compile-no-bisect"], "--compile-no-bisect needs --compile BACKEND"),
        (["--sign-off", "--seeds", "3"], "--sign-off needs --seeds 5 or more"),
        (["--compile", "aot_eager", "--compile-bisect-passes"], "bisects Inductor's passes; the backend is"),
        (["--compile", "inductor", "--compile-options", "max_autotune"], "expected KEY=VALUE"),
        (["--inject-fault", "compiled.softmax:dtype=bf16"], "a graph fault needs --compile BACKEND"),
        (["--compile", "inductor", "--inject-fault", "compiled.softmax:dtype=fp8"], "dtype must be one of"),
    ],
)
def test_bad_values_are_usage_errors(args, message):
    result = pytest_run(*args)
    assert result.returncode == 4, result.stdout + result.stderr
    assert message in result.stderr


def test_markers_registered_by_plugins_are_accepted():
    result = pytest_run("-m", "hypothesis")
    assert result.returncode == 0, result.stdout + result.stderr


def test_topology_markers_select_by_expression():
    result = pytest_run("-m", "training and 2x8")
    assert result.returncode in (0, 5), result.stderr
    assert "error" not in result.stderr.lower()


def test_node_ids_do_not_depend_on_the_start_folder(tmp_path):
    from_root = pytest_run("-m", "parity", "--model-config", "tiny", "suite/test_heads.py")
    from_suite = pytest_run("-m", "parity", "--model-config", "tiny", "test_heads.py", cwd=ROOT / "suite")
    assert from_root.returncode == from_suite.returncode == 0, from_root.stderr + from_suite.stderr
    ids = [line for line in from_root.stdout.splitlines() if "::" in line]
    assert ids and ids == [line for line in from_suite.stdout.splitlines() if "::" in line]
    assert ids[0].startswith("suite/test_heads.py::")


def test_path_options_take_their_value_after_a_space(tmp_path):
    """pytest settles its rootdir before it knows the suite's options; an existing folder or file
    given as an option's value after a space must not become the rootdir or a test path."""
    curve = tmp_path / "curve.json"
    curve.write_text('{"curves": [[{"samples": 8, "mAP": 0.1}]]}')
    result = pytest_run("-m", "xpu", "--model-config", "tiny", "--report-dir", str(tmp_path),
                        "--reference-curve", str(curve), "--expectations", str(tmp_path / "none.txt"))
    assert result.returncode == 4 and "--expectations" in result.stdout + result.stderr, result.stdout + result.stderr
    result = pytest_run(
        "-m", "xpu", "--model-config", "tiny", "--report-dir", str(tmp_path), "--reference-curve", str(curve)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "suite/test_backbone.py::test_backbone[fp32]" in result.stdout
    assert "16/" in result.stdout.splitlines()[-1]  # 12 parts, 2 steps eager and 2 compiled


def test_the_suite_is_a_pytest_plugin_when_installed():
    from importlib import metadata

    eps = metadata.entry_points()
    group = eps.select(group="pytest11") if hasattr(eps, "select") else eps.get("pytest11", [])
    assert any(ep.value == "markers.conformance" for ep in group), "pip install -e . registers the pytest11 entry point"


def test_precisions_and_model_configs_are_written_once():
    from detr import config
    from markers import plugin
    from parity import precision
    from runtime import precision as names
    from training import train

    assert plugin.PRECISIONS is precision.PRECISIONS is names.PRECISIONS and set(train.AUTOCAST) == set(
        names.PRECISIONS
    )
    assert plugin.MODEL_CONFIGS == tuple(config.CONFIGS) == ("r50", "tiny")


@pytest.mark.parametrize("layout, message", [
    ("file", "cannot write the reports there"),
    ("under-file", "cannot write the reports there"),
    ("json-dir", "parity.json is a folder, where the report file goes"),
])
def test_a_report_dir_that_cannot_hold_the_reports_is_refused_before_any_test(tmp_path, layout, message):
    (tmp_path / "f").write_text("")
    target = {"file": tmp_path / "f", "under-file": tmp_path / "f" / "reports", "json-dir": tmp_path / "r"}[layout]
    if layout == "json-dir":
        (target / "parity.json").mkdir(parents=True)
    result = pytest_run(f"--report-dir={target}", "suite/test_heads.py")
    assert result.returncode == 4 and message in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize("args, message", [
    (["--node-rank", "5"], "--node-rank 5: the topology markers (at most 2 nodes, 2x8) has node ranks 0..1"),
    (["--node-rank", "2", "--nnodes", "2"], "--node-rank 2: --nnodes 2 has node ranks 0..1"),
    (["--train-arg=--nnodes=3"], "--train-arg --nnodes=3: python -m training.train says: "
                                 "python -m training.train: error: unrecognized arguments: --nnodes=3"),
    (["--train-arg=--batch-size=x"], "argument --batch-size: invalid int value: 'x'"),
])
def test_topology_and_trainer_arguments_are_checked_at_start(args, message):
    result = pytest_run("-m", "training and 2x8", *args)
    assert result.returncode == 4 and message in result.stderr, result.stdout + result.stderr


def test_repeated_precisions_run_once():
    result = pytest_run("--precision", "fp32,fp32", "suite/test_heads.py")
    assert result.returncode == 0 and "[fp32_0]" not in result.stdout and "[fp32]" in result.stdout, result.stdout
