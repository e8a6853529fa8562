"""Pack the loom-cni plugin with a private Python runtime, so a node without Python can run it.

Theory of operation
-------------------
A container runtime runs CNI plugins as host executables from the node's CNI bin directory, outside any
container. loom-cni is Python (`cni.plugin_main`), and nodes rarely have a Python 3.11, let alone loom's
package. So the image carries a *bundle*: everything needed to run the plugin, taken from the image's own
interpreter, laid out so that nothing on the node is used but the kernel (and `/bin/sh` for the wrapper
`install_cni` writes):

    <bundle>/python3.11            the interpreter binary
    <bundle>/python3.11._pth       sys.path (relative to the binary); its presence also puts Python in
                                   isolated mode: PYTHON* variables and user site-packages are ignored
    <bundle>/lib/<ld.so>           the image's dynamic loader, run explicitly with --library-path, so the
                                   node's glibc and ld.so.cache are never consulted
    <bundle>/lib/*.so*             every shared library the interpreter and its extension modules need
    <bundle>/lib/stdlib.zip        the standard library as unchecked hash-based .pyc (PEP 552), stored
                                   uncompressed so importing it never needs zlib
    <bundle>/lib/lib-dynload/      the standard library's extension modules (those whose libraries resolve)
    <bundle>/lib/loom-cni.zip      the plugin's own modules: exactly the `cni.*` modules that importing
                                   the entry module loads, found by importing it in a fresh interpreter
    <bundle>/bundle.json           id (a digest of all of the above), loader, interpreter and entry module

Shared libraries are found with `ldd` (glibc's, run on files from the image itself). The build ends with
a self-check: the bundle answers the CNI VERSION command under `env -i`, through its own loader, or the
build fails. The id changes whenever any byte of the bundle does, which is what lets `install_cni`
install a new version beside a running one and switch to it atomically.

Usage (in the Containerfile): `python -m deploy.tools.build_cni_bundle --output /opt/loom/cni-bundle`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import marshal
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"
DEFAULT_MODULE = "cni.plugin_main"
STDLIB_ZIP = "stdlib.zip"
PACKAGE_ZIP = "loom-cni.zip"
DYNLOAD_DIR = "lib-dynload"
# Parts of the standard library a CNI plugin never imports: tests, GUI, packaging and tooling. Leaving
# them out halves the bundle; everything else stays, so a rarely taken path (an exception's traceback,
# a lazily imported codec) still finds its modules on the node.
EXCLUDED_STDLIB_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "pydoc_data",
        "venv",
        "distutils",
        DYNLOAD_DIR,
    }
)
# Extension modules with these name prefixes are skipped: GUI and terminal libraries, never used here.
EXCLUDED_EXTENSIONS = ("_tkinter", "_curses", "readline", "_test", "xxlimited", "_xxtest", "_ctypes_test")
# Interpreter flags of every run of the bundle: no bytecode written on the node, UTF-8 whatever the locale.
PYTHON_FLAGS = ("-B", "-X", "utf8")
# Hash-based, unchecked .pyc (PEP 552 flags bit 0 set, bit 1 clear): valid without the source beside it.
_PYC_FLAGS_UNCHECKED_HASH = 0b01
# The VERSION self-check must answer well within this many seconds (it takes about 0.1 s).
SELF_CHECK_TIMEOUT = 30.0
LDD_TIMEOUT = 30.0


class BundleError(Exception):
    """The bundle cannot be built; the message names the file or step and the cause."""


@dataclass(frozen=True, slots=True)
class LddReport:
    """What `ldd` says about one ELF file."""

    libraries: tuple[tuple[str, str], ...]  # (name the loader looks for, file that satisfies it)
    missing: tuple[str, ...]  # names with no file ("not found")
    loader: str | None  # the program interpreter's path, when ldd names one


def parse_ldd(output: str) -> LddReport:
    """Parse glibc `ldd` output. Lines look like `libc.so.6 => /lib/.../libc.so.6 (0x...)`,
    `/lib64/ld-linux-x86-64.so.2 (0x...)` (the loader), `linux-vdso.so.1 (0x...)` (in the kernel, no
    file) or `libfoo.so.1 => not found`."""
    libraries: list[tuple[str, str]] = []
    missing: list[str] = []
    loader: str | None = None
    for raw in output.splitlines():
        line = raw.strip()
        if not line or line in ("statically linked", "not a dynamic executable"):
            continue
        if "=>" in line:
            name, _, target = line.partition("=>")
            target = target.strip().split(" (", 1)[0].strip()
            if target == "not found" or not target:
                missing.append(name.strip())
            else:
                libraries.append((name.strip(), target))
        elif line.startswith("/"):
            loader = line.split(" (", 1)[0].strip()
    return LddReport(tuple(libraries), tuple(missing), loader)


def ldd(path: Path) -> LddReport:
    try:
        result = subprocess.run(
            ["ldd", str(path)], capture_output=True, text=True, timeout=LDD_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise BundleError("ldd is not installed (it comes with glibc's libc-bin)") from None
    except subprocess.TimeoutExpired:
        raise BundleError(f"ldd {path} did not finish within {LDD_TIMEOUT:g}s") from None
    # ldd exits 1 for "not a dynamic executable" (a static extension module): no libraries, not an error.
    if result.returncode != 0 and "not a dynamic executable" not in result.stdout + result.stderr:
        raise BundleError(f"ldd {path} failed ({result.returncode}): {result.stderr.strip()}")
    return parse_ldd(result.stdout)


def pyc_bytes(source: bytes, display_name: str) -> bytes:
    """The .pyc for `source`: PEP 552 header (magic, flags, source hash) and the marshalled code."""
    code = compile(source, display_name, "exec", dont_inherit=True)
    header = (
        importlib.util.MAGIC_NUMBER
        + _PYC_FLAGS_UNCHECKED_HASH.to_bytes(4, "little")
        + importlib.util.source_hash(source)
    )
    return header + marshal.dumps(code)


def _write_pyc(archive: zipfile.ZipFile, source_file: Path, archive_name: str) -> None:
    """Add `source_file` compiled as `archive_name` (ending in .pyc); fixed timestamps keep the bundle
    id a function of the content alone."""
    data = pyc_bytes(source_file.read_bytes(), archive_name[:-1])
    info = zipfile.ZipInfo(archive_name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def stdlib_sources(stdlib: Path) -> list[tuple[Path, str]]:
    """(file, archive name of its .pyc) for every module of the standard library that is kept."""
    found: list[tuple[Path, str]] = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_STDLIB_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = Path(root, name)
                found.append((path, path.relative_to(stdlib).as_posix()[:-3] + ".pyc"))
    return found


def write_stdlib_zip(stdlib: Path, target: Path) -> int:
    """Compile the kept standard library into `target`; the number of modules written. A module that
    does not compile for this interpreter (test data shaped like code) is left out."""
    count = 0
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for source, name in stdlib_sources(stdlib):
            try:
                _write_pyc(archive, source, name)
            except (SyntaxError, ValueError, UnicodeDecodeError):
                continue
            count += 1
    if count == 0:
        raise BundleError(f"no standard library modules found under {stdlib}")
    return count


_CLOSURE_SCRIPT = """
import importlib, json, sys
module = sys.argv[1]
root = module.split(".", 1)[0]
importlib.import_module(module)
found = {}
for name, mod in sorted(sys.modules.items()):
    if name == root or name.startswith(root + "."):
        found[name] = [getattr(mod, "__file__", None), hasattr(mod, "__path__")]
