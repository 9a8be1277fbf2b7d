"""A CREPE-style pitch estimator, trained here on synthetic harmonic tones: the model of issue 23.

The large pitch tracker users separate reads 1,024 audio samples (64 ms at 16 kHz) as a 1024x1
image: a 512-tap first conv (1 -> 1,024 channels, stride 4), then five 64x1 convs
(1,024 -> 128 -> 128 -> 128 -> 256 -> 512), each with BatchNorm, ReLU and 2x1 max pooling, and
360 sigmoid pitch bins of 20 cents. ``PitchNet(width=0.5)`` halves every width (512 -> 64 -> 64
-> 64 -> 128 -> 256): four times fewer FLOPs, trainable on two cores in minutes, and the first
conv is then a larger share of the model, which makes a FLOP budget harder, not easier.

Tones: f0 log-uniform in 65-1,000 Hz, 1-12 harmonics below Nyquist with random decaying
amplitudes and phases, a little vibrato, white noise at 0-40 dB SNR; each frame normalised to
zero mean and unit variance, as CREPE does. The label of a frame is its f0; the loss is the
cross-entropy of the bins' softmax against a Gaussian (25 cents) around the true pitch (CREPE
uses sigmoids and binary cross-entropy: with those, at lr 1e-3, the half-width net had 6% raw
pitch accuracy after 120 steps; with this loss at lr 3e-3 a quarter-width one had 84% after 60,
and the half-width one 98% after 150), and the estimate
is the probability-weighted mean of the cents around the top bin (CREPE's local average).

Train: .venv/bin/python benchmarks/pitch.py train [--width 0.5] [--steps 3000] [--out benchmarks/pitch_net.safetensors]
Check: .venv/bin/python benchmarks/pitch.py check (raw pitch accuracy of the stored weights on held-out tones)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "benchmarks" / "pitch_net.safetensors"
RATE = 16000
FRAME = 1024
BINS = 360
CENTS = 1997.3794084376191 + 20 * np.arange(BINS)  # bin centres, cents above 10 Hz (C1 = 32.7 Hz upward)
LOW, HIGH = 65.0, 1000.0


class PitchNet(nn.Module):
    """CREPE's layout at ``width`` times its channel counts; input (N, 1, 1024, 1), output (N, 360) bin logits."""

    def __init__(self, width: float = 0.5) -> None:
        super().__init__()
        channels = [int(c * width) for c in (1024, 128, 128, 128, 256, 512)]
        layers = []
        for i, (cin, cout) in enumerate(zip([1, *channels[:-1]], channels)):
            kernel, stride, padding = ((512, 1), (4, 1), (254, 0)) if i == 0 else ((64, 1), (1, 1), (32, 0))
            layers.append(nn.Sequential(
                nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding), nn.ReLU(), nn.BatchNorm2d(cout),
                nn.MaxPool2d((2, 1)),
            ))
        self.convs = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels[-1] * 4, BINS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.convs(x).flatten(1))  # logits over the 360 bins


