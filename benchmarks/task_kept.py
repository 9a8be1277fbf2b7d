"""The task kept and the speed bought: issue 34's two trained models separated as users would, both front ends.

For the CTC text reader (``benchmarks/ocr.py``) and the streaming voice-activity detector
(``benchmarks/vad.py``), each at FLOP targets (``rank=convtool.FlopsTarget(f)``) and at an
agreement floor (``rank=convtool.AgreementTarget(...)``), through the PyTorch front end
(``convtool.separate`` on the module) and the ONNX front end (``convtool.separate_onnx`` on the
module's export), calibration only: at most 256 unlabeled samples, drawn apart from the held-out
ones (the VAD's are chunks with the states the original carried to them, no labels). Reported:

- task kept: held-out lines the separated model reads exactly as the original does (greedy
  CTC); held-out chunks whose decision (probability > 0.5) it keeps, run stream by stream,
  chunk by chunk, its own state carried;
- accuracy: the separated model's exact strings / frame accuracy against the truth;
- SQNR of the task output (the reader's logits, the detector's probabilities) on the held-out set;
- speed-up on onnxruntime CPU (``--threads``, 1 by default; batch 1), with the 1-minute load average
  when it was taken: PyTorch, ``convtool.benchmark`` (both exported as ``export_onnx`` ships them,
  timed interleaved, medians); ONNX, the original file and the separated one, round-robin
  sessions, medians (``convtool.measure.onnxrt.time_sessions``, what ``OnnxSeparation.timed`` uses).

Calibration is passed as a user would first pass it (one tensor; for the detector one tuple of
chunks (256, 512) and states (1, 256, 64)) and, where convtool refuses that, in the other form
both front ends document, a list of (chunks, states) batches; the ``calibration`` column says
which form the row's figures come from, the note why an earlier one failed.

``--min-agreement A`` asks ``AgreementTarget(top1=A, agreement=measure)`` with the task's own
measure, as a user who knows their task would: the reader's ``strings_identical`` (held-out
calibration lines read exactly as the original reads them), the detector's ``decisions_kept``
(held-out calibration chunks whose decision the separated model keeps, each from the state the
original carried to it). The search returns the fastest plan measured on onnxruntime CPU that
keeps the floor on the quarter of the calibration data it holds out; this table then judges
that model on the held-out set, which the search never saw.
A run convtool refuses today is a row saying ``fails today: <reason>``; nothing is worked
around inside convtool.

Run:  .venv/bin/python benchmarks/task_kept.py [--models ocr,vad] [--targets 0.75,0.5,0.35]
      [--min-agreement 0.99] [--runs 300] [--threads 1] [--front-ends pytorch,onnx]
One onnxruntime thread by default: on the shared 2-core machine this was written on, two threads
timed the reader's original at 16-19 ms against 2.9 ms idle, and its speed-up at 0.35 of the
FLOPs anywhere from 1.1x to 7.4x, while one thread, in the same minutes (load 9.5), gave
3.0-3.8 ms and 1.98-2.03x in three repeats. Use ``--threads 2`` only when the load column is near 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import ocr  # beside this file: run as a script, its folder is first on sys.path
import vad



def strings_identical(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """The reader's agreement: held-out lines read exactly as the original reads them (greedy CTC)."""
    return ocr.same(ocr.decode(outputs[0]), ocr.decode(reference[0]))


