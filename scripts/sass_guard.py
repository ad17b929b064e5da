#!/usr/bin/env python3
"""sass_guard.py: static facts of culoss's sm_90 machine code, and a guard.

    python3 scripts/sass_guard.py build/libculoss.so            # report, every kernel
    python3 scripts/sass_guard.py --hot build/libculoss.so      # report, hot kernels only
    python3 scripts/sass_guard.py --markdown --hot build/libculoss.so
    python3 scripts/sass_guard.py --check build/libculoss.so    # the guard (ctest sass_guard)

Reads the sm_90 cubins of the built library (libculoss.so, libculoss.a or
the CUDA object files of the build) with cuobjdump and reports, per kernel
instantiation: registers, stack frame, spill stores and refills (bytes),
other local-memory accesses, static shared memory, the theoretical resident
blocks per SM on an H100 and the widths of its global loads and stores,
in and out of loops. These are static facts of the machine code, not
measurements.

Sources (all from cuobjdump -arch sm_90):
  -res-usage  registers (REG), stack frame (STACK), local memory (LOCAL),
              static shared memory (SHARED)
  -elf        .nv.info.<kernel>: EIATTR_MAX_THREADS (__launch_bounds__, .maxntid)
              or EIATTR_REQNTID, the block size used below; EIATTR_ANNOTATIONS,
              where ptxas marks each spill store and refill (SpillRefill) by offset
  -sass       the instructions (needs nvdisasm): STL/LDL at the SpillRefill
              offsets are spills (bytes from their widths); other STL/LDL are
              local arrays; CALL.REL are calls of non-inlined subroutines (the
              slow paths of IEEE division, 64-bit integer division); a loop is
              the span of a backward branch; LDG/STG widths by suffix
              (.128 = 16 B, .64 = 8 B, .U16 = 2 B, .U8 = 1 B, none = 4 B).

A stack frame is not necessarily a spill: the report keeps them apart
(stack = the frame ptxas reserved; spill = bytes of STL/LDL that ptxas
marked as spills; local = other STL/LDL bytes, e.g. a dynamically indexed
local array). The guard fails on any of the three in a hot kernel.

Blocks per SM (H100, sm_90): min over
  32 blocks; 64 warps / warps per block;
  65536 registers / (warps per block x registers per warp, rounded up to 256);
  228 KiB / (static shared memory + 1 KiB reserved per block, rounded up to 128 B).
The block size is the kernel's launch bound (EIATTR_MAX_THREADS or REQNTID);
without one it is "unknown". Dynamic shared memory (the cross-entropy row
cache, sized at launch) is not counted: with it the figure can only drop.

Finding cuobjdump, in order: --cuobjdump PATH, $CUOBJDUMP, PATH, the pip
package nvidia-cuda-cuobjdump (nvidia/cu*/bin/cuobjdump in this
interpreter's site-packages or in the project's .venv). nvdisasm (which
cuobjdump -sass runs) likewise: --nvdisasm, $NVDISASM, beside cuobjdump,
PATH, the pip package nvidia-cuda-nvdisasm. Install both with
    .venv/bin/python -m pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm

--check exits 1 with one line per offender when a hot kernel (HOT below)
spills, has a stack frame or local memory, or (for its 16-byte-pack
instantiations) has no 128-bit global load or no 128-bit global store
inside a loop, unless EXCEPTIONS below excuses it (up to a stated frame size,
and never a spill inside an innermost loop); also when a HOT pattern
matches no kernel (renamed kernels must not pass silently). It exits 77
(ctest: skipped) when the input has no sm_90 cubin, and 2 on a usage or
tool error. An exception that no longer matches an offender is reported
(a failure with --strict) so that it gets removed.
"""

import argparse
import bisect
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

ARCH = "sm_90"

# --------------------------------------------------------------------------
# What is hot, and what is excused. Patterns are Python regular expressions
# matched in full against the short names this script prints, e.g.
# ce_kernel<bf16,1,1024,1024,8> (the template arguments of ce_kernel are
# <T, MODE, BLOCK, TPR, VEC>: MODE 0 = class-index targets, 1 = soft targets;
# VEC 4 for f32 and 8 for f16/bf16 is the 16-byte-pack path that aligned
# inputs take, VEC 1 the element-at-a-time fallback for unaligned ones).
# ce_cluster_kernel's are <T, MODE, VEC>; ew_kernel's are <T, OP, VEC> (OP:
# culoss__ew_op in common/backend.h).
# --------------------------------------------------------------------------

