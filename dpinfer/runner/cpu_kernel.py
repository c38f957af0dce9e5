"""The CPU decode-attention kernel (``paged_attention.c``): built once per machine, called via ctypes.

On CPU the torch path of decode attention costs a gather and a small attention call per
request and layer, which on small models is most of a decode step. The C kernel does a whole
layer in one call, reading every request's keys and values in place from the pool.

``load_decode_kernel()`` compiles the source with the system C compiler (``$CC``, else
``cc``) at ``-O3 -march=native`` into ``<cache>/kernels/`` (``$DPINFER_CACHE``, else
``~/.cache/dpinfer``), keyed by the source, the compiler and the CPU's feature flags, so a
cache shared between different machines never loads a library built for another CPU. The
build takes about a second, once; later processes load the library. Without a compiler, or
with ``DPINFER_CPU_KERNEL=0``, it returns ``None`` and decode attention stays on the torch path
(same results, slower); the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from dpinfer.log import get_logger

logger = get_logger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=c11")
OPENMP = "-fopenmp"
BUILD_TIMEOUT_S = 120.0
ENV_SWITCH = "DPINFER_CPU_KERNEL"
"""Set to ``0`` to keep decode attention on the torch path."""


class KernelError(RuntimeError):
    """The kernel reported a failure (a work buffer it could not allocate)."""


class DecodeKernel:
    """``paged_attention.c``'s decode attention (a pool in fp32 or bfloat16), arguments checked."""

    POOL_DTYPES = (torch.float32, torch.bfloat16)

    def __init__(self, library: ctypes.CDLL, path: Path) -> None:
        self.path = path
        fn = library.dpinfer_decode_attention
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fn.argtypes = [p, p, p, p, i64, p, p, i64, i64, i64, i64, ctypes.c_float, p, i32, i32]
        fn.restype = i32
        self._fn = fn

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        table: torch.Tensor,
        rows: torch.Tensor,
        lens: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """``out [B, H, D]`` = attention of ``q [B, H, D]`` over each request's KV in ``k``/``v``
        ``[S, Hkv, D]``: request ``b`` sees slots ``table[rows[b], :lens[b]]`` (``lens`` > 0).
        ``q`` and ``out`` are float32; ``k`` and ``v`` float32 or bfloat16."""
        num_reqs, num_heads, head_dim = q.shape
        for t in (q, out):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("the decode kernel takes contiguous float32 CPU queries and output")
        for t in (k, v):
            if (
                t.dtype not in self.POOL_DTYPES
                or t.dtype != k.dtype
                or not t.is_contiguous()
                or t.device.type != "cpu"
            ):
                raise ValueError("the decode kernel takes a contiguous float32 or bfloat16 CPU pool")
        for t in (table, rows, lens):
            if t.dtype != torch.int64 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("the decode kernel takes contiguous int64 CPU index tensors")
        if out.shape != q.shape or len(rows) != num_reqs or len(lens) != num_reqs:
            raise ValueError(f"decode kernel: q {tuple(q.shape)}, out {tuple(out.shape)}, {len(rows)} rows")
        if k.shape[1:] != v.shape[1:] or k.shape[2] != head_dim or num_heads % k.shape[1]:
            raise ValueError(f"decode kernel: q {tuple(q.shape)} against k/v {tuple(k.shape)}")
        rc = self._fn(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), table.data_ptr(), table.stride(0),
            rows.data_ptr(), lens.data_ptr(), num_reqs, num_heads, k.shape[1], head_dim,
            scale, out.data_ptr(), torch.get_num_threads(), k.dtype == torch.bfloat16,
        )  # fmt: skip
        if rc:
            raise KernelError("decode attention kernel: out of memory for its work buffers")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def _compiler() -> tuple[str, str] | None:
    """The C compiler to use and its version line, or ``None`` when there is none."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return cc, version.splitlines()[0] if version else ""


def _build(cc: str, target: Path) -> str | None:
    """Compile ``SOURCE`` into ``target`` (atomically); the compiler's complaint, or ``None``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            return _compile(cc, Path(tmp) / target.name, target)
    except OSError as e:  # an unwritable cache: the torch path still works
        return str(e)


def _compile(cc: str, built: Path, target: Path) -> str | None:
    error = ""
    for extra in ((OPENMP,), ()):  # without OpenMP the kernel runs on one thread
        cmd = [cc, *FLAGS, *extra, "-o", str(built), str(SOURCE), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.SubprocessError as e:
            return str(e)
        if done.returncode == 0:
            os.replace(built, target)  # concurrent builders: the last rename wins, all equal
            return None
        lines = done.stderr.strip().splitlines()
        error = next((ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit {done.returncode}")
    return error


@functools.cache
def load_decode_kernel(cache_dir: str | None = None) -> DecodeKernel | None:
    """The kernel, built on first use; ``None`` (logged once) when it cannot be had here."""
    from dpinfer.runner.builtin_models import default_cache_dir

    if os.environ.get(ENV_SWITCH, "1") == "0":
        logger.info("%s=0: decode attention runs on the torch path", ENV_SWITCH)
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning("no C compiler (cc or $CC): decode attention runs on the slower torch path")
        return None
    cc, version = compiler
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    target = default_cache_dir(cache_dir) / "kernels" / f"paged_attention-{key.hexdigest()[:16]}.so"
    if not target.exists():
        error = _build(cc, target)
        if error is not None:
            logger.warning("building the CPU attention kernel failed (%s): using the torch path", error)
            return None
        logger.info("built the CPU decode-attention kernel: %s", target)
    try:
        return DecodeKernel(ctypes.CDLL(str(target)), target)
    except OSError as e:
        logger.warning("loading the CPU attention kernel %s failed (%s): using the torch path", target, e)
        return None