def decisions_kept(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """The detector's agreement: chunks whose speech decision (probability > 0.5) is the original's."""
    return vad.kept(outputs[0].reshape(-1), reference[0].reshape(-1))


def _sqnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    error = float((reference - other).norm())
    return float("inf") if error == 0 else 20 * np.log10(float(reference.norm()) / error)


def _session(path: Path, threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _time_files(original: Path, separated, feeds: list[np.ndarray], runs: int, threads: int):
    """The original file and the separated session timed round-robin on onnxruntime CPU, medians (convtool's timer)."""
    import convtool
    from convtool.measure.onnxrt import time_sessions

    sessions = [_session(original, threads), separated]
    names = [i.name for i in separated.get_inputs()]
    original_ms, separated_ms = time_sessions(sessions, dict(zip(names, feeds)), runs, warmup=10)
    return convtool.Benchmark("CPUExecutionProvider", original_ms, separated_ms, runs, threads)


class Reader:
    """The text reader's task: lines read, identically or against the truth."""

    name, title = "ocr", "CTC text reader (benchmarks/ocr.py, input 1x1x32x128)"
    agreement = staticmethod(strings_identical)

    def __init__(self, held_out: int, samples: int) -> None:
        self.model = ocr.load()
        self.images, self.truth = ocr.lines(held_out, seed=ocr.HELD_OUT_SEED)
        self.calibration, _ = ocr.lines(samples, seed=ocr.CALIBRATION_SEED)  # the strings are thrown away
        self.example = (self.calibration[:1],)

    def calibration_for(self, front_end: str, batch: int | None) -> list[tuple[str, object]]:
        """The forms to pass the calibration lines in, tried in turn: here one tensor (or array)."""
        return [("one tensor", self.calibration if front_end == "pytorch" else self.calibration.numpy())]

    def outputs(self, model) -> tuple[list[str], torch.Tensor]:
        """Readings and logits of a module or an onnxruntime session on the held-out lines."""
        if isinstance(model, torch.nn.Module):
            with torch.no_grad():
                logits = torch.cat([model.eval()(self.images[i : i + 100]) for i in range(0, len(self.images), 100)])
        else:
            name, batch = model.get_inputs()[0].name, model.get_inputs()[0].shape[0]
            step = batch if isinstance(batch, int) else 100
            logits = torch.cat([torch.from_numpy(model.run(None, {name: self.images[i : i + step].numpy()})[0])
                                for i in range(0, len(self.images), step)])
        return ocr.decode(logits), logits

    def kept(self, a: list[str], b: list[str]) -> float:
        return ocr.same(a, b)

    def accuracy(self, a: list[str]) -> float:
        return ocr.same(a, self.truth)

    def export(self, model, path: Path) -> Path:
        return ocr.export(model, path)


class Detector:
    """The detector's task: chunk decisions kept, or against the labels, its state carried chunk by chunk."""

    name, title = "vad", "streaming VAD, state in and out (benchmarks/vad.py, chunk 1x512, state 1x1x64)"
    agreement = staticmethod(decisions_kept)

    def __init__(self, held_out: int, samples: int) -> None:
        self.model = vad.load()
        self.audio, self.labels = vad.streams(held_out, seed=vad.HELD_OUT_SEED, seconds=16.0)
        self.chunks, self.states = vad.calibration(self.model, samples)
        self.example = (self.chunks[:1], self.states[:, :1])

    def calibration_for(self, front_end: str, batch: int | None) -> list[tuple[str, object]]:
        """The forms to pass the (chunk, state) samples in, tried in turn.

        First one tuple (chunks (256, 512), states (1, 256, 64)), the form both front ends document
        for a model's several inputs, as a user would first try it; the state's batch is on dim 1,
        as ``nn.GRU`` lays it out. Then a list of batches, each a (chunks, states) pair of
        ``batch`` samples (32; the graph's batch where its export fixes one), the other documented form.
        """
        whole = (self.chunks, self.states) if front_end == "pytorch" else (self.chunks.numpy(), self.states.numpy())
        size = batch or 32
        batches = [(self.chunks[i : i + size], self.states[:, i : i + size]) for i in range(0, len(self.chunks), size)]
        return [("one tuple", whole), (f"batches of {size}", batches)]

    def outputs(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(model, torch.nn.Module):
            model = _stepper(model)
        probs = vad.run(model, self.audio)
        return probs, probs

    def kept(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return vad.kept(a, b)

    def accuracy(self, a: torch.Tensor) -> float:
        return vad.kept(a, self.labels)

    def export(self, model, path: Path) -> Path:
        return vad.export(model, path)


def _stepper(session):
    """An onnxruntime session as ``(chunk, state) -> (prob, state)``, one stream at a time where its batch is fixed."""
    names = [i.name for i in session.get_inputs()]
    fixed = session.get_inputs()[0].shape[0]

    def step(chunk, state):
        chunk, state = np.asarray(chunk, np.float32), np.asarray(state, np.float32)
        if not isinstance(fixed, int) or fixed == chunk.shape[0]:
            prob, new = session.run(None, {names[0]: chunk, names[1]: state})
            return torch.from_numpy(prob), torch.from_numpy(new)
        outs = [session.run(None, {names[0]: chunk[i : i + 1], names[1]: state[:, i : i + 1]}) for i in range(chunk.shape[0])]
        return torch.from_numpy(np.concatenate([o[0] for o in outs])), torch.from_numpy(np.concatenate([o[1] for o in outs], 1))

    return step


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"fails today: {type(error).__name__}: {text if len(text) <= 160 else text[:157] + '...'}"


def measure(task, front_end: str, rank, reference, original_file: Path, runs: int, threads: int, tmp: Path) -> dict:
    """One separation of ``task.model`` at ``rank`` through one front end, judged and timed; a failure is a row too."""
    import convtool
    import onnx

    row = {"front end": front_end, "rank": _rank_words(rank)}
    fixed = _session(original_file).get_inputs()[0].shape[0] if front_end == "onnx" else None
    failed: list[str] = []
    for form, calibration in task.calibration_for(front_end, fixed if isinstance(fixed, int) else None):
        start = time.perf_counter()
        try:
            if front_end == "pytorch":
                result = convtool.separate(task.model, task.example, rank=rank, calibration=calibration)
                seconds = time.perf_counter() - start
                separated = result.model
                timing = convtool.benchmark(task.model, separated, task.example, provider="cpu", runs=runs, threads=threads)
            else:
                feeds = [t.numpy() for t in task.example]
                result = convtool.separate_onnx(original_file, feeds, rank=rank, calibration=calibration)
                seconds = time.perf_counter() - start
                path = tmp / f"{task.name}-{row['rank'].replace(' ', '')}.separated.onnx"
                onnx.save(result.model, str(path))
                separated = _session(path, threads)
                timing = _time_files(original_file, separated, feeds, runs, threads)
            break
        except Exception as error:  # noqa: BLE001 - every refusal today is a finding to record, not to hide
            failed.append((form, _one_line(error)))
    else:
        if len({reason for _, reason in failed}) == 1:
            return row | {"note": failed[0][1], "seconds": time.perf_counter() - start}
        return row | {"note": "; ".join(f"calibration as {form}: {reason}" for form, reason in failed),
                      "seconds": time.perf_counter() - start}
    decisions, raw = task.outputs(separated)
    search = getattr(result, "search", None)
    note = "; ".join([*(f"calibration as {form}: {reason}" for form, reason in failed),
                      *([] if result.budget_met in (None, True) else ["budget not met"])])
    if search is not None and getattr(search, "met", True) is False:
        note += ("; " if note else "") + f"search not met: {search.reason}"
    if search is not None:
        kept = f"{search.top1_agreement:.2%} kept" if search.top1_agreement is not None else ""
        timed = f", {search.latency.speedup:.2f}x faster" if search.latency is not None else ""
        note += ("; " if note else "") + (f"the search's pick, measured on {search.samples} held-out calibration samples: "
                                          f"{kept}, SQNR {search.sqnr_db:.1f} dB{timed}; {len(search.tried)} plans tried")
    flops = (result.flops_after / result.flops_before) if result.flops_before else None
    return row | {
        "calibration": form,
        "FLOPs": f"{flops:.3f}" if flops else "-",
        "layers separated": len(result.layers),
        "task kept": f"{task.kept(decisions, reference[0]):.2%}",
        "accuracy": f"{task.accuracy(decisions):.2%}",
        "SQNR dB": f"{_sqnr(reference[1], raw):.1f}",
        "original ms": f"{timing.original_ms:.3f}",
        "separated ms": f"{timing.separated_ms:.3f}",
        "speed-up": f"{timing.speedup:.2f}x",
        "load": f"{os.getloadavg()[0]:.1f}",
        "seconds": seconds,
        "note": note,
    }


def _rank_words(rank) -> str:
    import convtool

    if isinstance(rank, convtool.FlopsTarget):
        return f"FlopsTarget({rank.fraction:g}" + (", sensitivity=False)" if rank.sensitivity is False else ")")
    return f"AgreementTarget({rank.floors()})"


COLUMNS = ["front end", "rank", "calibration", "FLOPs", "layers separated", "task kept", "accuracy", "SQNR dB", "original ms",
           "separated ms", "speed-up", "load", "seconds", "note"]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if c == "seconds" and c in row else str(row.get(c, "-")) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ocr,vad")
    parser.add_argument("--targets", default="0.75,0.5,0.35", help="FLOP fractions")
    parser.add_argument("--min-agreement", type=float, default=None,
                        help="also AgreementTarget(top1=A) with the task's own agreement measure")
    parser.add_argument("--sensitivity", choices=["model", "layer"], default="model",
                        help="FLOP targets weigh a layer's options by the error at the model's output (the default) "
                             "or at the layer's own output (sensitivity=False)")
    parser.add_argument("--front-ends", default="pytorch,onnx")
    parser.add_argument("--runs", type=int, default=300, help="timed runs of each model, interleaved")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads for the timing (1: see the docstring; 2 on an idle machine)")
    parser.add_argument("--samples", type=int, default=256, help="unlabeled calibration samples (at most 256)")
    parser.add_argument("--ocr-lines", type=int, default=1000, help="held-out lines")
    parser.add_argument("--vad-streams", type=int, default=32, help="held-out 16 s streams")
    args = parser.parse_args()
    import convtool
    import onnxruntime

    torch.set_num_threads(2)
    torch.manual_seed(0)
    ranks = [convtool.FlopsTarget(float(f), sensitivity=None if args.sensitivity == "model" else False)
             for f in args.targets.split(",") if f]
    load_before = os.getloadavg()
    print(f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`  ")
    print(f"Machine: {platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, {torch.get_num_threads()} torch threads, onnxruntime {args.threads} threads; "
          f"load average {load_before[0]:.2f} at the start  ")
    print(f"convtool: {Path(convtool.__file__).parent}  ")
    print(f"Date: {datetime.date.today().isoformat()}")
    with tempfile.TemporaryDirectory(prefix="task-kept-") as tmp:
        for name in args.models.split(","):
            task = {"ocr": Reader, "vad": Detector}[name](
                args.ocr_lines if name == "ocr" else args.vad_streams, min(args.samples, 256))
            original_file = task.export(task.model, Path(tmp) / f"{name}.onnx")
            reference = task.outputs(task.model)
            onnx_reference = task.outputs(_session(original_file))
            model_ranks = ranks + ([convtool.AgreementTarget(top1=args.min_agreement, agreement=task.agreement)]
                                   if args.min_agreement is not None else [])
            rows = [measure(task, front_end, rank, reference if front_end == "pytorch" else onnx_reference, original_file,
                            args.runs, args.threads, Path(tmp))
                    for front_end in args.front_ends.split(",") for rank in model_ranks]
            held = (f"{len(task.truth)} held-out lines" if name == "ocr"
                    else f"{task.labels.shape[0]} held-out 16 s streams, {task.labels.numel()} chunks")
            print(f"\n### {task.title}\n")
            print(f"Original: accuracy {task.accuracy(reference[0]):.2%} (PyTorch), {task.accuracy(onnx_reference[0]):.2%} "
                  f"(its ONNX export, onnxruntime) on {held}; the ONNX rows are judged against the export's outputs. "
                  f"Calibration: {min(args.samples, 256)} unlabeled samples.\n")
            print(table(rows), flush=True)
    load_after = os.getloadavg()
    print(f"\nLoad average {load_before[0]:.2f} at the start, {load_after[0]:.2f} at the end (1-minute).")


if __name__ == "__main__":
    sys.exit(main())