# (pattern, wide, why it is hot). wide: the 16-byte-pack instantiations,
# whose loops must keep LDG.E.128 and STG.E.128. The element-at-a-time
# (VEC 1) instantiations of the same kernels are hot too, for spills only:
# tiny rows take them whenever c * sizeof(T) is not a multiple of 16 (c = 10
# classes in fp32, say), and elementwise whenever a buffer is not 16-byte
# aligned. The 8-lane, warp and 256-thread CE shapes are reported, not held.
HOT: List[Tuple[str, bool, str]] = [
    (r"ce_kernel<(f32|f16|bf16),[01],1024,1024,[48]>", True,
     "CE large rows: CE_SHAPES[4], a 1024-thread block per row, c > 16384 (LLM vocabularies)"),
    (r"ce_cluster_kernel<(f32|f16|bf16),[01],[48]>", True,
     "CE large rows past one block's row cache: a 1024-thread block cluster per row (sm_90)"),
    (r"ce_kernel<(f32|f16|bf16),[01],256,1,[48]>", True,
     "CE tiny rows: CE_SHAPES[0], a thread per row, c <= 16"),
    (r"ew_kernel<(f32|f16|bf16),\d+,[48]>", True,
     "elementwise losses (cuda/elementwise.cu), every op"),
    (r"ce_kernel<(f32|f16|bf16),[01],1024,1024,1>", False,
     "CE large rows, element-at-a-time (rows not 16-byte aligned)"),
    (r"ce_cluster_kernel<(f32|f16|bf16),[01],1>", False,
     "CE cluster rows, element-at-a-time (rows not 16-byte aligned)"),
    (r"ce_kernel<(f32|f16|bf16),[01],256,1,1>", False,
     "CE tiny rows, element-at-a-time (c * sizeof(T) not a multiple of 16)"),
    (r"ew_kernel<(f32|f16|bf16),\d+,1>", False,
     "elementwise, element-at-a-time (buffers not 16-byte aligned)"),
    (r"emb_kernel<(f32|f16|bf16),[01],[48],[1-9]>", True,
     "embedding rows (cuda/embedding.cu) in the register cache: cosine d <= 1024, triplet "
     "d <= 512"),
    (r"emb_kernel<(f32|f16|bf16),[01],[48],0>", True,
     "embedding rows past the register cache: two passes, the second from L2"),
    (r"mlsm_kernel<(f32|f16|bf16),[48]>", True,
     "multi-label soft margin (cuda/embedding.cu): one streaming pass, a warp per row"),
    (r"emb_kernel<(f32|f16|bf16),[01],1,0>", False,
     "embedding rows, element-at-a-time (pitch or buffers not 16-byte aligned)"),
]

# (pattern, check, limit, reason): reviewed decisions, each visible here.
# check "stack" excuses a stack frame and spills of at most `limit` bytes
# (frame size), and only while no spill or refill sits in an innermost loop
# (the per-pack or per-element loops); check "wide" excuses missing 128-bit
# loads/stores in loops (limit unused). Say why it is acceptable or what
# would fix it, the date and the compiler; --where lists the spill sites.
EXCEPTIONS: List[Tuple[str, str, int, str]] = [
    (r"ce_kernel<(f32|f16|bf16),[01],256,1,1>", "stack", 16,
     "2026-12-02, CUDA 13.0 ptxas: 8-16 B. At 48 registers (5 blocks of 256 per SM) ptxas "
     "spills per-call and per-row invariants (load_call_consts' red_scale/wsum, the row loop's "
     "64-bit bound/stride) once before the row loop and reloads them once per row (begin_row, "
     "finish_row's log1p): no spill in an element loop; L1 hits, a few per row of <= 16 "
     "elements. #pragma unroll 1 in pass1/grad_pass removes them (40-42 registers)"),
    (r"ce_kernel<f32,[01],256,1,4>", "stack", 40,
     "2026-12-02, CUDA 13.0 ptxas: 32 B (index) / 40 B (soft). At 64 registers (4 blocks of 256 "
     "per SM) ptxas spills the same per-call/per-row invariants (6-9 words) before the row "
     "loop and reloads them per row (begin_row, skip_row, the pack loops' set-up, finish_row), "
     "none inside a pack loop. #pragma unroll 1 in pass1/grad_pass for TPR == 1 && VEC == 4 "
     "removes them (48 registers, 5 blocks/SM; but unroll 1 makes the 16-bit VEC 8 kernels "
     "spill instead, so make the unroll depend on T): measure first, each thread issues its "
     "row's <= 4 pack loads back to back only with the unroll"),
    (r"ce_kernel<(f16|bf16),1,256,1,8>", "stack", 32,
     "2026-12-02, CUDA 13.0 ptxas, after the cluster change (600d356): bf16 soft tiny rows "
     "dropped from 80 to 64 registers (f16 stays at 80, no spill) with a 32 B frame: the same "
     "per-call/per-row invariants plus the group's double block_sum (STL.64 around emit_loss), "
     "reloaded per row (skip_row, pass1/grad_pass set-up, finish_row), none in a pack loop. "
     "ptxas's occupancy step (64 = 4 blocks/SM); recheck on the next CE change"),
]

# --------------------------------------------------------------------------
# H100 (sm_90) limits for the occupancy figure.
# --------------------------------------------------------------------------
SM_REGS = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
SM_SMEM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128


def ceil_to(x: int, unit: int) -> int:
    return (x + unit - 1) // unit * unit


