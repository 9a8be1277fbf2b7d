"""A CRNN text reader with a CTC head, trained here on rendered strings: issue 34's OCR test model.

The layout of CRNN (Shi et al., 2015), the reader behind most deployed line recognisers and
captcha solvers: seven 3x3 convs (64-128-256-256-512-512-512 channels) with BatchNorm and
ReLU, pooled 2x2 twice and then on the height only, so a 32-pixel line becomes one row of
W/4 columns; a bidirectional LSTM over the columns; a linear head giving each column's
logits over the alphabet and the CTC blank (class 0). ``TextReader(width=0.5)`` halves every
conv's channels (32 ... 256), trainable on two cores in minutes; at the benchmark input,
(1, 1, 32, 128), its convs are about 94% of the multiply-adds (202M of 215M) and the LSTM
reads 32 columns.

Strings: 4-10 symbols of a 33-symbol alphabet (digits and capitals without I, O and Q, as VINs
and many plates leave them out: a 0 and an O differ by a font's whim), rendered with PIL in
15 of the TrueType fonts matplotlib ships (DejaVu Sans/Serif/Mono, STIX, Computer Modern; bold
and italic kinds) at 20-35 pt, rotated up to 3 degrees, squeezed or stretched by 0.8-1.25,
scaled to 60-95% of the line's height and placed anywhere on a 32x128 line, blurred in a third
of the lines, light on dark or dark on light at any two grey levels 0.35 apart or more, with
Gaussian noise up to 0.08. A line is normalised to zero mean and unit variance per image.
A reading is the greedy CTC decode: each column's top class, repeats merged, blanks dropped.

Training reads fresh lines every step (CTC loss, Adam, one-cycle at 2e-3, batch 32). Calibration
lines (``CALIBRATION_SEED``) may repeat training strings, as a user calibrates on training images;
the held-out lines (``HELD_OUT_SEED``) are drawn by no training step.

Train: .venv/bin/python benchmarks/ocr.py train [--width 0.5] [--steps 2400] [--out benchmarks/ocr_net.safetensors]
Check: .venv/bin/python benchmarks/ocr.py check (exact strings of the stored weights on held-out lines)

The stored weights (``ocr_net.safetensors``, float16, 3.9 MB) are ``train`` with its defaults:
98.0% exact strings on 1,000 held-out lines (92.6% after 1,000 steps, 97.6% after 1,600). About
0.3 s a step on two idle cores (some 13 minutes); this run took 78 minutes on a machine shared
with other jobs (load 4-7).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "benchmarks" / "ocr_net.safetensors"
HEIGHT, WIDTH = 32, 128
ALPHABET = "0123456789ABCDEFGHJKLMNPRSTUVWXYZ"  # class i + 1 is ALPHABET[i]; class 0 is the CTC blank
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
         "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
         "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmtt10.ttf", "cmss10.ttf")
HELD_OUT_SEED = 123_456  # the lines a check and the benchmark score on; training and calibration never draw them
CALIBRATION_SEED = 777


class TextReader(nn.Module):
    """CRNN at ``width`` times its conv channels; input (N, 1, 32, W), output (N, W/4, 34) logits per column."""

    def __init__(self, width: float = 0.5, hidden: int = 128) -> None:
        super().__init__()
        channels = [int(c * width) for c in (64, 128, 256, 256, 512, 512, 512)]
        pools = {0: (2, 2), 1: (2, 2), 3: (2, 1), 5: (2, 1)}  # 32 -> 16 -> 8 -> 4 -> 2 rows; W -> W/4 columns
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip([1, *channels[:-1]], channels)):
            kernel, padding = ((2, 3), (0, 1)) if i == 6 else (3, 1)  # the last conv reads the two rows left
            layers += [nn.Conv2d(cin, cout, kernel, padding=padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if i in pools:
                layers.append(nn.MaxPool2d(pools[i]))
        self.convs = nn.Sequential(*layers)
        self.rnn = nn.LSTM(channels[-1], hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, len(ALPHABET) + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.convs(x).squeeze(2).transpose(1, 2)  # (N, C, 1, T) -> (N, T, C)
        return self.head(self.rnn(features)[0])


@functools.lru_cache(maxsize=None)
def _font(name: str, size: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _line(text: str, rng: np.random.Generator, width: int) -> np.ndarray:
    """One rendered, distorted line (32, width), values in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(FONTS[rng.integers(len(FONTS))], int(rng.integers(20, 36)))
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("L", (right - left + 8, bottom - top + 8), 0)
    ImageDraw.Draw(image).text((4 - left, 4 - top), text, fill=255, font=font)
    image = image.rotate(rng.uniform(-3, 3), resample=Image.BILINEAR, expand=True)
    height = rng.uniform(0.6, 0.95) * HEIGHT
    length = min(image.width * height / image.height * rng.uniform(0.8, 1.25), width - 2)
    image = image.resize((max(int(length), 1), max(int(height), 1)), Image.BILINEAR)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    ink = np.zeros((HEIGHT, width), np.float32)
    y, x = rng.integers(0, HEIGHT - image.height + 1), rng.integers(0, width - image.width + 1)
    ink[y : y + image.height, x : x + image.width] = np.asarray(image, np.float32) / 255
    fg, bg = rng.uniform(0, 1, 2)
    while abs(fg - bg) < 0.35:
        fg, bg = rng.uniform(0, 1, 2)
    return np.clip(bg + (fg - bg) * ink + rng.normal(0, rng.uniform(0, 0.08), ink.shape), 0, 1)


