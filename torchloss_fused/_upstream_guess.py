"""The upstream gradient a reduced loss will get, guessed from the ones it got before.

The fused forward writes the gradient for a unit upstream gradient (`loss.backward()`).
A loss the caller scales, `loss / accumulation_steps` or GradScaler's `scale(loss)`, gets
another one, and the backward then rescales the whole gradient: one more read and write
of it, about half again a forward+backward's memory traffic. Training scales every step
alike, so the backward's last upstream gradient predicts the next: given it, the eager
forward stores the gradient as the rescale would leave it (csrc/reduced_loss.cpp,
guessed_factor: the same row factor and rounding, so a right guess changes no bit) and
the backward has nothing to do. A wrong guess changes no bit either: the backward
recomputes the gradient from the logits (_eager.FusedReduced), one forward pass where the
rescale took one pass over the gradient.

A guess is made only after the same upstream gradient came twice in a row, so a loss
scaled differently every step (`/ num_items_in_batch`), or two losses scaled differently
taking turns, keep the plain path, and wrong guesses stay rare (a change of scale).
"""

from __future__ import annotations

import threading

import torch

# Below this many logits the backward's rescale costs less than guessing (a few small host
# steps a call), and such losses are not even watched (about 8 us of a 80 us (8, 16)
# forward+backward); the tests lower it to reach the guess on small inputs.
MIN_ELEMENTS = 1 << 16


class UpstreamGuesses:
    """Per kind of loss (the key: loss kind, reduction, dtypes), the upstream gradients
    its backward last got: `guess` for the next forward, `observe` from each backward."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # key -> (last upstream gradient, its (dtype, value), times running it came - 1)
        self._seen: dict[tuple, tuple[torch.Tensor, tuple, int]] = {}
        self.hits = 0    # backwards that got the guessed gradient
        self.misses = 0  # backwards of a guessed forward that got another one

    @staticmethod
    def key(kind: int, reduction: int, x: torch.Tensor, dtype: torch.dtype) -> tuple | None:
        """The key of a reduced loss of these logits, or None where no guess is kept (the
        backward then spends nothing on it: a few microseconds of a small loss)."""
        if not reduction or x.device.type != "cpu" or x.numel() < MIN_ELEMENTS:
            return None
        return kind, reduction, x.dtype, dtype

    def guess(self, key: tuple | None) -> torch.Tensor | None:
        seen = self._seen.get(key) if key is not None else None
        return seen[0] if seen is not None and seen[2] > 0 else None

    def observe(self, key: tuple, grad: torch.Tensor, guessed: torch.Tensor | None) -> bool:
        """Record the upstream gradient a backward got; `guessed`: what its forward
        assumed (None: no guess). Returns whether that guess was it: the same dtype and
        value, so the same rows' gradient. (NaN never is; ±0 never becomes a guess:
        reduced_loss.cpp refuses zero.)"""
        if grad.device.type != "cpu" or grad.dim() != 0:
            return False
        value = (grad.dtype, grad.item())
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and seen[1] == value:
                self._seen[key] = (seen[0], value, seen[2] + 1)
            else:
                self._seen[key] = (grad.detach().clone(), value, 0)
            right = guessed is not None and (guessed.dtype, guessed.item()) == value
            if guessed is not None:
                self.hits += right
                self.misses += not right
        return right

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()
            self.hits = self.misses = 0


GUESSES = UpstreamGuesses()
