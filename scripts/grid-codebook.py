#!/usr/bin/env python3
"""Derives a non-uniform quantization grid (pocketlm's GRID4_LEVELS for q4nl).

The Lloyd-Max codebook of LEVELS levels for groups of 32 Gaussian weights, each group scaled
so its largest-magnitude weight lands on -1 (the encoder gives the scale the sign that puts it
there, so that level is pinned), printed scaled to int8 as the kernels read it. Rotated
(incoherence-processed) weights are close to Gaussian.

    python3 scripts/grid-codebook.py 16      # needs numpy
"""
import sys

import numpy as np

levels = int(sys.argv[1]) if len(sys.argv) > 1 else 16
group = 32
rng = np.random.default_rng(0)
w = rng.standard_normal((200_000, group))
extreme = w[np.arange(len(w)), np.abs(w).argmax(1)]
t = (w / -extreme[:, None]).ravel()
t = t[t > -1 + 1e-9]  # each group's extreme sits on the pinned level
free = np.quantile(t, (np.arange(levels - 1) + 0.5) / (levels - 1))
for _ in range(200):
    book = np.concatenate([[-1.0], free])
    nearest = np.abs(t[:, None] - book[None, :]).argmin(1)
    free = np.array([t[nearest == k].mean() for k in range(1, levels)])
book = np.concatenate([[-1.0], free])
print(np.round(book * 127).astype(int).tolist())
