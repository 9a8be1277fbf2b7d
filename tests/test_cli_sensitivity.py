"""`--sensitivity` on the command line: accepted where it means something, refused with one line elsewhere."""

import json

import numpy as np
import pytest

from .test_cli import arch, project, run  # noqa: F401  (project is a fixture)


def test_sensitivity_budget_from_the_command_line(project):  # noqa: F811
    np.save(project / "cal.npy", np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    result = run("separate", project / "small.pt", "--arch", arch(project), "--rank", "auto", "--flops-target", "0.5",
                 "--sensitivity", "--calibration", project / "cal.npy", "-o", project / "s.pt", "--json")
    assert result.exit_code == 0, result.output
    totals = json.loads(result.stdout)["totals"]
    assert totals["flops_after"] <= 0.5 * totals["flops_before"] * (1 + 1e-9)


@pytest.mark.parametrize("args,message", [
    ([], "pass calibration"),  # a budget, but nothing to measure the output on
    (["--rank", "2"], "--flops-target"),
    (["--energy", "0.9", "--rank", "auto"], "--flops-target"),
])
def test_sensitivity_without_its_budget_or_data_is_refused(project, args, message):  # noqa: F811
    base = ["separate", project / "small.pt", "--arch", arch(project), "--sensitivity", "-o", project / "s.pt"]
    if not args:
        args = ["--rank", "auto", "--flops-target", "0.5"]
    result = run(*base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (project / "s.pt").exists()
