"""Checks that the hot loops of the softmax-family CUDA kernels touch no local memory.

ptxas may spill registers of a 128-register kernel to local memory; the fused block-per-row
kernels do, for a few per-row values, which costs nothing measurable. What must not spill is
the loop over a row's logits. This reads the SASS of a built extension or object file
(cuobjdump -sass) and, for every softmax_loss_kernel, finds the innermost loops (a backward
branch whose range holds no other) that read the row (16-byte global or shared loads) and
take exponentials (MUFU.EX2), and fails if one of them holds a local load or store. A
barrier wait's spin loop (SYNCS.PHASECHK, the bulk-copy kernels' mbarrier waits) inside a
loop does not make that loop an outer one: it is checked as the hot loop it is. Loops
with a call (a division's slow path, in the generic loop) are reported, not failed: a
call's convention may save registers around it.

    python scripts/check_hot_loops.py [--cuobjdump PATH] FILE [FILE ...]

Used by .ci/cuda_build_check.sh on the extension it builds.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

INSTR = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;")
BRANCH = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")
KERNEL = "softmax_loss_kernel"


@dataclass
class Loop:
    function: str
    start: int
    end: int
    body: list[str]

    def count(self, *ops: str) -> int:
        return sum(any(op in ins for op in ops) for ins in self.body)


def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    name = None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :", 1)[1].strip()
            out[name] = []
        elif name is not None and (m := INSTR.search(line)):
            out[name].append((int(m.group(1), 16), m.group(2)))
    return out


def innermost_loops(name: str, code: list[tuple[int, str]]) -> list[Loop]:
    spans = []
    for addr, ins in code:
        m = BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr:
            spans.append((int(m.group(1), 16), addr))

    def spin(span: tuple[int, int]) -> bool:  # an mbarrier wait's retry loop
        body = [ins for addr, ins in code if span[0] <= addr <= span[1]]
        return any("SYNCS.PHASECHK" in ins for ins in body) and \
            not any("MUFU.EX2" in ins for ins in body)

    loops = [s for s in spans if not spin(s)]
    inner = [s for s in loops
             if not any(o != s and s[0] <= o[0] and o[1] <= s[1] for o in loops)]
    return [Loop(name, a, b, [ins for addr, ins in code if a <= addr <= b]) for a, b in inner]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    args = ap.parse_args()
    hot = bad = 0
    for path in args.files:
        sass = subprocess.run([args.cuobjdump, "-sass", path], check=True,
                              capture_output=True, text=True).stdout
        for name, code in functions(sass).items():
            if KERNEL not in name:
                continue
            for loop in innermost_loops(name, code):
                if not (loop.count("MUFU.EX2") and loop.count("LDG.E.128", "LDS.128")):
                    continue
                hot += 1
                local = loop.count("LDL", "STL")
                if not local:
                    continue
                where = f"{name} [{loop.start:#x}, {loop.end:#x}]: {local} local accesses"
                if loop.count("CALL"):
                    print(f"note: {where} (the loop calls a function)")
                else:
                    print(f"FAIL: {where}")
                    bad += 1
    print(f"hot loops checked: {hot}; with local memory: {bad}")
    if hot == 0:
        print("FAIL: no hot loop found (is this a CUDA build of the extension?)")
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