def tones(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised frames (n, 1, 1024, 1) and their f0 in Hz (n,), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    f0 = np.exp(rng.uniform(math.log(LOW), math.log(HIGH), n))
    t = np.arange(FRAME) / RATE
    vibrato = 1 + rng.uniform(0, 0.01, (n, 1)) * np.sin(2 * np.pi * rng.uniform(3, 7, (n, 1)) * t + rng.uniform(0, 6.3, (n, 1)))
    phase_f0 = 2 * np.pi * np.cumsum(f0[:, None] * vibrato, axis=1) / RATE  # (n, T)
    harmonics = np.arange(1, 13)
    count = rng.integers(1, 13, n)
    decay = rng.uniform(0.3, 1.0, (n, 1)) ** (harmonics[None] - 1)
    amplitude = decay * rng.uniform(0.2, 1.0, (n, 12)) * (harmonics[None] <= count[:, None]) * (harmonics[None] * f0[:, None] < RATE / 2)
    amplitude[:, 0] = np.maximum(amplitude[:, 0], 0.2)  # the fundamental is always there
    phases = rng.uniform(0, 2 * np.pi, (n, 12))
    signal = np.einsum("nh,nht->nt", amplitude, np.sin(harmonics[None, :, None] * phase_f0[:, None, :] + phases[:, :, None]))
    power = signal.var(1, keepdims=True)
    snr = 10 ** (rng.uniform(0, 40, (n, 1)) / 10)
    signal = signal + rng.standard_normal((n, FRAME)) * np.sqrt(power / snr)
    signal = (signal - signal.mean(1, keepdims=True)) / (signal.std(1, keepdims=True) + 1e-8)
    return torch.from_numpy(signal.astype(np.float32)).reshape(n, 1, FRAME, 1), torch.from_numpy(f0.astype(np.float32))


def to_cents(f0: torch.Tensor) -> torch.Tensor:
    return 1200 * torch.log2(f0 / 10)


def targets(f0: torch.Tensor) -> torch.Tensor:
    """CREPE's training targets: a Gaussian of 25 cents around the true pitch, over the 360 bins."""
    centres = torch.from_numpy(CENTS).float()
    return torch.exp(-((centres[None] - to_cents(f0)[:, None]) ** 2) / (2 * 25**2))


def decode(logits: torch.Tensor) -> torch.Tensor:
    """Cents from bin logits: the probability-weighted mean of the nine bins around the top one."""
    activation = logits.softmax(1)
    centres = torch.from_numpy(CENTS).to(activation)
    top = activation.argmax(1)
    window = (top[:, None] + torch.arange(-4, 5, device=activation.device)[None]).clamp(0, BINS - 1)
    weights = activation.gather(1, window)
    return (weights * centres[window]).sum(1) / weights.sum(1).clamp_min(1e-8)


def estimate(model: nn.Module, frames: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The model's pitch in cents for each frame."""
    model.eval()
    with torch.no_grad():
        return torch.cat([decode(model(frames[i : i + batch])) for i in range(0, len(frames), batch)])


def agreement(a: torch.Tensor, b: torch.Tensor, cents: float = 50.0) -> float:
    """Share of frames whose two pitch estimates (cents) are within ``cents`` of each other."""
    return float(((a - b).abs() <= cents).float().mean())


def pitches_kept(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """The task's agreement for convtool's ``--agreement benchmarks/pitch.py:pitches_kept``: frames whose decoded
    pitch (from the bin logits) is within 50 cents of the original's."""
    return agreement(decode(outputs[0].float()), decode(reference[0].float()))


def train(width: float = 0.5, steps: int = 3000, batch: int = 32, seed: int = 0, lr: float = 3e-3, log=print) -> PitchNet:
    """A PitchNet trained on fresh synthetic tones every step (Adam, one-cycle schedule); deterministic for a seed."""
    torch.manual_seed(seed)
    model = PitchNet(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    check_x, check_f0 = tones(512, seed=10_000 + seed)
    start = time.perf_counter()
    for step in range(steps):
        model.train()
        x, f0 = tones(batch, seed=seed * 1_000_003 + step)
        target = targets(f0)
        loss = F.cross_entropy(model(x), target / target.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(steps // 20, 1) == 0:
            rpa = agreement(estimate(model, check_x), to_cents(check_f0))
            log(f"step {step + 1}: loss {loss.item():.4f}, raw pitch accuracy {rpa:.2%} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def load(path: Path = WEIGHTS) -> PitchNet:
    """The stored trained weights (float16 on disk), in a float32 PitchNet of the width they were trained at."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        width = float(f.metadata()["width"])
    model = PitchNet(width)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "check"])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.action == "train":
        from safetensors.torch import save_file

        model = train(args.width, args.steps, args.batch, args.seed, args.lr, log=lambda s: print(s, flush=True))
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(args.out), metadata={"width": str(args.width), "steps": str(args.steps), "seed": str(args.seed)})
        print(f"wrote {args.out}")
    model = load(args.out)
    x, f0 = tones(2000, seed=123_456)
    print(f"raw pitch accuracy (within 50 cents of the true f0) on 2,000 held-out tones: "
          f"{agreement(estimate(model, x), to_cents(f0)):.2%}")


def diagnose(model: nn.Module, frames: int = 64, target: float = 0.25, **options) -> None:
    """Where a FLOP target loses the task: each layer's rank, order, FLOPs and refit error, then the agreement."""
    import convtool

    calibration, _ = tones(frames, seed=777)
    test, _ = tones(1000, seed=123_456)
    start = time.perf_counter()
    result = convtool.separate(model, test[:1], rank=convtool.FlopsTarget(target, sensitivity=options.pop("sensitivity", False)),
                               order=options.pop("order", "auto"), calibration=calibration, **options)
    seconds = time.perf_counter() - start
    print(f"target {target}: FLOPs {result.flops_after / result.flops_before:.3f} of {result.flops_before / 1e6:.0f}M, "
          f"{seconds:.1f} s, agreement within 50 cents {agreement(estimate(result.model, test), estimate(model, test)):.2%}")
    for layer in result.layers:
        print(f"  {layer.name}: {layer.in_channels}->{layer.out_channels} rank {layer.rank} {layer.order}, "
              f"FLOPs {layer.flops_before / 1e6:.1f}M -> {layer.flops_after / 1e6:.2f}M, output error {layer.output_error}")
    for skipped in result.skipped:
        print(f"  dense: {skipped.name}: {skipped.reason}")


if __name__ == "__main__":
    sys.exit(main())