def blocks_per_sm(regs: int, threads: Optional[int], smem: int) -> Tuple[Optional[int], str]:
    """Theoretical resident blocks per SM and the limiting resource."""
    if not threads:
        return None, "block size unknown"
    warps = (threads + 31) // 32
    limits = {"blocks": SM_MAX_BLOCKS, "warps": SM_MAX_WARPS // warps}
    regs_per_warp = ceil_to(max(regs, 1) * 32, REG_ALLOC_UNIT)
    limits["regs"] = SM_REGS // (regs_per_warp * warps)
    limits["smem"] = SM_SMEM // ceil_to(smem + SMEM_RESERVED_PER_BLOCK, SMEM_ALLOC_UNIT)
    best = min(limits.values())
    why = "/".join(k for k, v in limits.items() if v == best)
    return best, why


# --------------------------------------------------------------------------
# A small Itanium demangler: enough for kernel names and their template
# arguments (builtin and named types, integer literals, nested names).
# --------------------------------------------------------------------------
BUILTIN = {
    "v": "void", "b": "bool", "c": "char", "a": "signed char", "h": "unsigned char",
    "s": "short", "t": "unsigned short", "i": "int", "j": "unsigned", "l": "long",
    "m": "unsigned long", "x": "long long", "y": "unsigned long long", "f": "float",
    "d": "double", "e": "long double", "w": "wchar_t",
}
SHORT_TYPES = {"float": "f32", "__half": "f16", "__nv_bfloat16": "bf16", "double": "f64"}


class Demangle:
    def __init__(self, s: str):
        self.s, self.i = s, 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def source_name(self) -> str:
        m = re.compile(r"\d+").match(self.s, self.i)
        if not m:
            raise ValueError("source name expected")
        n = int(m.group())
        self.i = m.end()
        name = self.s[self.i:self.i + n]
        self.i += n
        if name.startswith("_GLOBAL__N"):
            return "(anonymous namespace)"
        return name

    def template_args(self) -> List[str]:
        assert self.s[self.i] == "I"
        self.i += 1
        args = []
        while self.peek() != "E":
            if not self.peek():
                raise ValueError("unterminated template arguments")
            args.append(self.template_arg())
        self.i += 1
        return args

    def template_arg(self) -> str:
        if self.peek() == "L":
            self.i += 1
            if self.s.startswith("_Z", self.i):
                raise ValueError("external name in a literal")
            ty = self.type()
            m = re.compile(r"n?\d+").match(self.s, self.i)
            if not m or self.s[m.end():m.end() + 1] != "E":
                raise ValueError("literal expected")
            self.i = m.end() + 1
            v = m.group().replace("n", "-")
            if ty == "bool":
                return "true" if v == "1" else "false"
            return v
        return self.type()

    def type(self) -> str:
        c = self.peek()
        if c in BUILTIN:
            self.i += 1
            return BUILTIN[c]
        if c == "K":
            self.i += 1
            return self.type() + " const"
        if c == "P":
            self.i += 1
            return self.type() + "*"
        if c == "R":
            self.i += 1
            return self.type() + "&"
        if c == "N":
            return "::".join(self.nested())
        if c.isdigit():
            name = self.source_name()
            if self.peek() == "I":
                name += "<" + ", ".join(self.template_args()) + ">"
            return name
        if c == "S":  # a substitution: not tracked, spelled as a placeholder
            m = re.compile(r"S[0-9A-Z]*_|S[tabsiod]").match(self.s, self.i)
            if not m:
                raise ValueError("substitution expected")
            self.i = m.end()
            name = "?"
            if self.peek() == "I":
                name += "<" + ", ".join(self.template_args()) + ">"
            return name
        raise ValueError("type code %r" % c)

    def nested(self) -> List[str]:
        assert self.s[self.i] == "N"
        self.i += 1
        parts: List[str] = []
        while self.peek() != "E":
            c = self.peek()
            if c == "K":
                self.i += 1
            elif c.isdigit():
                parts.append(self.source_name())
            elif c == "I" and parts:
                parts[-1] += "<" + ", ".join(self.template_args()) + ">"
            elif c == "S":
                self.type()
                parts.append("?")
            else:
                raise ValueError("nested name: %r" % c)
        self.i += 1
        return parts

    def function_name(self) -> List[str]:
        if not self.s.startswith("_Z"):
            raise ValueError("not a mangled name")
        self.i = 2
        if self.peek() == "N":
            return self.nested()
        name = self.source_name()
        if self.peek() == "I":
            name += "<" + ", ".join(self.template_args()) + ">"
        return [name]


def short_name(mangled: str) -> str:
    """kernel<args> with namespaces dropped and f32/f16/bf16 for the types."""
    try:
        parts = Demangle(mangled).function_name()
    except (ValueError, AssertionError, IndexError):
        return mangled
    last = parts[-1]
    m = re.match(r"([^<]*)(?:<(.*)>)?$", last)
    base, args = m.group(1), m.group(2)
    if args is None:
        return base
    out = []
    for a in (x.strip() for x in args.split(",")):
        out.append(SHORT_TYPES.get(a, a))
    return "%s<%s>" % (base, ",".join(out))


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pip_tool(name: str) -> Optional[str]:
    """nvidia/cu*/bin/<name> of the nvidia-cuda-* pip packages: in this
    interpreter's site-packages, then in the project's .venv."""
    import site
    import sysconfig
    dirs = []
    for key in ("purelib", "platlib"):
        p = sysconfig.get_paths().get(key)
        if p:
            dirs.append(p)
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:
        pass
    dirs += sorted(glob.glob(os.path.join(repo_root(), ".venv", "lib", "python3*", "site-packages")))
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, "nvidia", "cu*", "bin", name)), reverse=True)
        hits = [h for h in hits if os.access(h, os.X_OK)]
        if hits:
            return hits[0]
    return None


