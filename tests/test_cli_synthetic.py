"""``convtool separate --calibration synthetic``: data-free calibration from the command line."""

from pathlib import Path

import torch

from tests.test_cli import arch, project, run  # noqa: F401  (project is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_separate_with_synthetic_calibration_and_distillation(project):  # noqa: F811
    out = project / "small.sep.pt"
    result = run("separate", project / "small.pt", "--arch", arch(project), "--rank", "auto", "--flops-target", "0.5",
                 "--calibration", "synthetic", "--synthetic-samples", "16", "--distill-steps", "3",
                 "--input-shape", "1,3,12,12", "-o", out, cwd=project)
    assert result.exit_code == 0, result.output
    assert "synthesised 16 inputs matching 1 BatchNorms' statistics and confident outputs over 4 classes" in result.stderr
    assert "distilled 3 steps" in result.stderr
    model = torch.load(out, weights_only=False)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 12, 12)).shape == (2, 4)


def test_the_word_wins_over_a_folder_of_that_name_and_says_so(project):  # noqa: F811
    (project / "synthetic").mkdir()
    result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", "synthetic",
                 "--synthetic-samples", "4", "--input-shape", "1,3,8,8", "-o", project / "o.pt", cwd=project)
    assert result.exit_code == 0, result.output
    assert "write ./synthetic" in result.stderr and "synthesised 4 inputs" in result.stderr


def test_options_that_mean_nothing_with_synthetic_data_are_refused(project):  # noqa: F811
    model = project / "small.pt"
    cases = [
        (["--synthetic-samples", "8"], "--synthetic-samples needs --calibration synthetic"),
        (["--calibration", "x.pt", "--synthetic-samples", "8"], "--synthetic-samples needs --calibration synthetic"),
        (["--calibration", "synthetic", "--image-size", "8,8"], "--image-size describes a --calibration folder"),
        (["--calibration", "synthetic", "--mean", "0.5"], "--mean describes a --calibration folder"),
    ]
    for extra, message in cases:
        result = run("separate", model, "--arch", arch(project), *extra, "-o", project / "o.pt", cwd=project)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert not (project / "o.pt").exists()


def test_synthetic_calibration_is_refused_for_onnx_input(project):  # noqa: F811
    (project / "m.onnx").write_bytes(b"not read")
    result = run("separate", project / "m.onnx", "--calibration", "synthetic", cwd=project)
    assert result.exit_code == 2 and "--calibration synthetic" in result.output and "for PyTorch models only" in result.output


def test_a_model_with_nothing_to_synthesise_from_gets_one_line(project):  # noqa: F811
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)), project / "plain.pt")
    result = run("separate", project / "plain.pt", "--allow-pickle", "--calibration", "synthetic", "--input-shape", "1,3,8,8",
                 "-o", project / "o.pt", cwd=project)
    assert result.exit_code == 2
    assert "no BatchNorm statistics" in result.output and "Traceback" not in result.output


def test_the_docs_document_synthetic_calibration():
    cli, api = (ROOT / "docs" / "cli.md").read_text(), (ROOT / "docs" / "python-api.md").read_text()
    assert "--calibration synthetic" in cli and "--synthetic-samples" in cli and "convtool.synthesize(" in api
