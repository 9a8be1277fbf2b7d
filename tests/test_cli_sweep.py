"""`convtool sweep`: the trade-off over FLOP budgets, written as sweep.json, sweep.md and sweep.png (issue 25)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .test_cli import arch, digest, project, run  # noqa: F401  (project is a fixture)

ROOT = Path(__file__).resolve().parents[1]
POINT_FIELDS = {"target", "flops_fraction", "flops", "params", "latency_ms", "speedup", "top1_agreement", "sqnr_db", "metric",
                "layers", "budget_met", "seconds"}
METRIC = '''
def mean_top(model, data):
    images, labels = data
    assert labels.dtype.is_floating_point is False  # dtypes kept: labels stay integers
    return float(model(images).max(1).values.mean())
'''


def sweep_args(project, *extra):
    return ("sweep", project / "small.pt", "--arch", arch(project), "--targets", "0.5,0.25", "--exporter", "torchscript",
            "--runs", "5", *extra)


def test_sweep_writes_json_markdown_and_a_png(project):
    g = torch.Generator().manual_seed(0)
    np.save(project / "images.npy", torch.randn(64, 3, 16, 16, generator=g).numpy())
    np.savez(project / "test.npz", images=torch.randn(20, 3, 16, 16, generator=g).numpy(), labels=np.arange(20) % 4)
    (project / "metrics.py").write_text(METRIC)
    inputs = [digest(project / n) for n in ("small.pt", "images.npy", "test.npz")]
    result = run(*sweep_args(project, "--calibration", project / "images.npy", "--metric", f"{project / 'metrics.py'}:mean_top",
                             "--metric-data", project / "test.npz", "-o", project / "out"))
    assert result.exit_code == 0, result.output
    assert [digest(project / n) for n in ("small.pt", "images.npy", "test.npz")] == inputs
    report = json.loads((project / "out" / "sweep.json").read_text())
    assert set(report) == {"schema_version", "flops_unit", "input_shapes", "provider", "runs", "threads", "judged_on",
                           "metric_name", "measure", "seconds", "original", "points"}
    assert report["metric_name"] == report["measure"] == "mean_top" and report["input_shapes"] == [[1, 3, 16, 16]]
    assert report["provider"] == "CPUExecutionProvider" and report["runs"] == 5
    assert report["judged_on"].startswith("16 held-out calibration samples")
    assert set(report["original"]) == POINT_FIELDS and all(set(p) == POINT_FIELDS for p in report["points"])
    assert [p["target"] for p in report["points"]] == [0.5, 0.25]
    assert report["original"]["speedup"] == 1.0 and report["original"]["sqnr_db"] is None
    assert all((p["flops_fraction"] <= p["target"] + 1e-9) == p["budget_met"] and p["metric"] is not None for p in report["points"])
    assert report["points"][1]["budget_met"] is False  # this small net cannot reach a quarter of its FLOPs: said so
    markdown = (project / "out" / "sweep.md").read_text()
    assert "| mean_top |" in markdown and "| original |" in markdown and "| 0.25 (not reached) |" in markdown
    assert markdown in result.stdout  # the table printed is the one written
    assert "sweep: step 4/4: timing 3 ONNX files" in result.stderr  # progress on stderr
    pytest.importorskip("matplotlib")
    png = (project / "out" / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a drawn figure, not an empty file
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (900, 360)


def test_without_matplotlib_the_png_is_skipped_with_a_line_saying_how_to_get_it(project, monkeypatch):
    from convtool.report import sweep as report

    monkeypatch.setattr(report, "plot_available", lambda: False)
    result = run(*sweep_args(project, "--input-shape", "1,3,16,16", "-o", project / "out"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (project / "out").iterdir()) == ["sweep.json", "sweep.md"]
    assert "sweep.png not drawn: matplotlib is not installed (pip install 'convtool[plot]')" in result.stderr


@pytest.mark.parametrize("targets", ["0.5,x", "0.5,1.5", "0", "", "0.5,0.5"])
def test_a_bad_targets_value_is_one_line_and_exit_2(project, targets):
    result = run("sweep", project / "small.pt", "--arch", arch(project), "--targets", targets, "-o", project / "out")
    assert result.exit_code == 2 and "--targets" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (project / "out").exists()  # refused before any work


def test_existing_sweep_files_are_not_overwritten_without_force(project):
    (project / "out").mkdir()
    (project / "out" / "sweep.md").write_text("mine")
    result = run(*sweep_args(project, "--input-shape", "1,3,16,16", "-o", project / "out"))
    assert result.exit_code == 2 and "sweep.md exists; pass --force to overwrite it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and (project / "out" / "sweep.md").read_text() == "mine"
    assert sorted(p.name for p in (project / "out").iterdir()) == ["sweep.md"]
    forced = run(*sweep_args(project, "--input-shape", "1,3,16,16", "-o", project / "out", "--force"))
    assert forced.exit_code == 0, forced.output
    assert (project / "out" / "sweep.md").read_text().startswith("# Trade-off: small.pt")


@pytest.mark.parametrize("extra, message", [
    (["--metric-data", "x.npz"], "--metric-data needs --metric"),
    (["--sensitivity"], "sensitivity measures errors at the model's output on calibration data: pass calibration"),
    (["--metric", "nowhere.py:fn"], "--metric file nowhere.py does not exist"),
    (["--provider", "tensorrt"], "cannot time on 'tensorrt'"),
])
def test_bad_options_are_one_line(project, extra, message):
    result = run(*sweep_args(project, "-o", project / "out", *extra), cwd=project)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_output_that_is_a_file_is_refused(project):
    (project / "out").write_text("a file")
    result = run(*sweep_args(project, "-o", project / "out"))
    assert result.exit_code == 2 and "is a file; give a folder" in result.stderr


@pytest.mark.slow
def test_the_digits_example_writes_the_three_files(tmp_path):
    examples = ROOT / "examples"
    result = run("sweep", examples / "digits_cnn.safetensors", "--arch", f"{examples / 'digits_cnn.py'}:DigitsCNN",
                 "--calibration", examples / "digits_train_images.npy", "--metric", f"{examples / 'digits_metric.py'}:accuracy",
                 "--metric-data", examples / "digits_test.npz", "--targets", "0.5,0.25", "-o", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert report["original"]["metric"] == pytest.approx(0.9933, abs=1e-4)  # the example's 99.33% test accuracy
    assert all(p["budget_met"] and p["metric"] > 0.97 for p in report["points"])
    assert (tmp_path / "sweep" / "sweep.md").read_text().count("\n| ") == 5  # header, rule, original, two targets
    pytest.importorskip("matplotlib")
    assert (tmp_path / "sweep" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
