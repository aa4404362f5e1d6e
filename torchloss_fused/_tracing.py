"""Whether the running code is being recorded into a graph that will run again on other
values, so nothing may be decided on the host from a tensor's values (a count of ignored
targets, a bounds check): torch.compile, torch.jit.trace, and make_fx's proxy tensors
(torch.fx.experimental.proxy_tensor, under which torch.func.linearize and AOTAutograd
trace too; in its default "real" mode the values can be read, and a graph would keep
them as constants)."""

from __future__ import annotations

import torch


def recording() -> bool:
    return (torch.compiler.is_compiling() or torch._C._is_tracing()
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)
