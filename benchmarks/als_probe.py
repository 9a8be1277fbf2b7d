"""Probe for issue 15, item 2 (not the product yet): refit both halves of each pair by alternating least squares.

Run: .venv/bin/python benchmarks/als_probe.py

On the bundled digits CNN (examples/), after convtool's calibration at FLOP targets 0.25 and
0.35 (256 unlabeled training images): for each depthwise-first pair, in model order, the dense
conv's normal equations G = X X^T, B = X Y^T are taken over the pair's input in the current
model (earlier pairs already refit) and the original conv's outputs; then, for 1 or 3 rounds,
the depthwise filters are solved given the pointwise mix (Hessian (P^T P) (x) G), and the mix
given the filters, each exact least squares with a 1e-6 ridge; kept where the layer's error
drops. Prints each layer's relative squared output error before and after, and test accuracy;
then the same through the product, ``separate(..., refit="both")``.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import copy

import torch
from safetensors.torch import load_file

import convtool
from convtool.recovery.equations import columns
from digits_cnn import DigitsCNN, load_digits_tensors
from convtool.measure.conv_calls import record

torch.manual_seed(0)
train_x, _, test_x, test_y = load_digits_tensors()
model = DigitsCNN(); model.load_state_dict(load_file(str(Path(__file__).resolve().parent.parent / "examples" / "digits_cnn.safetensors"))); model.eval()
acc = lambda m: float((m(test_x).argmax(1) == test_y).float().mean())
cal = train_x[:256]
with torch.no_grad():
    print("original", acc(model))
for target in (0.25, 0.35):
    res = convtool.separate(model, cal[:1], rank=convtool.FlopsTarget(target), calibration=cal)
    sep = res.model
    with torch.no_grad():
        print(target, "calibrated", acc(sep), [(l.name, l.rank, l.order) for l in res.layers])
    pairs = {n: m for n, m in sep.named_modules() if isinstance(m, convtool.SeparableConv)}
    dense = dict(model.named_modules())
    for rounds in (1, 3):
        work = copy.deepcopy(sep)
        wp = {n: m for n, m in work.named_modules() if isinstance(m, convtool.SeparableConv)}
        for name, pair in wp.items():  # in model order: earlier layers first
            if pair.order != "dw-pw":
                continue
            conv = dense[name]
            # pair inputs in the current (partly ALS-refit) model; targets from the dense model
            rec = record(work, (cal,), keep={id(pair.depthwise.weight)})
            x = [c.input for c in rec.calls if c.weight is pair.depthwise.weight][0]
            ref = record(model, (cal,), keep={id(conv.weight)})
            y = [c.output for c in ref.calls if c.weight is conv.weight][0]
            call = dict(input=x, weight=conv.weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=1)
            X = columns(call)[:, 0].permute(1, 0, 2).reshape(x.shape[1] * 9, -1).double()  # (M*K, pixels)
            Y = y.permute(1, 0, 2, 3).reshape(y.shape[1], -1).double()  # (N, pixels)
            bias = pair.pointwise.bias
            if bias is not None:
                Y = Y - bias.detach().double()[:, None]
            G, B = X @ X.T, X @ Y.T  # (MK, MK), (MK, N)
            M, r, K = pair.in_channels, pair.rank, 9
            D = pair.depthwise.weight.detach().double().reshape(M, r, K)
            P = pair.pointwise.weight.detach().double().reshape(-1, M, r)  # (N, M, r)
            def loss(D, P):
                W = torch.einsum("nmi,mik->nmk", P, D).reshape(-1, M * K)
                return float((torch.trace(W @ G @ W.T) - 2 * torch.trace(W @ B) + (Y * Y).sum()) / (Y * Y).sum())
            before = loss(D, P)
            for _ in range(rounds):
                # D given P: H[(m,i,k),(m',i',k')] = (P^T P)[(m,i),(m',i')] * G[(m,k),(m',k')]
                PP = torch.einsum("nmi,noj->mioj", P, P)  # (M, r, M, r)
                Gr = G.reshape(M, K, M, K)
                H = torch.einsum("mioj,mkol->mikojl", PP, Gr).reshape(M * r * K, M * r * K)
                b = torch.einsum("nmi,mkn->mik", P, B.reshape(M, K, -1)).reshape(-1)
                H += 1e-6 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
                D = torch.linalg.solve(H, b).reshape(M, r, K)
                # P given D: features z_(m,i) = sum_k D[m,i,k] X[(m,k)]
                Dm = torch.zeros(M * r, M * K, dtype=torch.float64)
                for m in range(M):
                    Dm[m * r:(m + 1) * r, m * K:(m + 1) * K] = D[m]
                GZ = Dm @ G @ Dm.T
                BZ = Dm @ B
                GZ += 1e-6 * GZ.diagonal().mean() * torch.eye(GZ.shape[0], dtype=GZ.dtype)
                P = torch.linalg.solve(GZ, BZ).T.reshape(-1, M, r)
            after = loss(D, P)
            if after < before:
                with torch.no_grad():
                    pair.depthwise.weight.copy_(D.reshape(M * r, 1, 3, 3).float())
                    pair.pointwise.weight.copy_(P.reshape(-1, M * r, 1, 1).float())
            print(f"  {name} rank {r}: layer error {before:.4f} -> {after:.4f}")
        with torch.no_grad():
            print(target, f"ALS {rounds} rounds", acc(work))
    product = convtool.separate(model, cal[:1], rank=convtool.FlopsTarget(target), calibration=cal, refit="both")
    with torch.no_grad():
        print(target, 'separate(refit="both")', acc(product.model))