def find_tool(name: str, flag: Optional[str], env: str, beside: Optional[str] = None) -> Optional[str]:
    if flag:
        return flag
    if os.environ.get(env):
        return os.environ[env]
    if beside:
        p = os.path.join(os.path.dirname(beside), name)
        if os.access(p, os.X_OK):
            return p
    p = shutil.which(name)
    if p:
        return p
    return pip_tool(name)


class ToolError(Exception):
    pass


def run_tool(cmd: List[str], env: Dict[str, str], cwd: Optional[str] = None) -> str:
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd,
                           universal_newlines=True, errors="replace")
    except OSError as e:
        raise ToolError("%s: %s" % (cmd[0], e))
    if r.returncode != 0:
        raise ToolError("%s failed (%d): %s" % (" ".join(cmd), r.returncode, r.stderr.strip()[-2000:]))
    return r.stdout


# --------------------------------------------------------------------------
# Parsing cuobjdump's output
# --------------------------------------------------------------------------
@dataclass
class Kernel:
    mangled: str
    source: str = ""  # the identifier (source file) of the cubin
    regs: int = 0
    stack: int = 0
    local: int = 0
    smem: int = 0
    threads: Optional[int] = None
    spill_offsets: List[int] = field(default_factory=list)
    have_sass: bool = False
    spill_st: int = 0  # bytes of spill stores (STL at SpillRefill offsets)
    spill_ld: int = 0  # bytes of refills (LDL at SpillRefill offsets)
    spill_in_loops: int = 0  # spill/refill instructions inside a loop (the row loop counts)
    spill_in_inner_loops: int = 0  # ... inside a loop with no loop inside it
    spill_in_pack_loops: int = 0  # ... inside a 16-byte pack loop (analyse_function)
    local_st: int = 0  # other STL / LDL bytes (local arrays)
    local_ld: int = 0
    calls: int = 0
    ldg: Dict[int, int] = field(default_factory=dict)  # width -> count
    stg: Dict[int, int] = field(default_factory=dict)
    ldg128_loop: int = 0
    stg128_loop: int = 0
    narrow_ldg_loop: int = 0
    narrow_stg_loop: int = 0

    @property
    def short(self) -> str:
        return short_name(self.mangled)


RES_FUNC = re.compile(r"^\s*Function (\S+?):\s*$")
RES_VALS = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_res_usage(text: str, kernels: Dict[str, Kernel], source: str) -> int:
    n, cur, ident = 0, None, source
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("identifier = "):
            ident = s[len("identifier = "):]
            continue
        m = RES_FUNC.match(line)
        if m:
            cur = m.group(1)
            continue
        m = RES_VALS.search(line)
        if m and cur:
            k = kernels.setdefault(cur, Kernel(cur))
            k.source = os.path.basename(ident)
            k.regs, k.stack, k.smem, k.local = (int(x) for x in m.groups())
            cur = None
            n += 1
    return n


