"""Builds stand-in shared libraries for the CUDA libraries that PyTorch's Linux wheel links
against but never calls on a CPU-only run, so that `import torch` works on CPU without the
~4 GB of CUDA wheels (cuDNN, cuBLAS, NCCL, ...).

Why this is safe for the CPU benchmarks: the wheel's libtorch_cuda.so and libtorch_python.so
list these libraries as DT_NEEDED, so the dynamic loader must find a file with each SONAME
and every symbol (and symbol version) that is imported from it, but on a CPU run no CUDA
kernel path is ever taken. Each stand-in function aborts the process with the symbol's name
if it is ever called, so a wrong assumption fails loudly, never silently. The real CUDA
runtime and CUPTI (small, and libtorch_cpu.so itself calls into them) are installed from
PyPI as usual.

The stubs go into torch/lib, which is the LAST entry of the wheel's RPATH: if the real CUDA
wheels are installed later (nvidia/*/lib), the loader finds those first.

Usage: python make_cuda_stubs.py [--remove] SITE_PACKAGES   (idempotent; needs nm, ldd, cc)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

# SONAME of each library replaced by a stub -> the symbol-version name it exports (the
# wheel's libraries import versioned symbols from some of them).
STUBBED = {
    "libcublas.so.13": "libcublas.so.13",
    "libcublasLt.so.13": "libcublasLt.so.13",
    "libcudnn.so.9": "libcudnn.so.9",
    "libcufft.so.12": "libcufft.so.12",
    "libcufile.so.0": None,
    "libcurand.so.10": "libcurand.so.10",
    "libcusparse.so.12": "libcusparse.so.12",
    "libcusparseLt.so.0": None,
    "libnccl.so.2": None,
    "libnvshmem_host.so.3": "NVSHMEM",
}
# The library that receives the unversioned imports that nothing real defines: any stub in
# the dependency tree would do; libcudnn.so.9 is needed by both libtorch_python and
# libtorch_cuda.
CATCH_ALL = "libcudnn.so.9"
# The wheel's libraries that `import torch` loads eagerly.
LOADED = ["libtorch_python.so", "libtorch.so", "libtorch_cuda.so", "libc10_cuda.so",
          "libtorch_nvshmem.so", "libtorch_cpu.so", "libc10.so", "libshm.so"]


def dynamic_symbols(lib: Path, defined: bool) -> list[tuple[str, str | None]]:
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-D", flag, str(lib)], check=True, capture_output=True,
                         text=True).stdout
    symbols = []
    for line in out.splitlines():
        parts = line.split()
        if not parts:
            continue
        kind, name = parts[-2], parts[-1]
        if not defined and kind in ("w", "v"):  # weak imports may stay unresolved
            continue
        name, _, version = name.partition("@")
        symbols.append((name, version.lstrip("@") or None))
    return symbols


def system_libraries(torch_lib: Path) -> list[Path]:
    """The interpreter and the system libraries (libstdc++, libc, ...) the wheel resolves to."""
    # The interpreter (and its libpython) defines the Python C API that libtorch_python imports.
    found = {Path(os.path.realpath(sys.executable))}
    for target in [sys.executable] + [str(torch_lib / name) for name in LOADED]:
        out = subprocess.run(["ldd", target], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split("=>")
            if len(parts) == 2 and parts[1].strip().startswith("/"):
                path = Path(parts[1].split()[0])
                if path.parent != torch_lib and "nvidia" not in path.parts:
                    found.add(path)
    return sorted(found)


MANIFEST = ".cuda-stubs"


def remove_stubs(torch_lib: Path) -> None:
    manifest = torch_lib / MANIFEST
    if manifest.is_file():
        for name in manifest.read_text().split():
            (torch_lib / name).unlink(missing_ok=True)
        manifest.unlink()
        print(f"make_cuda_stubs: stand-ins removed from {torch_lib}")


def main() -> int:
    args = sys.argv[1:]
    remove = "--remove" in args
    args = [a for a in args if a != "--remove"]
    if len(args) != 1:
        print("usage: make_cuda_stubs.py [--remove] SITE_PACKAGES", file=sys.stderr)
        return 2
    site = Path(args[0])
    torch_lib = site / "torch" / "lib"
    if remove:
        remove_stubs(torch_lib)
        return 0
    if not torch_lib.is_dir():
        print(f"make_cuda_stubs: {torch_lib} not found (install torch first)", file=sys.stderr)
        return 1
    remove_stubs(torch_lib)
    nvidia_libs = [p for p in (site / "nvidia").rglob("*.so*") if p.is_file()]
    torch_libs = [torch_lib / name for name in os.listdir(torch_lib) if ".so" in name]
    real_sonames = {p.name for p in nvidia_libs}
    defined = set()
    for lib in torch_libs + nvidia_libs + system_libraries(torch_lib):
        defined.update(name for name, _ in dynamic_symbols(lib, defined=True))

    version_to_stub = {v: so for so, v in STUBBED.items() if v}
    wanted: dict[str, set[str]] = {so: set() for so in STUBBED}
    for name in LOADED:
        for symbol, version in dynamic_symbols(torch_lib / name, defined=False):
            if version in version_to_stub:
                wanted[version_to_stub[version]].add(symbol)
            elif version is None and symbol not in defined:
                wanted[CATCH_ALL].add(symbol)

    made = []
    with tempfile.TemporaryDirectory() as tmp:
        for soname, symbols in wanted.items():
            if soname in real_sonames:
                continue  # the real library is installed (nvidia/*/lib comes first in RPATH)
            source = Path(tmp) / f"{soname}.c"
            lines = ["#include <stdio.h>", "#include <stdlib.h>",
                     "static void stub_called(const char *s) {",
                     f'  fprintf(stderr, "CUDA stub {soname}: %s called; this venv is CPU-only'
                     ' (BENCH_TORCH=full scripts/bench_env.sh installs the real libraries)\\n", s);',
                     "  abort();", "}"]
            for i, symbol in enumerate(sorted(symbols)):
                lines.append(f'void stub_{i}(void) __asm__("{symbol}");')
                lines.append(f'void stub_{i}(void) {{ stub_called("{symbol}"); }}')
            source.write_text("\n".join(lines) + "\n")
            cmd = ["cc", "-shared", "-fPIC", "-O0", "-o", str(torch_lib / soname), str(source),
                   f"-Wl,-soname,{soname}"]
            version = STUBBED[soname]
            if version:
                script = Path(tmp) / f"{soname}.map"
                script.write_text(f"{version} {{ global: *; }};\n")
                cmd.append(f"-Wl,--version-script,{script}")
            subprocess.run(cmd, check=True)
            made.append(soname)
            print(f"make_cuda_stubs: {soname}: {len(symbols)} stand-in symbols")
    (torch_lib / MANIFEST).write_text("\n".join(made) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