print(json.dumps(found))
"""


def package_closure(python: Path, module: str, cwd: Path) -> dict[str, tuple[Path, bool]]:
    """The modules of `module`'s top-level package that importing `module` loads, in a fresh
    interpreter: name -> (source file, is a package)."""
    try:
        result = subprocess.run(
            [str(python), "-c", _CLOSURE_SCRIPT, module],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=SELF_CHECK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BundleError(f"importing {module} did not finish within {SELF_CHECK_TIMEOUT:g}s") from None
    if result.returncode != 0:
        raise BundleError(f"cannot import {module} with {python}: {result.stderr.strip()}")
    closure: dict[str, tuple[Path, bool]] = {}
    for name, (file, is_package) in json.loads(result.stdout).items():
        if not file or not str(file).endswith(".py"):
            raise BundleError(f"{name} has no Python source file ({file!r}); the bundle needs sources")
        closure[name] = (Path(file), bool(is_package))
    return closure


def write_package_zip(closure: dict[str, tuple[Path, bool]], target: Path) -> None:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, (source, is_package) in sorted(closure.items()):
            base = name.replace(".", "/")
            _write_pyc(archive, source, f"{base}/__init__.pyc" if is_package else f"{base}.pyc")


def _copy_file(source: Path, target: Path) -> None:
    """Copy the content of `source` (symlinks followed) to `target`, readable and executable by all:
    the loader and the interpreter are executed, libraries are mapped."""
    shutil.copyfile(source, target)
    os.chmod(target, 0o755)


def copy_elf_closure(elf_files: Iterable[Path], lib_dir: Path, reports: dict[Path, LddReport]) -> str:
    """Copy every library the given ELF files need into `lib_dir`, under the name the loader asks for;
    returns the loader's file name (also copied there)."""
    loader: str | None = None
    for elf in elf_files:
        report = reports[elf]
        for name, target in report.libraries:
            destination = lib_dir / Path(name).name
            if not destination.exists():
                _copy_file(Path(target), destination)
        if report.loader is not None:
            destination = lib_dir / Path(report.loader).name
            if not destination.exists():
                _copy_file(Path(report.loader), destination)
            loader = loader or destination.name
    if loader is None:
        raise BundleError("ldd named no program interpreter (dynamic loader) for the Python binary")
    return loader