def parse_elf(text: str, kernels: Dict[str, Kernel]) -> None:
    cur: Optional[Kernel] = None
    attr = None
    in_spill = False
    for line in text.splitlines():
        if line.startswith(".nv.info."):
            cur = kernels.get(line[len(".nv.info."):].strip())
            attr = None
            continue
        if line.startswith(".") or line.startswith("Fatbin") or not line.strip():
            if line.strip():
                cur = None
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("Attribute:"):
            attr = s.split(None, 1)[1] if len(s.split(None, 1)) > 1 else ""
            in_spill = False
            continue
        if attr in ("EIATTR_MAX_THREADS", "EIATTR_REQNTID") and s.startswith("Value:"):
            vals = [int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", s)]
            if len(vals) >= 1:
                t = 1
                for v in vals[:3]:
                    t *= max(v, 1)
                if attr == "EIATTR_REQNTID" or cur.threads is None:
                    cur.threads = t
        elif attr == "EIATTR_ANNOTATIONS":
            for kind, off in re.findall(r"(\w+)\s*:\s*Offset\s*:\s*(0x[0-9a-fA-F]+)", s):
                if kind == "SpillRefill":
                    cur.spill_offsets.append(int(off, 16))


SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
SASS_INSN = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
OPCODE = re.compile(r"(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_.]*)\s*(.*)")


def width(op: str) -> int:
    parts = op.split(".")[1:]
    if "128" in parts:
        return 16
    if "64" in parts:
        return 8
    if "U16" in parts or "S16" in parts:
        return 2
    if "U8" in parts or "S8" in parts:
        return 1
    return 4


def analyse_function(k: Kernel, insns: List[Tuple[int, str, str]]) -> None:
    k.have_sass = True
    # loops: the spans [target, branch] of backward branches
    spans = []
    for addr, op, rest in insns:
        if op.startswith("BRA"):
            hexes = re.findall(r"0x([0-9a-fA-F]+)", rest)
            if hexes:
                t = int(hexes[-1], 16)
                if t <= addr:
                    spans.append((t, addr))
    spans = sorted(set(spans))
    merged: List[List[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    starts = [m[0] for m in merged]

    def in_loop(addr: int) -> bool:
        j = bisect.bisect_right(starts, addr) - 1
        return j >= 0 and merged[j][0] <= addr <= merged[j][1]

    def innermost(addr: int) -> Optional[Tuple[int, int]]:
        best = None
        for a, b in spans:
            if a > addr:
                break
            if addr <= b and (best is None or b - a < best[1] - best[0]):
                best = (a, b)
        return best

    spills = set(k.spill_offsets)
    spill_sites = []
    pack_loops = set()  # the innermost loops of 16-byte pack accesses (below)
    for addr, op, _ in insns:
        base = op.split(".")[0]
        if base in ("STL", "LDL"):
            w = width(op)
            if addr in spills:
                if base == "STL":
                    k.spill_st += w
                else:
                    k.spill_ld += w
                spill_sites.append(addr)
            elif base == "STL":
                k.local_st += w
            else:
                k.local_ld += w
        elif base == "CALL":
            k.calls += 1
        elif base in ("LDG", "STG"):
            w = width(op)
            d = k.ldg if base == "LDG" else k.stg
            d[w] = d.get(w, 0) + 1
            if in_loop(addr):
                if w == 16:
                    loop = innermost(addr)
                    # a pack loop: the innermost loop of a 128-bit load, or of a
                    # 128-bit store in a loop with no loop inside it (the row
                    # loops' float4 stores of row statistics do not count)
                    if base == "LDG" or not any(loop[0] <= a and b <= loop[1] and (a, b) != loop
                                                for a, b in spans):
                        pack_loops.add(loop)
                if base == "LDG":
                    if w == 16:
                        k.ldg128_loop += 1
                    else:
                        k.narrow_ldg_loop += 1
                else:
                    if w == 16:
                        k.stg128_loop += 1
                    else:
                        k.narrow_stg_loop += 1
    for addr in spill_sites:
        loop = innermost(addr)
        if loop is not None:
            k.spill_in_loops += 1
            if not any(loop[0] <= a and b <= loop[1] and (a, b) != loop for a, b in spans):
                k.spill_in_inner_loops += 1
            if loop in pack_loops:
                k.spill_in_pack_loops += 1


def parse_sass(text: str, kernels: Dict[str, Kernel]) -> None:
    cur: Optional[Kernel] = None
    insns: List[Tuple[int, str, str]] = []
    for line in text.splitlines():
        m = SASS_FUNC.match(line)
        if m:
            if cur is not None:
                analyse_function(cur, insns)
            cur = kernels.get(m.group(1))
            insns = []
            continue
        if cur is None:
            continue
        m = SASS_INSN.match(line)
        if m:
            om = OPCODE.match(m.group(2))
            if om:
                insns.append((int(m.group(1), 16), om.group(1), om.group(2)))
    if cur is not None:
        analyse_function(cur, insns)


def collect(files: List[str], cuobjdump: str, env: Dict[str, str], want_sass: bool) -> Dict[str, Kernel]:
    kernels: Dict[str, Kernel] = {}
    for f in files:
        try:
            text = run_tool([cuobjdump, "-arch", ARCH, "-res-usage", f], env)
        except ToolError as e:
            if "does not contain device code" in str(e):
                continue  # a host-only object or library
            raise
        if parse_res_usage(text, kernels, f) == 0:
            continue  # no sm_90 cubin in this file (e.g. a host-only object)
        parse_elf(run_tool([cuobjdump, "-arch", ARCH, "-elf", f], env), kernels)
        if want_sass:
            parse_sass(run_tool([cuobjdump, "-arch", ARCH, "-sass", f], env), kernels)
    return kernels


def spill_sources(files: List[str], cuobjdump: str, nvdisasm: str, env: Dict[str, str],
                  wanted: Dict[str, Kernel]) -> Dict[str, List[str]]:
    """For --where: each spill store / refill of the wanted kernels with the
    source lines (inlining chain) that nvdisasm -gi gives it (the build's
    -lineinfo); the cubins are extracted with cuobjdump -xelf."""
    import tempfile
    out: Dict[str, List[str]] = {}
    insn = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
    for f in files:
        with tempfile.TemporaryDirectory() as tmp:
            run_tool([cuobjdump, "-arch", ARCH, "-xelf", "all", os.path.abspath(f)], dict(env, PWD=tmp),
                     cwd=tmp)
            for cubin in sorted(glob.glob(os.path.join(tmp, "*%s*.cubin" % ARCH))):
                text = run_tool([nvdisasm, "-c", "-gi", cubin], env)
                cur: Optional[Kernel] = None
                ctx: List[str] = []
                fresh = True
                for line in text.splitlines():
                    m = re.match(r"\s*\.section\s+\.text\.([^,\s]+)", line)
                    if m:
                        cur = wanted.get(m.group(1))
                        ctx, fresh = [], True
                        continue
                    if cur is None:
                        continue
                    if line.lstrip().startswith("//## File"):
                        if fresh:
                            ctx, fresh = [], False
                        loc = re.sub(r'"([^"]*)"', lambda mm: os.path.relpath(mm.group(1), repo_root())
                                     if mm.group(1).startswith(repo_root()) else mm.group(1),
                                     line.strip()[len("//## File "):])
                        ctx.append(loc.replace(", line ", ":"))
                        continue
                    m = insn.match(line)
                    if not m:
                        continue
                    fresh = True
                    addr = int(m.group(1), 16)
                    if addr in cur.spill_offsets:
                        op = m.group(2).split("(*")[0].strip()
                        out.setdefault(cur.mangled, []).append(
                            "  %05x  %-26s %s" % (addr, op, ctx[0] if ctx else "?"))
    return out


# --------------------------------------------------------------------------
# Report and check
# --------------------------------------------------------------------------
def hot_entry(name: str) -> Optional[Tuple[str, bool, str]]:
    for pat, wide, why in HOT:
        if re.fullmatch(pat, name):
            return pat, wide, why
    return None


def excused(k: Kernel, check: str) -> Tuple[Optional[Tuple[str, str, int, str]], str]:
    """The exception that covers this kernel's offence, and why a matching
    one does not (its limit passed, or a spill in an innermost loop)."""
    why_not = ""
    for e in EXCEPTIONS:
        if e[1] != check or not re.fullmatch(e[0], k.short):
            continue
        if check == "stack":
            if max(k.stack, k.local) > e[2]:
                why_not = "exception %r allows %d B, this is %d B" % (e[0], e[2], max(k.stack, k.local))
                continue
            if k.spill_in_inner_loops or k.local_st or k.local_ld:
                why_not = ("exception %r does not cover spills in innermost loops or local arrays"
                           % e[0])
                continue
        return e, ""
    return None, why_not


def widths(d: Dict[int, int]) -> str:
    return " ".join("%d:%d" % (w, d[w]) for w in sorted(d, reverse=True)) or "-"


def row(k: Kernel) -> Dict[str, object]:
    b, why = blocks_per_sm(k.regs, k.threads, k.smem)
    h = hot_entry(k.short)
    return {
        "kernel": k.short, "mangled": k.mangled, "source": k.source, "hot": bool(h),
        "wide": bool(h and h[1]), "regs": k.regs, "stack": k.stack,
        "spill_st": k.spill_st, "spill_ld": k.spill_ld, "spill_sites": len(k.spill_offsets),
        "spill_in_loops": k.spill_in_loops, "spill_in_inner_loops": k.spill_in_inner_loops,
        "spill_in_pack_loops": k.spill_in_pack_loops,
        "local": k.local, "local_st": k.local_st, "local_ld": k.local_ld, "smem": k.smem,
        "threads": k.threads, "blocks_per_sm": b, "limit": why, "calls": k.calls,
        "ldg": {str(w): c for w, c in sorted(k.ldg.items())},
        "stg": {str(w): c for w, c in sorted(k.stg.items())},
        "ldg128_loop": k.ldg128_loop, "stg128_loop": k.stg128_loop,
        "narrow_ldg_loop": k.narrow_ldg_loop, "narrow_stg_loop": k.narrow_stg_loop,
        "have_sass": k.have_sass,
    }


def spill_text(k: Kernel) -> str:
    if not k.spill_offsets:
        return "0/0" if k.have_sass else "0 sites"
    if not k.have_sass:
        return "%d sites" % len(k.spill_offsets)
    return "%d/%d (%d sites: %d in loops, %d inner, %d pack)" % (
        k.spill_st, k.spill_ld, len(k.spill_offsets), k.spill_in_loops, k.spill_in_inner_loops,
        k.spill_in_pack_loops)


def blocks_text(k: Kernel) -> str:
    b, why = blocks_per_sm(k.regs, k.threads, k.smem)
    return "unknown" if b is None else "%d (%s)" % (b, why)


def print_text(kernels: List[Kernel]) -> None:
    hdr = ("kernel", "regs", "stack", "spill st/ld B", "local", "smem", "block", "blk/SM",
           "calls", "LDG B:n", "STG B:n", "128b in loops ld/st")
    lines = [hdr]
    for k in kernels:
        loc = "0"
        if k.local or k.local_st or k.local_ld:
            loc = "%d (st %d, ld %d)" % (k.local, k.local_st, k.local_ld)
        lines.append((("*" if hot_entry(k.short) else " ") + k.short, str(k.regs), str(k.stack),
                      spill_text(k), loc, str(k.smem), str(k.threads or "?"), blocks_text(k),
                      str(k.calls) if k.have_sass else "?",
                      widths(k.ldg) if k.have_sass else "?", widths(k.stg) if k.have_sass else "?",
                      "%d/%d" % (k.ldg128_loop, k.stg128_loop) if k.have_sass else "?"))
    w = [max(len(l[i]) for l in lines) for i in range(len(hdr))]
    for l in lines:
        print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(l)).rstrip())
    print("* hot (HOT in %s). Bytes throughout; B:n = access width in bytes : instructions; "
          "spill st/ld = bytes of spill stores / refills, sites in any loop (the row loop counts), "
          "in innermost loops, in 16-byte pack loops; blk/SM = H100 theoretical, static smem only (limit)."
          % os.path.relpath(os.path.abspath(__file__)))


def print_markdown(kernels: List[Kernel]) -> None:
    print("| kernel | regs | stack B | spill st/ld B | smem B | block | blocks/SM | "
          "128-bit LDG in loops | 128-bit STG in loops |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in kernels:
        ld = ("yes (%d)" % k.ldg128_loop if k.ldg128_loop else "no") if k.have_sass else "?"
        st = ("yes (%d)" % k.stg128_loop if k.stg128_loop else "no") if k.have_sass else "?"
        sp = "%d/%d" % (k.spill_st, k.spill_ld)
        print("| `%s` | %d | %d | %s | %d | %s | %s | %s | %s |" % (
            k.short, k.regs, k.stack, sp, k.smem, k.threads or "?", blocks_text(k), ld, st))


def ce_static_smem_reserve() -> int:
    """CE_STATIC_SMEM_RESERVE from cuda/cross_entropy.cuh."""
    with open(os.path.join(repo_root(), "cuda", "cross_entropy.cuh")) as f:
        m = re.search(r"CE_STATIC_SMEM_RESERVE\s*=\s*(\d+)", f.read())
    if not m:
        raise SystemExit("sass_guard: CE_STATIC_SMEM_RESERVE not found in cuda/cross_entropy.cuh")
    return int(m.group(1))


def check(kernels: List[Kernel], strict: bool) -> int:
    failures: List[str] = []
    notes: List[str] = []
    used = set()
    me = os.path.relpath(os.path.abspath(__file__), repo_root())
    for pat, wide, why in HOT:
        if not any(re.fullmatch(pat, k.short) for k in kernels):
            failures.append("HOT pattern %r (%s) matches no kernel: renamed? update HOT in %s"
                            % (pat, why, me))
    nhot = 0
    for k in kernels:
        h = hot_entry(k.short)
        if not h:
            continue
        nhot += 1
        if not k.have_sass:
            failures.append("%s: no SASS read (is nvdisasm there?)" % k.short)
            continue
        bad = []
        if k.stack:
            bad.append("%d B stack frame" % k.stack)
        if k.spill_st or k.spill_ld:
            bad.append("spills: %d B stored, %d B reloaded at %d sites (%d inside loops, %d in "
                       "innermost loops, %d in 16-byte-pack loops)"
                       % (k.spill_st, k.spill_ld, len(k.spill_offsets), k.spill_in_loops,
                          k.spill_in_inner_loops, k.spill_in_pack_loops))
        if k.local or k.local_st or k.local_ld:
            bad.append("local memory: %d B, non-spill STL %d B / LDL %d B"
                       % (k.local, k.local_st, k.local_ld))
        if bad:
            e, why_not = excused(k, "stack")
            if e:
                used.add(e)
                notes.append("excused %s: %s" % (k.short, "; ".join(bad)))
            else:
                failures.append("%s (hot: %s): %s.%s Fix the kernel, or excuse it in EXCEPTIONS "
                                "of %s with a reason (--where shows the source lines)"
                                % (k.short, h[2], "; ".join(bad),
                                   " (%s.)" % why_not if why_not else "", me))
        if h[1] and (k.ldg128_loop == 0 or k.stg128_loop == 0):
            what = []
            if k.ldg128_loop == 0:
                what.append("no LDG.E.128 in any loop (loads B:n %s)" % widths(k.ldg))
            if k.stg128_loop == 0:
                what.append("no STG.E.128 in any loop (stores B:n %s)" % widths(k.stg))
            e, _ = excused(k, "wide")
            if e:
                used.add(e)
                notes.append("excused %s: %s" % (k.short, "; ".join(what)))
            else:
                failures.append("%s (hot: %s) lost its 128-bit global accesses: %s"
                                % (k.short, h[2], "; ".join(what)))
    # Every fused CE kernel's static shared memory fits the reserve its
    # launcher keeps out of the dynamic row cache (CE_STATIC_SMEM_RESERVE in
    # cuda/cross_entropy.cuh; cuda/context.cu checks it at culoss_create on
    # a GPU, the emulator cannot measure it): the compiler's own figure.
    reserve = ce_static_smem_reserve()
    for k in kernels:
        if re.match(r"ce_(cluster_)?kernel<", k.short) and k.smem > reserve:
            failures.append("%s: %d B of static shared memory, above CE_STATIC_SMEM_RESERVE = %d"
                            % (k.short, k.smem, reserve))
    for e in EXCEPTIONS:
        if e not in used:
            msg = ("exception %r (%s) excuses nothing now: remove it from EXCEPTIONS in %s"
                   % (e[0], e[1], me))
            (failures if strict else notes).append(msg)
    for e in EXCEPTIONS:
        if e in used:
            notes.append("exception %r (%s, <= %d B): %s" % (e[0], e[1], e[2], e[3]))
    for n in notes:
        print("note: " + n)
    for f in failures:
        print("FAIL: " + f)
    print("sass_guard: %s: %d kernels, %d hot, %d failure(s), %d exception(s) used -> %s"
          % (ARCH, len(kernels), nhot, len(failures), len(used), "FAILED" if failures else "passed"))
    return 1 if failures else 0


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the header of this script for the details.")
    ap.add_argument("files", nargs="+", help="libculoss.so / libculoss.a / CUDA object files")
    ap.add_argument("--check", action="store_true",
                    help="fail on spills, stack or lost 128-bit accesses in the hot kernels")
    ap.add_argument("--strict", action="store_true", help="with --check: stale exceptions fail too")
    ap.add_argument("--hot", action="store_true", help="report the hot kernels only")
    ap.add_argument("--filter", metavar="REGEX", help="report the kernels whose short name matches")
    ap.add_argument("--markdown", action="store_true", help="report as a Markdown table")
    ap.add_argument("--json", action="store_true", help="report as JSON")
    ap.add_argument("--where", action="store_true",
                    help="also list each spill store/refill of the reported kernels with its "
                         "source line (nvdisasm -gi; slower)")
    ap.add_argument("--quiet", action="store_true", help="with --check: only the verdict")
    ap.add_argument("--cuobjdump", help="cuobjdump (else $CUOBJDUMP, PATH, the pip package)")
    ap.add_argument("--nvdisasm", help="nvdisasm (else $NVDISASM, beside cuobjdump, PATH, pip)")
    a = ap.parse_args(argv)

    cuobjdump = find_tool("cuobjdump", a.cuobjdump, "CUOBJDUMP")
    if not cuobjdump:
        print("sass_guard: no cuobjdump (pass --cuobjdump, set $CUOBJDUMP, or "
              "pip install nvidia-cuda-cuobjdump)", file=sys.stderr)
        return 2
    nvdisasm = find_tool("nvdisasm", a.nvdisasm, "NVDISASM", beside=cuobjdump)
    if not nvdisasm:
        print("sass_guard: no nvdisasm, which cuobjdump -sass needs (pass --nvdisasm, set "
              "$NVDISASM, or pip install nvidia-cuda-nvdisasm)%s"
              % ("" if a.check else "; reporting without the SASS columns"), file=sys.stderr)
        if a.check or a.where:
            return 2
    for f in a.files:
        if not os.path.isfile(f):
            print("sass_guard: no such file: %s" % f, file=sys.stderr)
            return 2
    env = dict(os.environ)
    if nvdisasm:  # cuobjdump -sass runs the nvdisasm it finds on PATH
        env["PATH"] = os.path.dirname(os.path.abspath(nvdisasm)) + os.pathsep + env.get("PATH", "")
    try:
        kmap = collect(a.files, cuobjdump, env, want_sass=bool(nvdisasm))
    except ToolError as e:
        print("sass_guard: %s" % e, file=sys.stderr)
        return 2
    if not kmap:
        print("sass_guard: no %s cubin in %s (built without sm_90 machine code? the default "
              "CMAKE_CUDA_ARCHITECTURES has it): skipped" % (ARCH, " ".join(a.files)))
        return 77
    kernels = sorted(kmap.values(), key=lambda k: (k.source, k.short))
    shown = kernels
    if a.hot:
        shown = [k for k in shown if hot_entry(k.short)]
    if a.filter:
        shown = [k for k in shown if re.search(a.filter, k.short)]
    if a.json:
        print(json.dumps([row(k) for k in shown], indent=1))
    elif a.markdown:
        print_markdown(shown)
    elif not (a.check and a.quiet):
        print("sass_guard: %s code of %s (cuobjdump: %s)" % (ARCH, " ".join(a.files), cuobjdump))
        print_text(shown)
    if a.where:
        wanted = {k.mangled: k for k in shown if k.spill_offsets}
        try:
            sites = spill_sources(a.files, cuobjdump, nvdisasm, env, wanted) if wanted else {}
        except ToolError as e:
            print("sass_guard: %s" % e, file=sys.stderr)
            return 2
        for k in shown:
            if k.mangled in sites:
                print("spills of %s (offset, instruction, innermost source line):" % k.short)
                print("\n".join(sites[k.mangled]))
    if a.check:
        return check(kernels, a.strict)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
