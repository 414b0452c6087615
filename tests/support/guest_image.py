"""Build the end-to-end test guest: Debian's kernel, busybox, python3 and our dependencies.

The guest is a PVH-bootable ``vmlinux`` plus a cpio initramfs, built from
Debian's packages and kept in a cache directory named after everything that
goes into it (package versions, the init script, this recipe's version):

* the kernel and its modules, busybox-static, and the Debian packages of our
  runtime dependencies (python3-psutil, python3-jsonschema,
  python3-cryptography, python3-serial and the python3-* packages they pull
  in) are fetched with ``apt-get download`` and unpacked with ``dpkg -x``:
  the guest proves the agent runs on the distribution's packages, not on
  wheels from an index;
* Debian's ``/usr/bin/python3.11`` and its standard library, and
  ``/usr/sbin/qemu-ga``, are copied from this (Debian) machine together with
  every shared library ``ldd`` lists for them;
* the real account tools: ``useradd`` and ``groupadd`` from Debian's
  ``passwd`` package, ``/etc/login.defs`` and ``nologin`` from ``login``
  (fetched and unpacked the same way, their shared libraries copied as
  ``ldd`` lists them), with ``/etc/passwd``, ``group``, ``shadow`` and
  ``gshadow`` for them to edit: our agent creates each extension's system
  user with them when it runs as root;
* the kernel command line picks the agent (``qga_agent=qga|qemu-ga``), so
  one image serves both, and says how many virtio-serial ports to name
  (``qga_ports=N``).

Our agent's source is not part of the cached image: :func:`agent_overlay`
packs the live checkout into a small second cpio that is appended to the
image for each run (the kernel unpacks concatenated archives in order).

Cache root: ``$QGA_E2E_CACHE`` or ``/var/cache/qga-e2e``.  A finished image
is renamed into place in one step, so an interrupted build never leaves a
half image behind.  The steps and their costs are in
``../shared/reference/vm-e2e.md``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
CHPASSWD_SCRIPT = Path(__file__).with_name("guest_chpasswd.sh")

# Bump when the recipe below changes in a way the inputs do not show.
RECIPE_VERSION = 4

PYTHON = "/usr/bin/python3.11"
QEMU_GA = "/usr/sbin/qemu-ga"

# Our runtime dependencies as Debian packages; their python3-* dependencies
# are added by apt's resolver.
DEPENDENCY_PACKAGES = ("python3-psutil", "python3-jsonschema", "python3-cryptography",
                       "python3-serial")

# Files taken from Debian's account packages (the rest, such as passwd's own
# chpasswd, would replace the image's stand-ins or is never used).
ACCOUNT_FILES = {
    "passwd": ("usr/sbin/useradd", "usr/sbin/groupadd", "etc/default/useradd"),
    "login": ("etc/login.defs", "usr/sbin/nologin"),
}

# Kernel modules the guest loads (their dependencies are added from modules.dep).
MODULES = ("virtio_pci", "virtio_console", "virtio_blk", "ext4", "crc32c_generic", "dummy")

# Parts of the standard library the agent never imports.
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
               "distutils", "site-packages", "dist-packages", "unittest", "venv", "sqlite3",
               "curses", "dbm"}

GUEST_USER = "qgatest"

# python3-cryptography's OpenSSL 3 loads the "legacy" provider at import and
# fails without it: the provider modules come from this package on the host.
OPENSSL_PACKAGE = "libssl3"


class ImageError(RuntimeError):
    """The guest image cannot be built on this machine (the message says why)."""


class GuestImage:
    """A built guest: ``kernel`` (PVH vmlinux) and ``initrd`` (cpio, no agent source)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.kernel = directory / "vmlinux"
        self.initrd = directory / "base.cpio"
        self.manifest = json.loads((directory / "manifest.json").read_text())

    def __repr__(self) -> str:
        return f"GuestImage({self.directory})"


def cache_root() -> Path:
    return Path(os.environ.get("QGA_E2E_CACHE") or "/var/cache/qga-e2e")


def missing_host_tools() -> List[str]:
    """Host programs the build needs that are not installed."""
    needed = ["apt-get", "apt-cache", "dpkg", "dpkg-query", "depmod", "ldd"]
    missing = [tool for tool in needed if shutil.which(tool) is None]
    for path in (PYTHON, QEMU_GA):
        if not os.access(path, os.X_OK):
            missing.append(path)
    return missing


# -- package resolution ---------------------------------------------------------------