def bundle_digest(root: Path) -> str:
    """A digest of every file's path, mode and content below `root`, the manifest excluded."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(oct(path.stat().st_mode & 0o777).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Bundle:
    root: Path
    id: str
    python: str  # file name of the interpreter, relative to root
    loader: str  # path of the dynamic loader, relative to root
    module: str  # the entry module (`python -m <module>`)

    def command(self, root: Path | None = None) -> list[str]:
        """argv that runs the plugin from this bundle (at `root` when it was copied elsewhere)."""
        base = root if root is not None else self.root
        return [
            str(base / self.loader),
            "--library-path",
            str(base / "lib"),
            str(base / self.python),
            *PYTHON_FLAGS,
            "-m",
            self.module,
        ]


def read_bundle(root: Path) -> Bundle:
    """The bundle at `root`, as its manifest describes it."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{root / MANIFEST}: cannot read the bundle manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{root / MANIFEST}: not a format-{BUNDLE_FORMAT} loom-cni bundle manifest")
    fields = {key: manifest.get(key) for key in ("id", "python", "loader", "module")}
    for key, value in fields.items():
        if not isinstance(value, str) or not value or ".." in value.split("/"):
            raise BundleError(f"{root / MANIFEST}: {key} is missing or not a plain relative name")
    return Bundle(
        root, str(fields["id"]), str(fields["python"]), str(fields["loader"]), str(fields["module"])
    )


def self_check(bundle: Bundle, root: Path | None = None) -> dict[str, object]:
    """Run the CNI VERSION command through the bundle with an empty environment; its JSON answer."""
    request = json.dumps({"cniVersion": "1.0.0"}).encode()
    try:
        result = subprocess.run(
            bundle.command(root),
            input=request,
            capture_output=True,
            env={"CNI_COMMAND": "VERSION"},
            cwd="/",
            timeout=SELF_CHECK_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BundleError(f"the bundle does not run: {e}") from None
    if result.returncode != 0:
        raise BundleError(
            f"the bundle's VERSION check exited {result.returncode}: {result.stderr.decode(errors='replace')}"
        )
    try:
        answer = json.loads(result.stdout)
    except ValueError:
        raise BundleError(f"the bundle's VERSION answer is not JSON: {result.stdout[:200]!r}") from None
    if not isinstance(answer, dict) or not answer.get("supportedVersions"):
        raise BundleError(f"the bundle's VERSION answer lists no supported versions: {answer!r}")
    return answer


def build(output: Path, module: str = DEFAULT_MODULE) -> Bundle:
    """Build the bundle into `output` (which must not exist yet) and check that it runs. The bundled
    interpreter is the one running this function (a virtual environment's base interpreter, with the
    environment's packages providing `module`): its standard library and extension modules must match."""
    if output.exists():
        raise BundleError(f"{output} already exists; remove it or choose another --output")
    interpreter = Path(sys.executable)
    binary = Path(os.path.realpath(interpreter))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    dynload = Path(str(sysconfig.get_config_var("DESTSHARED") or stdlib / DYNLOAD_DIR))
    python_name = f"python{sys.version_info.major}.{sys.version_info.minor}"

    staging = output.with_name(f".{output.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    lib = staging / "lib"
    (lib / DYNLOAD_DIR).mkdir(parents=True)
    _copy_file(binary, staging / python_name)

    reports = {binary: ldd(binary)}
    if reports[binary].missing:
        raise BundleError(
            f"{binary} needs libraries that are not installed: {', '.join(reports[binary].missing)}"
        )
    extensions: list[Path] = []
    for extension in sorted(dynload.glob("*.so")):
        if extension.name.startswith(EXCLUDED_EXTENSIONS):
            continue
        report = ldd(extension)
        if report.missing:
            continue  # its libraries are not in the image: the module is not importable there either
        reports[extension] = report
        extensions.append(extension)
        _copy_file(extension, lib / DYNLOAD_DIR / extension.name)
    loader = copy_elf_closure([binary, *extensions], lib, reports)

    write_stdlib_zip(stdlib, lib / STDLIB_ZIP)
    write_package_zip(package_closure(interpreter, module, cwd=Path("/")), lib / PACKAGE_ZIP)
    (staging / f"{python_name}._pth").write_text(
        "\n".join([f"lib/{STDLIB_ZIP}", f"lib/{PACKAGE_ZIP}", f"lib/{DYNLOAD_DIR}"]) + "\n"
    )
    bundle = Bundle(staging, bundle_digest(staging), python_name, f"lib/{loader}", module)
    manifest = {
        "format": BUNDLE_FORMAT,
        "id": bundle.id,
        "python": bundle.python,
        "loader": bundle.loader,
        "module": bundle.module,
        "python_version": sys.version.split()[0],
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    self_check(bundle)
    staging.rename(output)
    return read_bundle(output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_cni_bundle", description="pack loom-cni with a private Python runtime (see the docstring)"
    )
    parser.add_argument("--output", type=Path, required=True, help="directory to create")
    parser.add_argument("--module", default=DEFAULT_MODULE, help=f"entry module (default {DEFAULT_MODULE})")
    args = parser.parse_args(argv)
    try:
        bundle = build(args.output, args.module)
    except (BundleError, OSError) as e:
        print(f"build_cni_bundle: {e}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in bundle.root.rglob("*") if p.is_file())
    print(f"loom-cni bundle {bundle.id} in {bundle.root} ({size / 1e6:.1f} MB), VERSION check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
