"""A streaming voice-activity detector with its GRU state as an input, trained here on synthetic audio: issue 34's VAD.

The layout people deploy (Silero VAD): the model sees one chunk of 512 samples (32 ms at
16 kHz) at a time, with the recurrent state it returned for the previous chunk, and returns the
chunk's speech probability and the new state: ``forward(chunk, state) -> (prob, state)``,
``chunk`` (N, 512), ``state`` and the returned state (1, N, 64) as ``nn.GRU`` lays them out.
Inside: a learned filterbank (a Conv1d of one input channel, 64 filters of 128 taps, stride
32: 16 frames a chunk), the log of its magnitude, four Conv1d of kernel 3 (64 -> 128 -> 128 ->
128 -> 128, BatchNorm, ReLU, two of them of stride 2), the mean over the 4 frames left, one
GRU step, a linear head and a sigmoid. Its convs are about 97% of the 1.56M multiply-adds of a
chunk; the four kernel-3 convs, which convtool can separate, 88%.

Audio, 16 kHz: speech-like utterances (0.4-3 s) of syllables at 3-6 a second, each a sawtooth
voice source at a moving f0 (80-300 Hz, drifting and falling through the utterance) through
three formant resonators drawn per syllable, under a raised-cosine envelope, a third of them
led by an unvoiced noise burst (a fricative, 2-7 kHz), separated by pauses of 0.2-2 s; over
them, a mixture of one or two noises (white, pink, brown, mains hum with harmonics, babble of
6-12 continuous speech-like voices) at 0-30 dB SNR (speech power in its utterances against the
noise's), a fifth of the streams noise alone, the whole stream at a random level (-45 to 0 dB).
A chunk is labelled speech when at least half its samples lie inside an utterance (pauses
between syllables included, as human labels have them).

Train: .venv/bin/python benchmarks/vad.py train [--steps 1000] [--out benchmarks/vad_net.safetensors]
Check: .venv/bin/python benchmarks/vad.py check (frame accuracy of the stored weights on held-out streams, chunk by chunk)

The stored weights (``vad_net.safetensors``, float16, 0.44 MB) are ``train --threads 1`` with the
other defaults: 93.4% frame accuracy on 32 held-out 16 s streams (16,000 chunks), run chunk by
chunk with the state carried; 707 s here, on a machine shared with other jobs. Of its 1,049
errors, 594 false alarms and 455 misses, half lie within 100 ms of an utterance's edge. A
first run with 4-7 babble voices and a tenth of the streams noise alone reached 87.6%, its
errors false alarms on babble alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "benchmarks" / "vad_net.safetensors"
RATE = 16000
CHUNK = 512
HIDDEN = 64
HELD_OUT_SEED = 123_456  # the streams a check and the benchmark score on; training and calibration never draw them
CALIBRATION_SEED = 777


class VoiceActivity(nn.Module):
    """One chunk and the GRU state in, the chunk's speech probability and the next state out."""

    def __init__(self, filters: int = 64, channels: int = 128, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.filterbank = nn.Conv1d(1, filters, 128, stride=32, padding=48, bias=False)
        layers: list[nn.Module] = []
        for cin, stride in [(filters, 1), (channels, 2), (channels, 1), (channels, 2)]:
            layers += [nn.Conv1d(cin, channels, 3, stride=stride, padding=1, bias=False), nn.BatchNorm1d(channels), nn.ReLU()]
        self.norm = nn.BatchNorm1d(filters)
        self.encoder = nn.Sequential(*layers)
        self.rnn = nn.GRU(channels, hidden)
        self.head = nn.Linear(hidden, 1)

    def features(self, chunks: torch.Tensor) -> torch.Tensor:
        """(N, 512) chunks -> (N, channels): the conv front end, which needs no state."""
        bands = torch.log(self.filterbank(chunks.unsqueeze(1)).abs() + 1e-4)
        return self.encoder(self.norm(bands)).mean(2)

    def forward(self, chunk: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, state = self.rnn(self.features(chunk).unsqueeze(0), state)
        return torch.sigmoid(self.head(out[0])), state

    def streams(self, audio: torch.Tensor) -> torch.Tensor:
        """Training's shortcut: (B, T*512) streams -> (B, T) logits, every chunk's front end in one batch, zero state."""
        b, t = audio.shape[0], audio.shape[1] // CHUNK
        feats = self.features(audio[:, : t * CHUNK].reshape(b * t, CHUNK)).reshape(b, t, -1)
        out, _ = self.rnn(feats.transpose(0, 1))
        return self.head(out).squeeze(-1).transpose(0, 1)


def _resonate(x: np.ndarray, formants: list[tuple[float, float]]) -> np.ndarray:
    """``x`` through a cascade of two-pole resonators at (centre Hz, bandwidth Hz)."""
    from scipy.signal import lfilter

    for centre, bandwidth in formants:
        r = np.exp(-np.pi * bandwidth / RATE)
        a = [1, -2 * r * np.cos(2 * np.pi * centre / RATE), r * r]
        x = lfilter([1 - r], a, x)
    return x


def _utterance(rng: np.random.Generator, n: int, base_f0: float) -> np.ndarray:
    """Syllables at 3-6 a second, voiced and some led by a fricative, filling ``n`` samples."""
    from scipy.signal import butter, sosfilt

    t = np.arange(n) / RATE
    seconds = n / RATE
    drift = np.cumsum(rng.normal(0, 1, n // 160 + 1))[np.arange(n) // 160] * 0.01  # a slow random walk, in octaves
    f0 = base_f0 * 2 ** (drift - 0.2 * t / max(seconds, 1e-3) + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = np.cumsum(f0) / RATE
    source = 2 * (phase % 1) - 1  # a sawtooth: every harmonic, falling as 1/k
    out = np.zeros(n)
    rate = rng.uniform(3, 6)
    start = 0
    while start < n:
        length = min(int(RATE / rate * rng.uniform(0.7, 1.3)), n - start)
        formants = [(rng.uniform(300, 900), 80), (rng.uniform(900, 2500), 120), (rng.uniform(2400, 3400), 200)]
        piece = _resonate(source[start : start + length], formants)
        envelope = np.sin(np.pi * np.linspace(0, 1, length)) ** rng.uniform(0.5, 2)
        voiced = piece * envelope * rng.uniform(0.4, 1)
        if rng.random() < 0.33:  # a fricative before the vowel
            burst = min(int(rng.uniform(0.03, 0.12) * RATE), length)
            sos = butter(4, [rng.uniform(2000, 4000), 7000], btype="band", fs=RATE, output="sos")
            hiss = sosfilt(sos, rng.normal(0, 1, burst)) * np.hanning(burst) * rng.uniform(0.1, 0.5)
            voiced[:burst] = voiced[:burst] * np.linspace(0, 1, burst) + hiss * voiced.std() / (hiss.std() + 1e-9)
        out[start : start + length] = voiced
        start += length
    return out / (out.std() + 1e-9)


def _coloured(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown), unit variance."""
    spectrum = np.fft.rfft(rng.normal(0, 1, n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spectrum *= 1 / np.maximum(f, 20) ** (exponent / 2)
    x = np.fft.irfft(spectrum, n)
    return x / (x.std() + 1e-9)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """One or two of white, pink, brown, hum and babble, mixed at random weights, unit variance."""
    kinds = rng.choice(["white", "pink", "brown", "hum", "babble"], size=rng.integers(1, 3), replace=False)
    total = np.zeros(n)
    for kind in kinds:
        if kind in ("white", "pink", "brown"):
            x = _coloured(rng, n, {"white": 0, "pink": 1, "brown": 2}[kind])
        elif kind == "hum":
            t = np.arange(n) / RATE
            mains = rng.choice([50.0, 60.0])
            x = sum(rng.uniform(0.1, 1) / k * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 6.3)) for k in range(1, 8))
            x = x + 0.1 * rng.normal(0, 1, n)
        else:
            x = sum(_utterance(rng, n, np.exp(rng.uniform(np.log(80), np.log(300)))) for _ in range(rng.integers(6, 13)))
        total += rng.uniform(0.3, 1) * x / (x.std() + 1e-9)
    return total / (total.std() + 1e-9)


def stream(rng: np.random.Generator, chunks: int) -> tuple[np.ndarray, np.ndarray]:
    """One stream of ``chunks`` * 512 samples and its per-chunk labels (1 speech, 0 not)."""
    n = chunks * CHUNK
    speech, active = np.zeros(n), np.zeros(n, bool)
    if rng.random() >= 0.2:
        at = int(rng.uniform(0.2, 2) * RATE)
        while at < n:
            length = min(int(rng.uniform(0.4, 3) * RATE), n - at)
            speech[at : at + length] = _utterance(rng, length, np.exp(rng.uniform(np.log(80), np.log(300))))
            active[at : at + length] = True
            at += length + int(rng.uniform(0.2, 2) * RATE)
    noise = _noise(rng, n)
    snr_db = rng.uniform(0, 30)
    speech_power = speech[active].var() if active.any() else 1.0
    audio = speech + noise * np.sqrt(speech_power / 10 ** (snr_db / 10))
    audio = audio / (np.abs(audio).max() + 1e-9) * 10 ** (rng.uniform(-45, 0) / 20)
    labels = active.reshape(chunks, CHUNK).mean(1) >= 0.5
    return audio.astype(np.float32), labels.astype(np.float32)


def streams(n: int, seed: int, seconds: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` streams (n, T*512) and their labels (n, T), T = seconds / 32 ms; deterministic for a seed."""
    rng = np.random.default_rng(seed)
    chunks = int(seconds * RATE / CHUNK)
    audio, labels = zip(*(stream(rng, chunks) for _ in range(n)))
    return torch.from_numpy(np.stack(audio)), torch.from_numpy(np.stack(labels))


def zero_state(batch: int = 1) -> torch.Tensor:
    return torch.zeros(1, batch, HIDDEN)


def run(model, audio: torch.Tensor) -> torch.Tensor:
    """Speech probabilities (B, T) of a model run as deployed: chunk by chunk, its state carried.

    ``model(chunk, state) -> (prob, state)`` may be an nn.Module or any callable (an
    onnxruntime session wrapped as one).
    """
    b, t = audio.shape[0], audio.shape[1] // CHUNK
    state, probs = zero_state(b), []
    if isinstance(model, nn.Module):
        model.eval()
    with torch.no_grad():
        for i in range(t):
            prob, state = model(audio[:, i * CHUNK : (i + 1) * CHUNK], state)
            probs.append(torch.as_tensor(prob).reshape(b))
    return torch.stack(probs, 1)


def kept(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of chunks whose decisions (probability > 0.5) agree: the task kept, or the accuracy against 0/1 labels."""
    return float(((a > 0.5) == (b > 0.5)).float().mean())


def calibration(model: nn.Module, n: int = 256, seed: int = CALIBRATION_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` unlabeled (chunk, state) samples: chunks of fresh streams, each with the state ``model`` carried to it.

    The states are what a deployment logging its inputs would record: the model's own, never labels.
    Returns chunks (n, 512) and states (1, n, 64), the batch on dim 1 as ``nn.GRU`` lays it out.
    """
    audio, _ = streams(max(n // 64, 1), seed=seed, seconds=64 * CHUNK / RATE)
    b, t = audio.shape[0], audio.shape[1] // CHUNK
    state, chunks, states = zero_state(b), [], []
    with torch.no_grad():
        for i in range(t):
            chunk = audio[:, i * CHUNK : (i + 1) * CHUNK]
            chunks.append(chunk)
            states.append(state[0])
            _, state = model.eval()(chunk, state)
    order = torch.arange(b * t).reshape(t, b).T.reshape(-1)  # stream by stream
    return torch.cat(chunks)[order][:n], torch.cat(states)[order][:n].unsqueeze(0)


def train(steps: int = 1000, batch: int = 12, seconds: float = 4.0, pool: int = 384, seed: int = 0, lr: float = 3e-3,
          log=print) -> VoiceActivity:
    """A VoiceActivity trained on crops of a pool of 8 s streams (Adam, one-cycle schedule); deterministic for a seed.

    Making audio costs more than a step (babble is many voices), so ``pool`` streams are made
    once and each step reads ``batch`` crops of ``seconds`` from them, at any chunk, each at a
    random level (+-10 dB), its state starting from zero mid-stream as a deployment's may.
    """
    torch.manual_seed(seed)
    model = VoiceActivity()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    audio, labels = streams(pool, seed=seed * 1_000_003 + 1)
    check_audio, check_labels = streams(16, seed=10_000 + seed)
    log(f"made {pool} training streams of 8 s ({time.perf_counter() - start:.0f} s)")
    chunks, total = int(seconds * RATE / CHUNK), labels.shape[1]
    for step in range(steps):
        model.train()
        rows = torch.randint(0, pool, (batch,))
        at = torch.randint(0, total - chunks + 1, (batch,))
        x = torch.stack([audio[r, a * CHUNK : (a + chunks) * CHUNK] for r, a in zip(rows.tolist(), at.tolist())])
        x = x * 10 ** (torch.empty(batch, 1).uniform_(-10, 10) / 20)
        y = torch.stack([labels[r, a : a + chunks] for r, a in zip(rows.tolist(), at.tolist())])
        loss = F.binary_cross_entropy_with_logits(model.streams(x), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(steps // 20, 1) == 0:
            accuracy = kept(run(model, check_audio), check_labels)
            log(f"step {step + 1}: loss {loss.item():.4f}, frame accuracy {accuracy:.2%} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def load(path: Path = WEIGHTS) -> VoiceActivity:
    """The stored trained weights (float16 on disk), in a float32 VoiceActivity."""
    from safetensors.torch import load_file

    model = VoiceActivity()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    """The detector as ONNX, inputs ``chunk`` (1, 512) and ``state`` (1, 1, 64), outputs the probability and
    the new state, through convtool's exporter; returns the path."""
    import convtool

    return Path(str(convtool.export_onnx(model, (torch.zeros(1, CHUNK), zero_state(1)), path)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "check"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--pool", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.action == "train":
        from safetensors.torch import save_file

        start = time.perf_counter()
        model = train(args.steps, args.batch, args.seconds, args.pool, args.seed, args.lr, log=lambda s: print(s, flush=True))
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(args.out), metadata={"steps": str(args.steps), "pool": str(args.pool), "seed": str(args.seed)})
        print(f"wrote {args.out} after {time.perf_counter() - start:.0f} s")
    model = load(args.out)
    audio, labels = streams(32, seed=HELD_OUT_SEED, seconds=16.0)
    print(f"frame accuracy, chunk by chunk with the state carried, on 32 held-out 16 s streams: {kept(run(model, audio), labels):.2%}")


if __name__ == "__main__":
    sys.exit(main())
