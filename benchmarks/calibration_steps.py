"""Where separation with calibration spends its time and memory, step by step, against each step's floor (issue 36).

Run: .venv/bin/python benchmarks/calibration_steps.py [--models pitch-full pitch-half resnet50 digits]
         [--modes flops defaults34] [--code new=. base=/tmp/base36] [--repeat 1]

Each (model, mode, code) runs in its own process (so its peak memory is its own), the codes in
turn for each repeat, so that a loaded machine loads them alike; the table gives medians. A code
is a directory holding a ``convtool`` package (``git archive <commit> convtool | tar -x -C DIR``
gives any commit's). Modes: ``flops`` is ``FlopsTarget(t)`` as today's default plans it;
``defaults34`` is issue 34's coming defaults, ``FlopsTarget(t, sensitivity=True)`` with
``latency_provider="cpu"`` (layers timed on onnxruntime CPU); ``agreement`` is
``AgreementTarget(0.99)`` (a search: up to 8 separations on one costing).

The steps are timed by wrapping the library's functions from here (nothing in the library
changes): each wrapped call's time, less that of the wrapped calls inside it, is its step's
("exclusive"), wall and CPU (``time.process_time``, all threads). Peak memory per step: the
process's resident set, sampled every 5 ms and charged to the step then running. Floors: the
dense model's forward pass over all the calibration batches, the sensitivity runs as that many
forward passes of one batch, and the Gram matrices (X Xᵀ and X Yᵀ, the multiply-adds the refit's
``NormalEquations.add`` asked for) at this machine's measured GEMM speed in float32 and float64.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

# (module, attribute, step): a function or method, wrapped where the code that calls it looks it up.
# Entries missing from a code version are skipped, so one script times old and new code alike.
PATCHES = [
    ("convtool.pytorch.separate", "_prepare", "prepare (copy, bake)"),
    ("convtool.pytorch.separate", "_sites", "find sites"),
    ("convtool.pytorch.dense.DenseModel", "run", "dense run"),
    ("convtool.pytorch.dense.FirstBatch", "__call__", "dense run"),
    ("convtool.pytorch.dense", "model_flops", "FLOP count (fvcore)"),
    ("convtool.plan.costing", "weight_options", "weight errors (SVD)"),
    ("convtool.pytorch.dense.DenseModel", "latency", "layer timing"),
    ("convtool.plan.costing", "output_errors", "output errors"),
    ("convtool.plan.costing", "model_errors", "sensitivity (other)"),
    ("convtool.measure.sensitivity.OutputError", "__init__", "sensitivity runs"),
    ("convtool.measure.sensitivity.OutputError", "__call__", "sensitivity runs"),
    ("convtool.plan.measured", "_refit_alone", "sensitivity refits"),
    ("convtool.pytorch.separate", "make_plan", "plan (knapsack, rest)"),
    ("convtool.pytorch.separate", "copy_model", "reference copy"),
    ("convtool.pytorch.separate", "install", "installs"),
    ("convtool.pytorch.separate", "_prove", "proof"),
    ("convtool.pytorch.separate", "prove", "proof"),
    ("convtool.pytorch.separate", "_calibrate", "refit passes (dense + separated)"),
    ("convtool.recovery.calibrate", "columns", "column building"),
    ("convtool.recovery.equations.NormalEquations", "add", "Gram accumulation"),
    ("convtool.recovery.equations", "solve_normal_equations", "solves"),
    ("convtool.recovery.equations", "_solve_some", "solves"),
    ("convtool.recovery.equations", "solve_family", "solves"),
    ("convtool.recovery.equations", "row_solver", "solves"),
    ("convtool.recovery.row_solves", "_solve_rows", "solves"),
    ("convtool.recovery.equations.NormalEquations", "solve_judged", "judging"),
    ("convtool.recovery.equations.NormalEquations", "relative_error", "judging"),
    ("convtool.recovery.calibrate._Fit", "_install", "refit installs"),
    ("convtool.pytorch.separate", "_describe", "describe layers"),
    ("convtool.search.trials.HeldOut", "measure", "judge held-out (search)"),
    ("convtool.search.trials.HeldOut", "__init__", "judge held-out (search)"),
]
SCOPE = "sensitivity refits"  # steps inside it are charged to it, apart, as "sensitivity refits: <step>"
ORDER = [p[2] for p in PATCHES]
MODELS = ("pitch-full", "pitch-half", "resnet50", "digits")


class Steps:
    """Exclusive wall and CPU time, calls and peak resident memory per step."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self.gram_flops = 0.0
        self.mark = (time.perf_counter(), time.process_time())
        self.running = True
        self.page = os.sysconf("SC_PAGE_SIZE")
        threading.Thread(target=self._sample, daemon=True).start()

    def _charge(self) -> None:
        now = (time.perf_counter(), time.process_time())
        top = self.stack[-1] if self.stack else "other"
        self.wall[top] += now[0] - self.mark[0]
        self.cpu[top] += now[1] - self.mark[1]
        self.mark = now

    def _name(self, step: str) -> str:
        if SCOPE in self.stack and step != SCOPE:
            return f"{SCOPE}: {step}"
        return step

    def wrap(self, fn, step: str, is_method: bool):
        steps = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = steps._name(step)
            if step == "Gram accumulation":
                steps._count_gram(args[0] if is_method else None, args[1], args[2])
            steps._charge()
            steps.stack.append(name)
            steps.calls[name] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                steps._charge()
                steps.stack.pop()

        return timed

    def _count_gram(self, equations, cols, target) -> None:
        b, g, f, length = cols.shape
        n = b * length
        features = f + (getattr(equations, "slots", 0) or 0)
        outputs = target.numel() // max(b * g * length, 1)
        self.gram_flops += 2.0 * g * n * features * (features + outputs)

    def _sample(self) -> None:
        with open("/proc/self/statm") as statm:
            while self.running:
                statm.seek(0)
                rss = int(statm.read().split()[1]) * self.page
                top = self.stack[-1] if self.stack else "other"
                if rss > self.peak[top]:
                    self.peak[top] = rss
                time.sleep(0.005)