def _run(argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    done = subprocess.run(list(argv), text=True, **kwargs)
    if done.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed ({done.returncode}): "
                         f"{(done.stderr or '')[-2000:]}")
    return done


def _candidates(packages: Sequence[str]) -> Dict[str, Optional[str]]:
    """apt's candidate version of each package (None when apt has none), in one call."""
    done = subprocess.run(["apt-cache", "policy", *packages], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    versions: Dict[str, Optional[str]] = {package: None for package in packages}
    current = None
    for line in done.stdout.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif line.strip().startswith("Candidate:") and current in versions:
            version = line.split(":", 1)[1].strip()
            versions[current] = None if version == "(none)" else version
    return versions


def _kernel_package() -> Optional[str]:
    """The kernel package linux-image-amd64 stands for (None when apt knows none)."""
    done = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    for line in done.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    return None


def _python_dependency_closure() -> List[str]:
    """Our dependency packages and every python3-* package they need (recursively)."""
    done = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                 "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                 *DEPENDENCY_PACKAGES])
    names = set()
    for line in done.stdout.splitlines():
        if line.startswith((" ", "<")):
            continue
        name = line.strip()
        # python3-minimal is the interpreter's own package: copied from the host instead.
        if name.startswith("python3-") and name != "python3-minimal":
            names.add(name)
    return sorted(names)


def _installed_version(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return done.stdout.strip() or "absent"


def resolve_inputs() -> Dict[str, object]:
    """Everything the image is made of, with versions: the cache key's source."""
    kernel = _kernel_package()
    if kernel is None:
        # A fresh machine may have no package lists yet: fetch them once.
        _run(["apt-get", "update", "-qq"])
        kernel = _kernel_package()
        if kernel is None:
            raise ImageError("apt knows no linux-image-amd64 even after apt-get update")
    versions = _candidates([kernel, "busybox-static", *ACCOUNT_FILES,
                            *_python_dependency_closure()])
    absent = [package for package, version in versions.items() if version is None]
    if absent:
        raise ImageError("apt has no candidate for " + ", ".join(absent))
    return {
        "recipe": RECIPE_VERSION,
        "kernel_package": kernel,
        "downloads": versions,
        "host": {package: _installed_version(package)
                 for package in ("python3.11-minimal", "libpython3.11-stdlib",
                                 "qemu-guest-agent", "libc6", OPENSSL_PACKAGE)},
        "scripts": hashlib.sha256(INIT_SCRIPT.read_bytes()
                                  + CHPASSWD_SCRIPT.read_bytes()).hexdigest(),
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }


def cache_key(inputs: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# -- building -------------------------------------------------------------------------


def build_guest_image(root: Optional[Path] = None, log=None) -> GuestImage:
    """The cached guest image for the current inputs, built first if needed."""
    missing = missing_host_tools()
    if missing:
        raise ImageError("missing on this machine: " + ", ".join(missing))
    root = root or cache_root()
    inputs = resolve_inputs()
    final = root / cache_key(inputs)
    if (final / "manifest.json").is_file():
        os.utime(final)  # in use: keeps it from being pruned as stale
        return GuestImage(final)
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)  # QEMU may run as another user and reads the kernel here
    except OSError as error:
        raise ImageError(f"cannot use the image cache {root} ({error.strerror}); "
                         "set QGA_E2E_CACHE to a writable directory") from None
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        _Builder(inputs, root / "debs", staging, log).build()
        os.chmod(staging, 0o755)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent build's result
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_images(root, keep=final)
    return GuestImage(final)


def _remove_stale_images(root: Path, keep: Path, unused_for: float = 3600.0) -> None:
    """Free the ~130 MB of images built from other inputs and unused for an hour.

    The hour spares an image another checkout (an older commit, a concurrent
    run) is using right now: every use touches the image's directory.
    """
    now = time.time()
    for candidate in root.iterdir():
        image = len(candidate.name) == 16 and (candidate / "manifest.json").is_file()
        abandoned_build = candidate.name.startswith(".build-")  # its builder was killed
        if (candidate != keep and candidate.is_dir() and (image or abandoned_build)
                and now - candidate.stat().st_mtime > unused_for):
            shutil.rmtree(candidate, ignore_errors=True)


class _Builder:
    """One build of the image into ``out`` (a fresh directory)."""

    def __init__(self, inputs: Dict[str, object], debs: Path, out: Path, log):
        self.inputs = inputs
        self.debs = debs
        self.out = out
        self.tree = out / "tree"
        self.log = log or (lambda message: None)

    def build(self) -> None:
        self.debs.mkdir(parents=True, exist_ok=True)
        self.tree.mkdir()
        downloads: Dict[str, str] = self.inputs["downloads"]  # type: ignore[assignment]
        debs = self._download(downloads)
        kernel_root = self.out / "kernel"
        self.log("unpacking the kernel")
        _run(["dpkg", "-x", str(debs[self.inputs["kernel_package"]]), str(kernel_root)])
        self._kernel(kernel_root)
        self._busybox(debs["busybox-static"])
        self.log("unpacking python packages")
        for package, deb in debs.items():
            if package.startswith("python3-"):
                _run(["dpkg", "-x", str(deb), str(self.tree)])
        self._python()
        self._qemu_ga()
        self._accounts(debs)
        self._etc()
        self.log("writing the cpio")
        with open(self.out / "base.cpio", "wb") as archive:
            write_cpio(self.tree, archive)
        shutil.rmtree(self.tree)
        shutil.rmtree(kernel_root)
        (self.out / "manifest.json").write_text(json.dumps(self.inputs, indent=1, sort_keys=True))

    def _download(self, versions: Dict[str, str]) -> Dict[str, Path]:
        def deb_name(package: str, version: str) -> str:
            return f"{package}_{version.replace(':', '%3a')}_"

        wanted = {package: deb_name(package, version) for package, version in versions.items()}
        present = {path.name: path for path in self.debs.glob("*.deb")}

        def find(prefix: str) -> Optional[Path]:
            for name, path in present.items():
                if name.startswith(prefix):
                    return path
            return None

        missing = [f"{package}={versions[package]}" for package, prefix in wanted.items()
                   if find(prefix) is None]
        if missing:
            self.log(f"apt-get download {len(missing)} packages")
            _run(["apt-get", "download", "-qq", *missing], cwd=self.debs)
            present = {path.name: path for path in self.debs.glob("*.deb")}
        found = {}
        for package, prefix in wanted.items():
            path = find(prefix)
            if path is None:
                raise ImageError(f"apt-get download did not produce {prefix}*.deb")
            found[package] = path
        return found

    # -- kernel --

    def _kernel(self, kernel_root: Path) -> None:
        release = self.inputs["kernel_package"][len("linux-image-"):]  # type: ignore[index]
        _run(["depmod", "-b", str(kernel_root), release])
        modules_dir = kernel_root / "lib" / "modules" / release
        order = module_load_order(modules_dir, MODULES)
        target = self.tree / "lib" / "modules" / "e2e"
        target.mkdir(parents=True)
        names = []
        for relative in order:
            source = modules_dir / relative
            name = source.name.split(".ko")[0]
            if source.name.endswith(".ko.xz"):
                (target / f"{name}.ko").write_bytes(lzma.decompress(source.read_bytes()))
            else:
                shutil.copyfile(source, target / f"{name}.ko")
            names.append(name)
        (self.tree / "etc" / "e2e").mkdir(parents=True)
        (self.tree / "etc" / "e2e" / "modules").write_text("\n".join(names) + "\n")
        vmlinuz = next((kernel_root / "boot").glob("vmlinuz-*"))
        self.log("extracting vmlinux for PVH boot")
        (self.out / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))

    # -- userspace --

    def _busybox(self, deb: Path) -> None:
        unpacked = self.out / "busybox"
        _run(["dpkg", "-x", str(deb), str(unpacked)])
        busybox = unpacked / "bin" / "busybox"
        (self.tree / "bin").mkdir(exist_ok=True)
        shutil.copy2(busybox, self.tree / "bin" / "busybox")
        applets = _run([str(busybox), "--list-full"]).stdout.split()
        for applet in applets:
            link = self.tree / applet
            if link.exists() or link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
        shutil.rmtree(unpacked)

    def _python(self) -> None:
        self.log("copying python3.11 and its standard library")
        self._copy_with_libraries(PYTHON)
        (self.tree / "usr" / "bin" / "python3").symlink_to("python3.11")
        source = Path("/usr/lib/python3.11")
        target = self.tree / "usr" / "lib" / "python3.11"

        def ignore(directory: str, names: List[str]) -> List[str]:
            if Path(directory) == source:
                return [name for name in names
                        if name in STDLIB_SKIP or name.startswith("config-")]
            return []

        shutil.copytree(source, target, symlinks=True, ignore=ignore)
        for extension in (target / "lib-dynload").glob("*.so"):
            self._copy_libraries(extension)
        for extension in (self.tree / "usr" / "lib" / "python3").rglob("*.so"):
            self._copy_libraries(extension)
        self._openssl_modules()
        # Debian's packages ship no bytecode (postinst compiles it): compile
        # here so each guest boot does not.  Same interpreter, same magic.
        _run([PYTHON, "-m", "compileall", "-q", "-j0",
              str(self.tree / "usr" / "lib" / "python3" / "dist-packages")])

    def _openssl_modules(self) -> None:
        """OpenSSL's provider modules (legacy.so), where libcrypto looks for them."""
        done = _run(["dpkg-query", "-L", OPENSSL_PACKAGE])
        modules = [line for line in done.stdout.splitlines()
                   if "/ossl-modules/" in line and line.endswith(".so")]
        if not modules:
            raise ImageError(f"{OPENSSL_PACKAGE} on this machine has no OpenSSL provider modules")
        for module in modules:
            self._copy_with_libraries(module)

    def _qemu_ga(self) -> None:
        self._copy_with_libraries(QEMU_GA)

    def _accounts(self, debs: Dict[str, Path]) -> None:
        """useradd, groupadd, nologin, login.defs from Debian's packages, and their libraries."""
        for package, members in ACCOUNT_FILES.items():
            unpacked = self.out / package
            _run(["dpkg", "-x", str(debs[package]), str(unpacked)])
            for member in members:
                target = self.tree / member
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(unpacked / member, target)
                if os.access(target, os.X_OK):
                    _require_libraries(unpacked / member)
                    self._copy_libraries(unpacked / member)
            shutil.rmtree(unpacked)

    def _etc(self) -> None:
        etc = self.tree / "etc"
        etc.mkdir(exist_ok=True)
        shutil.copyfile("/etc/os-release", etc / "os-release")
        (etc / "hostname").write_text("qga-e2e\n")
        (etc / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/sh\n"
            f"{GUEST_USER}:x:1000:1000:e2e test user:/home/{GUEST_USER}:/bin/sh\n")
        (etc / "group").write_text(f"root:x:0:\n{GUEST_USER}:x:1000:\n")
        shadow = etc / "shadow"
        shadow.write_text(f"root:*:19000:0:99999:7:::\n{GUEST_USER}:!:19000:0:99999:7:::\n")
        os.chmod(shadow, 0o600)
        gshadow = etc / "gshadow"  # useradd --user-group keeps it in step with group
        gshadow.write_text(f"root:*::\n{GUEST_USER}:!::\n")
        os.chmod(gshadow, 0o600)
        (etc / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
        for directory in ("root", f"home/{GUEST_USER}", "proc", "sys", "dev", "run", "tmp",
                          "mnt", "var", "opt"):
            (self.tree / directory).mkdir(parents=True, exist_ok=True)
        (self.tree / "var" / "run").symlink_to("/run")
        # qemu-ga and qga run "/sbin/shutdown -h -P +0 ..." for guest-shutdown.
        shutdown = self.tree / "sbin" / "shutdown"
        if shutdown.is_symlink() or shutdown.exists():
            shutdown.unlink()
        # It names its arguments on the console, so a test can tell what asked for it.
        shutdown.write_text("#!/bin/sh\n# Stand-in for the real shutdown: no init system here.\n"
                            'echo "e2e-shutdown: $*" > /dev/console\n'
                            "sync\nexec poweroff -f\n")
        os.chmod(shutdown, 0o755)
        # guest-set-user-password runs chpasswd, which busybox-static lacks.
        for script, path in ((INIT_SCRIPT, "init"), (CHPASSWD_SCRIPT, "usr/sbin/chpasswd")):
            target = self.tree / path
            shutil.copyfile(script, target)
            os.chmod(target, 0o755)

    # -- helpers --

    def _copy_with_libraries(self, program: str) -> None:
        target = self.tree / program.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(program, target)
        self._copy_libraries(Path(program))

    def _copy_libraries(self, binary: Path) -> None:
        for library in shared_libraries(binary):
            target = self.tree / library.lstrip("/")
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(library), target)


def shared_libraries(binary: Path) -> List[str]:
    """Absolute paths of the libraries ``ldd`` resolves for ``binary`` (with the loader)."""
    done = subprocess.run(["ldd", str(binary)], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL)
    libraries = []
    for line in done.stdout.splitlines():
        parts = line.split()
        if "=>" in parts:
            index = parts.index("=>")
            if index + 1 < len(parts) and parts[index + 1].startswith("/"):
                libraries.append(parts[index + 1])
        elif parts and parts[0].startswith("/"):
            libraries.append(parts[0])  # the dynamic loader, as /lib64/ld-linux-x86-64.so.2
    return libraries


def _require_libraries(binary: Path) -> None:
    """ImageError when ``ldd`` cannot find a library of ``binary`` on this machine."""
    done = subprocess.run(["ldd", str(binary)], text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    missing = [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]
    if missing:
        raise ImageError(f"{binary.name} needs libraries this machine lacks: "
                         + ", ".join(missing))


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> List[str]:
    """Module paths (relative to ``modules_dir``) in an order insmod can load them.

    Built-in modules (modules.builtin) are skipped; a wanted module unknown
    to this kernel is an error.
    """
    dependencies: Dict[str, List[str]] = {}
    by_name: Dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        dependencies[path] = rest.split()
        by_name[_module_name(path)] = path
    builtin = {_module_name(line) for line in
               (modules_dir / "modules.builtin").read_text().split()}
    order: List[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dependency in dependencies.get(path, []):
            visit(dependency)
        order.append(path)

    for name in wanted:
        if name in by_name:
            visit(by_name[name])
        elif name not in builtin:
            raise ImageError(f"kernel module {name} not found in {modules_dir}")
    return order


def _module_name(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside Debian's XZ-compressed bzImage (PVH boots it directly)."""
    magic = b"\xfd7zXZ\x00"
    start = vmlinuz.find(magic)
    while start >= 0:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = decompressor.decompress(vmlinuz[start:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        start = vmlinuz.find(magic, start + 1)
    raise ImageError("no XZ-compressed ELF kernel found in vmlinuz")


# -- cpio -----------------------------------------------------------------------------


def write_cpio(tree: Path, out, prefix: str = "") -> None:
    """Write ``tree`` as a "newc" cpio archive (what the kernel unpacks), owned by root.

    Parents come before their children; modes and modification times are
    kept (the kernel preserves mtimes, which keeps the bytecode valid).
    """
    inode = 1
    for directory, subdirectories, files in os.walk(tree):
        subdirectories.sort()
        relative_dir = os.path.relpath(directory, tree)
        entries = [relative_dir] if relative_dir != "." else []
        entries += [os.path.join(relative_dir, name) if relative_dir != "." else name
                    for name in sorted(files + [d for d in subdirectories
                                                if os.path.islink(os.path.join(directory, d))])]
        for relative in entries:
            path = os.path.join(tree, relative)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                data = os.readlink(path).encode()
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as source:
                    data = source.read()
            else:
                data = b""
            _cpio_entry(out, prefix + relative, info.st_mode, int(info.st_mtime), data, inode)
            inode += 1
    _cpio_entry(out, "TRAILER!!!", 0, 0, b"", 0)


def _cpio_entry(out, name: str, mode: int, mtime: int, data: bytes, inode: int) -> None:
    encoded = name.encode() + b"\0"
    fields = (inode, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


def agent_overlay(out_path: Path) -> Path:
    """A cpio holding the live checkout's ``qga`` package at ``/opt/qga`` (compiled)."""
    staging = Path(tempfile.mkdtemp(prefix="qga-overlay-"))
    try:
        package = staging / "opt" / "qga" / "qga"
        for source in (REPO / "qga").rglob("*"):
            if "__pycache__" in source.parts or not source.is_file():
                continue
            if source.suffix not in (".py", ".json"):
                continue
            target = package / source.relative_to(REPO / "qga")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)  # follows the qapi-schema.json symlink
            shutil.copystat(source, target)
        _run([PYTHON, "-m", "compileall", "-q", "-j0", str(package)])
        with open(out_path, "wb") as archive:
            write_cpio(staging, archive)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_path


def guest_initrd(image: GuestImage, workdir: Path) -> Path:
    """``workdir/initrd.cpio``: the cached base image followed by the agent overlay."""
    overlay = agent_overlay(workdir / "overlay.cpio")
    initrd = workdir / "initrd.cpio"
    with open(initrd, "wb") as out:
        with open(image.initrd, "rb") as base:
            shutil.copyfileobj(base, out, 1 << 20)
        with open(overlay, "rb") as extra:
            shutil.copyfileobj(extra, out)
    overlay.unlink()
    return initrd
