"""torch.nn.functional.cross_entropy replaced by this library's, for code one does not own.

Training code often reaches the loss through PyTorch itself: ``nn.CrossEntropyLoss``,
or a library's loss function calling ``nn.functional.cross_entropy`` (Hugging Face
Transformers' causal-LM loss does). Both look the function up on ``torch.nn.functional``
at each call, so replacing that one attribute routes them all here. ``cross_entropy``
takes every call F's takes and returns the same values, dtypes and gradients, so the
replacement changes speed and memory, not results.

Patches are counted: the replacement holds while any patch is live, and the last one
restored puts PyTorch's function back, whatever the order (two threads each inside a
``with tlf.patch_torch():`` block may leave them in either order).

The attribute holds this library's ``cross_entropy`` itself. (Stop 40 tried a wrapper
marked as ``torch.jit._script_if_tracing``'s are, so that TorchScript would compile the
replaced function where it cannot compile ours; Dynamo unwraps such wrappers too, and
``torch.compile`` then traced PyTorch's loss under the patch. README says TorchScript
fails under the patch.)
"""

from __future__ import annotations

import threading
import warnings

import torch.nn.functional as torch_functional

from .functional import cross_entropy

__all__ = ["TorchPatch", "patch_torch"]

_lock = threading.Lock()
_live = 0          # patches made and not restored
_replaced = None   # what torch.nn.functional.cross_entropy was before the first of them


class TorchPatch:
    """One live replacement made by :func:`patch_torch`: ended by ``restore()``, or on
    leaving a ``with`` block."""

    def __init__(self) -> None:
        global _live, _replaced
        with _lock:
            if _live == 0:
                _replaced = torch_functional.cross_entropy
                torch_functional.cross_entropy = cross_entropy
            elif torch_functional.cross_entropy is _replaced:
                # (someone put the original back behind the live patches: a failed
                # restore's caller undoing their own replacement, say)
                torch_functional.cross_entropy = cross_entropy
            _live += 1
        self.active = True

    def restore(self) -> None:
        """Ends this patch; the last live one puts back the function found when the first
        was made. An error, changing nothing, when ``torch.nn.functional.cross_entropy``
        was meanwhile replaced by someone else (undo that first: put back this library's
        ``cross_entropy`` or the original). A second ``restore()`` does nothing."""
        global _live, _replaced
        with _lock:
            if not self.active:
                return
            if _live == 1:
                current = torch_functional.cross_entropy
                if not (current is cross_entropy or current is _replaced):
                    raise RuntimeError(
                        "torch.nn.functional.cross_entropy was replaced by something else "
                        "after patch_torch(); undo that replacement first")
                torch_functional.cross_entropy, _replaced = _replaced, None
            _live -= 1
            self.active = False

    # A copy is the same patch, not another live one (a copied or pickled object that
    # holds a patch must not restore it twice); unpickled elsewhere it is a restored one,
    # the replacement being this process's.
    def __copy__(self) -> TorchPatch:
        return self

    def __deepcopy__(self, memo) -> TorchPatch:
        return self

    def __reduce__(self):
        return _restored_patch, ()

    def __enter__(self) -> TorchPatch:
        return self

    def _abandon(self) -> None:
        """Ends this patch leaving the attribute as it is (someone else's now)."""
        global _live, _replaced
        with _lock:
            if self.active:
                _live -= 1
                self.active = False
                if _live == 0:
                    _replaced = None

    def __exit__(self, exc_type, *exc) -> None:
        # A block's patch ends with the block: one that cannot put the function back
        # (replaced inside the block) is abandoned, not left live with no handle to restore
        # it by, after which later patches were no-ops; the block's own exception, if any,
        # is the one raised.
        try:
            self.restore()
        except RuntimeError:
            self._abandon()
            message = ("torch.nn.functional.cross_entropy was replaced by something else "
                       "inside the patch_torch() block; it is left as it is, and the patch "
                       "has ended")
            if exc_type is None:
                raise RuntimeError(message) from None
            warnings.warn(message, RuntimeWarning, stacklevel=2)


def _restored_patch() -> TorchPatch:
    patch = TorchPatch.__new__(TorchPatch)
    patch.active = False
    return patch


def patch_torch() -> TorchPatch:
    """Makes ``torch.nn.functional.cross_entropy`` this library's ``cross_entropy``, and so
    ``torch.nn.CrossEntropyLoss`` and every caller of either that looks the function up at
    call time (not a ``from torch.nn.functional import cross_entropy`` made before), until
    the returned patch is restored (and any other live ones)::

        patch = tlf.patch_torch()      # for the rest of the run
        with tlf.patch_torch():        # or for a block
            trainer.train()

    It applies to the whole process (all threads), as any replacement of a module
    attribute does. Code already compiled by ``torch.compile`` recompiles under it in
    torch 2.13 (Dynamo guards the attribute); to be sure under other releases, patch
    before compiling, or call ``torch.compiler.reset()`` after patching or restoring.
    ``torch.jit.script`` cannot compile the patched function (README)."""
    return TorchPatch()