def lines(n: int, seed: int, width: int = WIDTH) -> tuple[torch.Tensor, list[str]]:
    """``n`` normalised lines (n, 1, 32, width) and their strings, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(ALPHABET), rng.integers(4, 11))) for _ in range(n)]
    images = np.stack([_line(t, rng, width) for t in texts])
    images = (images - images.mean((1, 2), keepdims=True)) / (images.std((1, 2), keepdims=True) + 1e-6)
    return torch.from_numpy(images.astype(np.float32)).unsqueeze(1), texts


def decode(logits: torch.Tensor) -> list[str]:
    """Greedy CTC: each column's top class, repeats merged, blanks dropped; logits (N, T, classes)."""
    out = []
    for best in logits.argmax(-1).tolist():
        symbols = [b for i, b in enumerate(best) if b != 0 and (i == 0 or b != best[i - 1])]
        out.append("".join(ALPHABET[b - 1] for b in symbols))
    return out


def read(model: nn.Module, images: torch.Tensor, batch: int = 256) -> list[str]:
    """The model's reading of each line."""
    model.eval()
    with torch.no_grad():
        return [s for i in range(0, len(images), batch) for s in decode(model(images[i : i + batch]))]


def same(a: list[str], b: list[str]) -> float:
    """Share of lines read identically (the task kept, or the accuracy against the true strings)."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def train(width: float = 0.5, steps: int = 2400, batch: int = 32, seed: int = 0, lr: float = 2e-3, log=print) -> TextReader:
    """A TextReader trained with CTC on fresh lines every step (Adam, one-cycle schedule); deterministic for a seed."""
    torch.manual_seed(seed)
    model = TextReader(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    check_x, check_texts = lines(500, seed=10_000 + seed)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    start = time.perf_counter()
    for step in range(steps):
        model.train()
        x, texts = lines(batch, seed=seed * 1_000_003 + step)
        targets = torch.tensor([ALPHABET.index(c) + 1 for t in texts for c in t])
        lengths = torch.tensor([len(t) for t in texts])
        log_probs = model(x).log_softmax(-1).transpose(0, 1)  # (T, N, classes), as CTCLoss takes them
        loss = ctc(log_probs, targets, torch.full((batch,), log_probs.shape[0]), lengths)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        if (step + 1) % max(steps // 24, 1) == 0:
            exact = same(read(model, check_x), check_texts)
            log(f"step {step + 1}: loss {loss.item():.4f}, exact strings {exact:.2%} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def load(path: Path = WEIGHTS) -> TextReader:
    """The stored trained weights (float16 on disk), in a float32 TextReader of the width they were trained at."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = TextReader(float(meta["width"]), int(meta["hidden"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    """The reader as ONNX at the benchmark input (1, 1, 32, 128), through convtool's exporter; returns the path."""
    import convtool

    return Path(str(convtool.export_onnx(model, torch.zeros(1, 1, HEIGHT, WIDTH), path)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["train", "check"])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.action == "train":
        from safetensors.torch import save_file

        start = time.perf_counter()
        model = train(args.width, args.steps, args.batch, args.seed, args.lr, log=lambda s: print(s, flush=True))
        state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(args.out), metadata={"width": str(args.width), "hidden": str(model.rnn.hidden_size),
                                                   "steps": str(args.steps), "seed": str(args.seed)})
        print(f"wrote {args.out} after {time.perf_counter() - start:.0f} s")
    model = load(args.out)
    x, texts = lines(1000, seed=HELD_OUT_SEED)
    print(f"exact strings (greedy CTC) on 1,000 held-out lines: {same(read(model, x), texts):.2%}")


if __name__ == "__main__":
    sys.exit(main())