def install_patches(steps: Steps) -> None:
    for module_path, attribute, step in PATCHES:
        owner = _resolve(module_path)
        if owner is None or not hasattr(owner, attribute):
            continue
        fn = getattr(owner, attribute)
        setattr(owner, attribute, steps.wrap(fn, step, isinstance(owner, type)))


def _resolve(path: str):
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            owner = getattr(owner, name, None)
            if owner is None:
                return None
        return owner
    return None


def gemm_speed(dtype) -> float:
    """Multiply-adds x2 per second of X Xᵀ for X of 2,048 x 8,192 (a Gram's shape), the best of three."""
    import torch

    x = torch.randn(2048, 8192, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        x @ x.T
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 2048 * 8192 / best


# ---------------------------------------------------------------------------------------------
# One run (in its own process)


def setup(name: str):
    """(model, example inputs, calibration batches tensor, target fraction, order, judge) for a model name."""
    import torch

    sys.path.insert(0, str(HERE))
    if name.startswith("pitch"):
        import pitch

        weights = HERE / ("pitch_net_full.safetensors" if name == "pitch-full" else "pitch_net.safetensors")
        model = pitch.load(weights)
        frames, _ = pitch.tones(64, seed=777)
        test, _ = pitch.tones(1000, seed=123_456)
        reference = pitch.estimate(model, test)

        def judge(separated) -> str:
            return f"{pitch.agreement(pitch.estimate(separated, test), reference):.2%} of 1,000 pitches kept"

        return model, test[:1], frames, 0.25 if name == "pitch-full" else 0.6, "dw-pw", judge
    if name == "resnet50":
        from architectures import resnet50

        torch.manual_seed(0)
        model = resnet50().eval()
        data = torch.randn(256 + 32, 3, 224, 224)
        held = data[256:]
        with torch.no_grad():
            reference = model(held)

        def judge(separated) -> str:
            with torch.no_grad():
                out = separated(held)
            sqnr = 10 * torch.log10(reference.pow(2).sum() / (out - reference).pow(2).sum())
            agree = float((out.argmax(1) == reference.argmax(1)).float().mean())
            return f"SQNR {float(sqnr):.2f} dB, top-1 {agree:.1%} on 32 held-out inputs (random weights)"

        return model, data[:1], data[:256], 0.25, "dw-pw", judge
    if name == "digits":
        from safetensors.torch import load_file

        sys.path.insert(0, str(ROOT / "examples"))
        from digits_cnn import DigitsCNN, load_digits_tensors

        train_x, _, test_x, test_y = load_digits_tensors()
        model = DigitsCNN()
        model.load_state_dict(load_file(str(ROOT / "examples" / "digits_cnn.safetensors")))
        model.eval()

        def judge(separated) -> str:
            with torch.no_grad():
                return f"{float((separated(test_x).argmax(1) == test_y).float().mean()):.2%} test accuracy"

        return model, test_x[:1], train_x[:256], 0.25, "dw-pw", judge
    raise SystemExit(f"unknown model {name}")


def forward_floor(model, data, batch: int = 32) -> tuple[float, float]:
    """Seconds of the dense model over all calibration batches, and of one batch (best of two)."""
    import torch

    best_all, best_one = float("inf"), float("inf")
    with torch.no_grad():
        for _ in range(2):
            start = time.perf_counter()
            for i in range(0, len(data), batch):
                begin = time.perf_counter()
                model(data[i : i + batch])
                if i == 0:
                    best_one = min(best_one, time.perf_counter() - begin)
            best_all = min(best_all, time.perf_counter() - start)
    return best_all, best_one


def worker(name: str, mode: str, out: Path, order: str | None) -> None:
    import torch

    torch.set_num_threads(2)
    import convtool

    model, example, data, target, default_order, judge = setup(name)
    order = order or default_order
    floor_all, floor_one = forward_floor(model, data)
    speeds = {"float32": gemm_speed(torch.float32), "float64": gemm_speed(torch.float64)}
    steps = Steps()
    install_patches(steps)
    options = dict(order=order, calibration=data)
    if mode == "flops":
        rank = convtool.FlopsTarget(target)
    elif mode == "defaults34":
        rank, options["latency_provider"] = convtool.FlopsTarget(target, sensitivity=True), "cpu"
    elif mode == "agreement":
        rank = convtool.AgreementTarget(0.99)
    else:
        raise SystemExit(f"unknown mode {mode}")
    steps._charge()
    steps.wall.clear(), steps.cpu.clear(), steps.peak.clear()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = convtool.separate(model, example, rank=rank, **options)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    steps._charge()
    steps.running = False
    runs = steps.calls.get("sensitivity runs", 0)
    search = getattr(result, "search", None)
    record = dict(
        model=name, mode=mode, order=order, code=str(Path(convtool.__file__).resolve().parents[1]), wall=wall, cpu=cpu,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, steps=dict(steps.wall), cpu_steps=dict(steps.cpu),
        calls=dict(steps.calls), peaks=dict(steps.peak), gram_flops=steps.gram_flops, gemm=speeds,
        forward_all=floor_all, forward_one=floor_one, sensitivity_runs=runs, judged=judge(result.model),
        flops=(result.flops_after / result.flops_before) if result.flops_before else None,
        layers=", ".join(f"{l.name} {l.order} {l.rank}" for l in result.layers),
        trials=len(search.tried) if search is not None else None, threads=torch.get_num_threads(),
    )
    out.write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------
# The driver: paired runs of each code, one table per (model, mode)


def run_one(code: str, name: str, mode: str, tmp: Path, order: str | None) -> dict:
    out = tmp / f"{name}-{mode}-{abs(hash(code))}.json"
    env = dict(os.environ, PYTHONPATH=str(Path(code).resolve()))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, mode, str(out), *([order] if order else [])]
    subprocess.run(command, check=True, env=env, cwd=str(Path(code).resolve()))
    return json.loads(out.read_text())


