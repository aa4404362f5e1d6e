"""What a type checker sees of the public API (the package is PEP 561 typed: py.typed).

mypy checks a user's script against the package's own annotations: each loss returns a
Tensor, `(loss, lse)` with `return_lse=True`; the decorators keep the signatures, so a
wrong argument is an error in the user's code (before py.typed, mypy refused the import
as untyped; before the decorators were typed, every loss was `Any`). Errors inside the
package are not the user's and are not reported (`--follow-imports=silent`), as for an
installed typed package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("mypy")
ROOT = Path(__file__).resolve().parents[1]

USER_CODE = '''
import torch
from typing_extensions import assert_type
from torch import Tensor

import torchloss_fused as tlf

x = torch.randn(4, 10, requires_grad=True)
t = torch.randint(0, 10, (4,))
h, w = torch.randn(4, 8), torch.randn(10, 8)
flag: bool = bool(torch.rand(()) > 0.5)

assert_type(tlf.cross_entropy(x, t), Tensor)
assert_type(tlf.cross_entropy(x, t, torch.rand(10), None, -1, None, "sum", 0.1,
                              z_loss=1e-4, softcap=30.0, logit_scale=0.5,
                              inplace_backward=True), Tensor)
assert_type(tlf.cross_entropy(x, t, return_lse=False), Tensor)
assert_type(tlf.cross_entropy(x, t, return_lse=True), tuple[Tensor, Tensor])
assert_type(tlf.cross_entropy(x, t, return_lse=flag), Tensor | tuple[Tensor, Tensor])
assert_type(tlf.focal_loss(x, t, gamma=2.0, alpha=0.25, reduction="none"), Tensor)
assert_type(tlf.sigmoid_focal_loss(x, torch.rand(4, 10), 0.25, 2.0, "mean"), Tensor)
assert_type(tlf.linear_cross_entropy(h, w, t, None, -100, "mean", 0.0,
                                     class_weight=None, chunk_size=2), Tensor)
assert_type(tlf.linear_cross_entropy(h, w, t, return_lse=True), tuple[Tensor, Tensor])
loss, lse = tlf.cross_entropy(x, t, return_lse=True)
(loss + tlf.cross_entropy(x, t)).backward()
assert_type(tlf.backend_info("cpu"), dict)
assert_type(tlf.cpu_cache_info(), dict)
assert_type(tlf.empty_cpu_cache(), None)
with tlf.patch_torch():
    pass
modules = (tlf.CrossEntropyLoss(label_smoothing=0.1), tlf.FocalLoss(gamma=1.0),
           tlf.SigmoidFocalLoss(), tlf.LinearCrossEntropyLoss(chunk_size=2))

# Wrong calls, each an error on its line (the WRONG markers):
tlf.cross_entropy(x, t, reduction=1)  # WRONG
tlf.cross_entropy(x, t, z_loss="big")  # WRONG
tlf.cross_entropy(x, t, no_such_option=True)  # WRONG
tlf.cross_entropy(x, t, return_lse=True).backward()  # WRONG
tlf.linear_cross_entropy(h, w)  # WRONG
tlf.focal_loss(x, t, gamma=None)  # WRONG
'''


def test_user_code_type_checks(tmp_path):
    script = tmp_path / "user_code.py"
    script.write_text(textwrap.dedent(USER_CODE))
    env = dict(os.environ, MYPYPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / "cache"), "--python-version",
         f"{sys.version_info.major}.{sys.version_info.minor}", str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    wrong = {i + 1 for i, line in enumerate(textwrap.dedent(USER_CODE).splitlines())
             if line.endswith("# WRONG")}
    assert len(wrong) == 6
    errors = [m for m in re.finditer(r"user_code\.py:(\d+): error: (.*)", proc.stdout)]
    flagged = {int(m.group(1)) for m in errors}
    unexpected = [m.group(0) for m in errors if int(m.group(1)) not in wrong]
    assert not unexpected, "\n".join(unexpected) + "\n" + proc.stderr[-2000:]
    assert flagged == wrong, (sorted(wrong - flagged), proc.stdout[-3000:], proc.stderr[-2000:])
