"""`convtool separate --min-agreement / --min-sqnr`, and `convtool distill`'s refit (issue 23)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import convtool
from convtool.io import write_model

from .test_cli import arch, project, run  # noqa: F401  (project is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_min_sqnr_reports_the_floor_and_what_was_measured(project):
    np.save(project / "images.npy", torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)).numpy())
    result = run("separate", project / "small.pt", "--arch", arch(project), "--min-sqnr", "10", "--order", "auto",
                 "--calibration", project / "images.npy", "--report", project / "r.json", "-o", project / "s.pt")
    assert result.exit_code == 0, result.output
    assert "Searched for the fastest model meeting SQNR >= 10 dB on 16 held-out calibration samples" in result.stderr
    search = json.loads((project / "r.json").read_text())["search"]
    assert search["target"]["type"] == "AgreementTarget" and search["target"]["sqnr_db"] == 10
    assert search["held_out_samples"] == 16 and search["sqnr_db"] >= 10 and search["met"]
    assert search["tried"] and all(set(t) == {"budget", "unit", "flops_fraction", "latency_ratio", "top1_agreement", "sqnr_db", "met"}
                                   for t in search["tried"])


@pytest.mark.parametrize("extra, message", [
    (["--min-agreement", "0.99"], "held-out calibration data: pass calibration"),
    (["--min-agreement", "0.99", "--flops-target", "0.5", "--calibration", "x.npy"], "each choose the ranks: give one"),
    (["--min-agreement", "1.5", "--calibration", "x.npy"], "a top-1 agreement floor is a share in (0, 1]"),
])
def test_bad_budget_options_are_one_line(project, extra, message):
    np.save(project / "x.npy", torch.randn(8, 3, 16, 16).numpy())
    result = run("separate", project / "small.pt", "--arch", arch(project), *[project / e if e == "x.npy" else e for e in extra])
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_no_budget_meeting_the_floor_exits_2_with_one_line(project):
    np.save(project / "images.npy", torch.randn(16, 3, 16, 16).numpy())
    result = run("separate", project / "small.pt", "--arch", arch(project), "--min-sqnr", "120",
                 "--calibration", project / "images.npy", "-o", project / "s.pt")
    assert result.exit_code == 2 and "no budget meets SQNR >= 120 dB" in result.stderr
    assert not (project / "s.pt").exists()


def test_distill_refits_first_unless_told_not_to(project):
    namespace: dict = {}
    from .test_cli import ARCHS

    exec(ARCHS, namespace)
    model = namespace["small"]().eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    write_model(convtool.separate(model, x[:2], rank=1).model, project / "sep.pt", (x[:2],))
    np.save(project / "data.npy", x.numpy())
    common = ["distill", project / "sep.pt", "--allow-pickle", "--teacher", project / "small.pt", "--arch", arch(project),
              "--data", project / "data.npy", "--steps", "1", "--lr", "1e-12", "--workers", "0"]
    refit = run(*common, "-o", project / "refit.pt")
    bare = run(*common, "--no-refit", "-o", project / "bare.pt")
    assert refit.exit_code == 0 and bare.exit_code == 0, refit.output + bare.output
    assert "refit 2 separated layers on the data before the first step" in refit.stderr
    assert "separated layers on the data" not in bare.stderr
    with torch.no_grad():
        error = lambda path: float((torch.load(path, weights_only=False).eval()(x) - model(x)).norm())  # noqa: E731
    assert error(project / "refit.pt") < 0.9 * error(project / "bare.pt")


def test_a_budget_keeps_slower_layers_dense_unless_allowed(project, monkeypatch):
    from convtool.pytorch import dense

    monkeypatch.setattr(dense, "module_latency", lambda module, shape, provider, runs=15: 1.0 if isinstance(module, torch.nn.Conv2d) else 2.0)
    args = ["separate", project / "small.pt", "--arch", arch(project), "--flops-target", "0.5", "--input-shape", "1,3,16,16"]
    refused = run(*args, "-o", project / "a.pt")
    assert refused.exit_code == 2 and "no separated form is faster than the dense conv on CPUExecutionProvider" in refused.stderr
    allowed = run(*args, "--allow-slower", "-o", project / "b.pt", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["layers"]


def test_an_agreement_floor_with_a_latency_cap_and_a_task_measure(project, monkeypatch):
    from convtool.search import fronts

    from .pytorch.test_agreement import _Timing

    monkeypatch.setattr(fronts, "AgainstOriginal", _Timing)
    np.save(project / "images.npy", torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)).numpy())
    (project / "task.py").write_text(
        "def same_sign(reference, outputs):\n"
        "    return float(((reference[0] > 0) == (outputs[0] > 0)).double().mean())\n")
    result = run("separate", project / "small.pt", "--arch", arch(project), "--min-agreement", "0.8", "--agreement",
                 f"{project / 'task.py'}:same_sign", "--latency-target", "0.95", "--calibration", project / "images.npy",
                 "--report", project / "r.json", "-o", project / "s.pt")
    assert result.exit_code == 0, result.output
    search = json.loads((project / "r.json").read_text())["search"]
    assert search["target"]["type"] == "AgreementTarget" and search["target"]["latency"] == 0.95
    assert search["target"]["agreement"] == "same_sign" and search["target"]["minimize"] == "latency"
    assert search["latency"]["ratio"] <= 0.95 * 1.1 and search["top1_agreement"] >= 0.8
    assert "Searched for the fastest model meeting same_sign >= 0.8" in result.stderr
    alone = run("separate", project / "small.pt", "--arch", arch(project), "--agreement", f"{project / 'task.py'}:same_sign",
                "-o", project / "t.pt")
    assert alone.exit_code == 2 and "use them with --min-agreement" in alone.stderr
