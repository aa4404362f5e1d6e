"""The upstream gradient a reduced loss will get, guessed from the ones it got before.

The fused forward writes the gradient for a unit upstream gradient (`loss.backward()`).
A loss the caller scales, `loss / accumulation_steps` or GradScaler's `scale(loss)`, gets
another one, and the backward then rescales the whole gradient: one more read and write
of it, about half again a forward+backward's memory traffic. Training scales every step
alike, so the backward's last upstream gradient predicts the next: given it, the eager
forward writes the gradient as the rescale would leave it (csrc/reduced_loss.cpp,
guessed_factor: the same row factor and rounding, so a right guess changes no bit) and
the backward has nothing to do.

A guess is made only after the same upstream gradient came twice in a row, so a loss
scaled differently every step (`/ num_items_in_batch`), or two losses scaled differently
taking turns, keep the plain path. A wrong guess costs the rescale it would have cost
anyway, of a gradient already scaled: within a rounding of the other result, and bitwise
the same where the two factors differ by a power of two (GradScaler's steps).
"""

from __future__ import annotations

import threading

import torch

# Below this many logits the backward's rescale costs less than guessing (a few small host
# steps a call); the tests lower it to reach the guess on small inputs.
MIN_ELEMENTS = 1 << 16


class UpstreamGuesses:
    """Per kind of loss (the key: loss kind, reduction, dtypes), the upstream gradients
    its backward last got: `guess` for the next forward, `observe` from each backward."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple, tuple[torch.Tensor, int]] = {}  # key -> (last, repeats)
        self.hits = 0    # backwards that got the guessed gradient
        self.misses = 0  # backwards of a guessed forward that got another one

    def guess(self, key: tuple, x: torch.Tensor) -> torch.Tensor | None:
        if x.device.type != "cpu" or x.numel() < MIN_ELEMENTS:
            return None
        seen = self._seen.get(key)
        return seen[0] if seen is not None and seen[1] > 0 else None

    def observe(self, key: tuple, grad: torch.Tensor, guessed: torch.Tensor | None) -> None:
        """Record the upstream gradient a backward got; `guessed`: what its forward
        assumed (None: no guess)."""
        if grad.device.type != "cpu" or grad.dim() != 0:
            return
        with self._lock:
            seen = self._seen.get(key)
            repeats = seen[1] + 1 if seen is not None and _same(seen[0], grad) else 0
            self._seen[key] = (seen[0] if repeats else grad.detach().clone(), repeats)
            if guessed is not None:
                if _same(guessed, grad):
                    self.hits += 1
                else:
                    self.misses += 1

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self.hits = self.misses = 0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # (NaN never repeats; ±0 never becomes a guess: reduced_loss.cpp refuses zero)
    return a.dtype == b.dtype and a.item() == b.item()


GUESSES = UpstreamGuesses()
