"""torch.nn.functional.cross_entropy replaced by this library's, for code one does not own.

Training code often reaches the loss through PyTorch itself: ``nn.CrossEntropyLoss``,
or a library's loss function calling ``nn.functional.cross_entropy`` (Hugging Face
Transformers' causal-LM loss does). Both look the function up on ``torch.nn.functional``
at each call, so replacing that one attribute routes them all here. ``cross_entropy``
takes every call F's takes and returns the same values, dtypes and gradients, so the
replacement changes speed and memory, not results.
"""

from __future__ import annotations

import torch.nn.functional as torch_functional

from .functional import cross_entropy

__all__ = ["TorchPatch", "patch_torch"]


class TorchPatch:
    """The replacement made by :func:`patch_torch`: undone by ``restore()``, or on leaving
    a ``with`` block."""

    def __init__(self) -> None:
        self._replaced = torch_functional.cross_entropy
        torch_functional.cross_entropy = cross_entropy

    @property
    def active(self) -> bool:
        return self._replaced is not None

    def restore(self) -> None:
        """Puts back the function found when patching. An error, changing nothing, when
        ``torch.nn.functional.cross_entropy`` was replaced again since: patches are undone
        in the reverse order of making them. A second ``restore()`` does nothing."""
        if self._replaced is None:
            return
        if torch_functional.cross_entropy is not cross_entropy:
            raise RuntimeError(
                "torch.nn.functional.cross_entropy was replaced again after patch_torch(); "
                "undo that replacement first")
        torch_functional.cross_entropy, self._replaced = self._replaced, None

    def __enter__(self) -> TorchPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def patch_torch() -> TorchPatch:
    """Makes ``torch.nn.functional.cross_entropy`` this library's ``cross_entropy``, and so
    ``torch.nn.CrossEntropyLoss`` and every caller of either that looks the function up at
    call time (not a ``from torch.nn.functional import cross_entropy`` made before), until
    the returned patch is restored::

        patch = tlf.patch_torch()      # for the rest of the run
        with tlf.patch_torch():        # or for a block
            trainer.train()

    It applies to the whole process (all threads), as any replacement of a module
    attribute does."""
    return TorchPatch()