def table(name: str, mode: str, runs: dict[str, list[dict]]) -> str:
    labels = list(runs)
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    first = runs[labels[0]][0]
    gb = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [f"### {name}, {mode}, order {first['order']}: {first['layers'] or '-'}", ""]
    head = " | ".join(f"{label} s (cpu s) | {label} peak GB" for label in labels)
    lines += [f"| step | {head} | calls ({labels[0]}) |", "|---|" + "---:|---:|" * len(labels) + "---:|"]
    names = [s for s in dict.fromkeys(ORDER + sorted({k for rs in runs.values() for r in rs for k in r["steps"]}))
             if any(s in r["steps"] for rs in runs.values() for r in rs)]
    for step in names:
        cells = []
        for label in labels:
            rs = runs[label]
            cells.append(f"{med(rs, lambda r: r['steps'].get(step, 0.0)):.2f} ({med(rs, lambda r: r['cpu_steps'].get(step, 0.0)):.2f})")
            cells.append(gb(med(rs, lambda r: r['peaks'].get(step, 0))))
        lines.append(f"| {step} | {' | '.join(cells)} | {first['calls'].get(step, '')} |")
    cells = []
    for label in labels:
        rs = runs[label]
        cells += [f"**{med(rs, lambda r: r['wall']):.1f}** ({med(rs, lambda r: r['cpu']):.1f})", f"**{gb(med(rs, lambda r: r['peak_rss']))}**"]
    lines.append(f"| **total** (peak: whole process) | {' | '.join(cells)} | |")
    lines.append("")
    for label in labels:
        r = runs[label][0]
        g32, g64 = r["gemm"]["float32"], r["gemm"]["float64"]
        lines.append(
            f"- {label}: {r['judged']}; FLOPs {r['flops']:.3f}; {r['threads']} threads"
            + (f"; {r['trials']} trials" if r["trials"] is not None else "")
            + f". Floors: forward pass over the {name} calibration data {r['forward_all']:.2f} s (one batch {r['forward_one']:.3f} s;"
            f" x {r['sensitivity_runs']} sensitivity runs = {r['forward_one'] * r['sensitivity_runs']:.2f} s);"
            f" Grams {r['gram_flops'] / 1e12:.3f} TFLOP = {r['gram_flops'] / g32:.2f} s at float32's {g32 / 1e9:.0f} GFLOP/s,"
            f" {r['gram_flops'] / g64:.2f} s at float64's {g64 / 1e9:.0f} GFLOP/s")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="*", default=["flops", "defaults34"], choices=["flops", "defaults34", "agreement"])
    parser.add_argument("--code", nargs="*", default=["new=."], help="LABEL=DIR: a directory holding the convtool to time")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write every run's record here")
    parser.add_argument("--order", help="the pair order for every model (default: the library's, dw-pw; resnet50 dw-pw)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], Path(args.worker[2]), args.worker[3] if len(args.worker) > 3 else None)
    import tempfile

    import torch

    codes = dict(c.split("=", 1) for c in args.code)
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 2 threads; "
          f"load average {load[0]:.1f} at the start; {time.strftime('%Y-%m-%d %H:%M')}\n")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for mode in args.modes:
                runs: dict[str, list[dict]] = {label: [] for label in codes}
                for i in range(args.repeat):
                    order = list(codes.items()) if i % 2 == 0 else list(reversed(codes.items()))
                    for label, code in order:
                        runs[label].append(run_one(code, name, mode, Path(tmp), args.order))
                        records.append(dict(label=label, **runs[label][-1]))
                print(table(name, mode, runs), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
