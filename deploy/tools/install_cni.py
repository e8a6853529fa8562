"""Install loom-cni on a node: the plugin into the CNI bin directory, its entry into the network config.

Theory of operation
-------------------
Runs in the `install-cni` container of the node agent's pod, with the node's CNI directories mounted
(`/opt/cni/bin`, `/etc/cni/net.d` on most distributions). One *pass* makes the node look like this, and
does nothing when it already does (so it can run again and again):

1. the plugin bundle (`deploy.tools.build_cni_bundle`) is at `<bin>/loom-cni.d/<bundle id>/`: copied to a
   temporary directory, checked by running the CNI VERSION command through it, then renamed into place;
2. `<bin>/loom-cni` is a small `/bin/sh` wrapper that runs the bundle's interpreter through the bundle's
   own dynamic loader (nothing of the node's userland but `/bin/sh` is used); it is replaced atomically
   (write a temporary file, rename), so a runtime never executes a half-written plugin;
3. the network configuration the runtime uses -- the first file of the configuration directory in
   lexical order with a `.conf`, `.conflist` or `.json` name that holds a network configuration, which is
   how libcni (containerd, CRI-O) chooses -- ends with exactly one `{"type": "loom-cni", ...}` entry,
   taken from the plugin configuration file (a ConfigMap in Kubernetes). A single-plugin `.conf` becomes
   a `.conflist` of the same name holding the original plugin first. The file is rewritten atomically
   and only when its content changes (primary CNIs that watch their own file are not disturbed);
4. bundle versions other than the current one are removed.

`install --watch` repeats the pass every `--interval` seconds until SIGTERM: it waits for the primary
CNI to write its configuration on a fresh node, and puts the loom-cni entry back when the primary CNI
rewrites its file (Calico and Cilium do on restart). Between such a rewrite and the next pass, new pods
of that node start without capture: keep the interval short.

Failure handling is fail-closed, the same as the plugin's: nothing is removed when the agent's pod stops
or restarts, because a node whose chain lost loom-cni would start enrolled pods uncaptured. While no
agent runs, the plugin answers "try again later" and the kubelet retries the pod's sandbox. Removing
loom is therefore an explicit step, `uninstall` (the cleanup DaemonSet in
`deploy/kubernetes/uninstall/`): it takes the loom-cni entry out of every configuration file in the
directory and deletes the wrapper and the bundles.

Run as `python -m deploy.tools.install_cni {install,check,uninstall} ...` (`--help` lists the flags).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.tools.build_cni_bundle import PYTHON_FLAGS, Bundle, BundleError, read_bundle, self_check

log = logging.getLogger("install-cni")

PLUGIN_TYPE = "loom-cni"
WRAPPER_NAME = "loom-cni"
BUNDLES_DIR = "loom-cni.d"
# libcni's ConfFiles: the extensions a runtime reads from the configuration directory.
CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")
# Chaining needs prevResult, which CNI 0.1.0/0.2.0 do not have.
OLDEST_CHAINABLE_VERSION = (0, 3, 0)
DEFAULT_INTERVAL = 10.0
# A configuration file larger than this is not a CNI network configuration (they are a few KiB).
MAX_CONFIG_BYTES = 1 << 20
_TEMP_PREFIX = ".loom-cni-"


class InstallError(Exception):
    """The node cannot be brought to the installed state; the message names the file and the cause."""


# ---------------------------------------------------------------------------------------------------
# the network configuration (pure)


def read_plugin_entry(text: str, source: str) -> dict[str, Any]:
    """The loom-cni entry to chain, from the plugin configuration file's JSON text."""
    try:
        entry = json.loads(text)
    except ValueError as e:
        raise InstallError(f"{source}: not JSON: {e}") from None
    if not isinstance(entry, dict):
        raise InstallError(f"{source}: expected a JSON object (the loom-cni entry of the plugin chain)")
    if entry.get("type") != PLUGIN_TYPE:
        raise InstallError(f'{source}: "type" must be {PLUGIN_TYPE!r}, got {entry.get("type")!r}')
    for key in ("name", "cniVersion"):
        if key in entry:
            raise InstallError(f"{source}: {key!r} belongs to the network configuration, not to the entry")
    return entry


def is_network_config(value: object) -> bool:
    """A network configuration list (`plugins`) or a single-plugin configuration (`type`)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return False
    plugins = value.get("plugins")
    if plugins is not None:
        return isinstance(plugins, list) and all(isinstance(p, dict) for p in plugins)
    return isinstance(value.get("type"), str)


def _version(text: object) -> tuple[int, ...]:
    if not isinstance(text, str):
        return ()
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


def chained(config: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """`config` as a configuration list whose last plugin is `entry` and that holds no other loom-cni
    entry. The original plugins keep their order: the primary plugin must run first, since loom-cni
    needs the pod's addresses from its result."""
    version = config.get("cniVersion")
    if _version(version) < OLDEST_CHAINABLE_VERSION:
        raise InstallError(
            f"network {config.get('name')!r} has cniVersion {version!r}: chaining needs 0.3.0 or later"
        )
    if "plugins" in config:
        result = {key: value for key, value in config.items() if key != "plugins"}
        plugins = [dict(p) for p in config["plugins"]]
    else:
        # A single plugin becomes the first of a list; name and version move to the list itself.
        result = {"cniVersion": version, "name": config["name"]}
        plugins = [{key: value for key, value in config.items() if key not in ("cniVersion", "name")}]
    result["plugins"] = [p for p in plugins if p.get("type") != PLUGIN_TYPE] + [dict(entry)]
    return result


def unchained(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` without any loom-cni entry (unchanged when it has none)."""
    result = dict(config)
    if isinstance(config.get("plugins"), list):
        result["plugins"] = [p for p in config["plugins"] if not _is_loom(p)]
    return result


def _is_loom(plugin: object) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def config_file_names(names: Sequence[str]) -> list[str]:
    """The names a runtime considers, in the order it considers them."""
    return sorted(n for n in names if os.path.splitext(n)[1] in CONFIG_EXTENSIONS)


def chained_file_name(name: str, config: Mapping[str, Any]) -> str:
    """Where the chained form of `name` is written: a single-plugin file becomes a `.conflist`."""
    if "plugins" in config:
        return name
    return os.path.splitext(name)[0] + ".conflist"


def wrapper_script(bundle: Bundle) -> str:
    """The `/bin/sh` plugin executable that runs `bundle` from `<its directory>/loom-cni.d/<id>`, with
    the same command line as `Bundle.command` (which the install and build checks run)."""
    flags = " ".join(PYTHON_FLAGS)
    return f"""#!/bin/sh
# loom-cni: the chained CNI plugin of the loom mesh, written by loom's install-cni (deploy/tools).
# It runs the plugin (Python) with the interpreter, libraries and dynamic loader bundled beside it, so
# the node needs no Python. Remove it with the cleanup DaemonSet in deploy/kubernetes/uninstall/.
case "$0" in
  */*) here=${{0%/*}} ;;
  *) here=$(command -v -- "$0") && here=${{here%/*}} ;;
esac
b="$here/{BUNDLES_DIR}/{bundle.id}"
unset LD_PRELOAD LD_LIBRARY_PATH
LC_ALL=C
export LC_ALL
exec "$b/{bundle.loader}" --library-path "$b/lib" "$b/{bundle.python}" {flags} -m {bundle.module} "$@"
"""


# ---------------------------------------------------------------------------------------------------
# files


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data`: a temporary file in the same directory (a name no runtime reads),
    flushed to disk, then renamed over it."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _render(config: Mapping[str, Any]) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()


@dataclass(frozen=True, slots=True)
class NetworkConfigFile:
    path: Path
    config: dict[str, Any]


def read_network_configs(net_dir: Path) -> tuple[list[NetworkConfigFile], list[str]]:
    """Every network configuration file of `net_dir` in the runtime's order, and a warning for each
    candidate file that does not hold one."""
    try:
        names = os.listdir(net_dir)
    except FileNotFoundError:
        raise InstallError(f"the CNI configuration directory {net_dir} does not exist") from None
    found: list[NetworkConfigFile] = []
    warnings: list[str] = []
    for name in config_file_names(names):
        path = net_dir / name
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
            value = json.loads(data) if len(data) <= MAX_CONFIG_BYTES else None
        except (OSError, ValueError) as e:
            warnings.append(f"{path}: skipped, not readable JSON ({e})")
            continue
        if not is_network_config(value):
            warnings.append(f"{path}: skipped, not a CNI network configuration")
            continue
        assert isinstance(value, dict)
        found.append(NetworkConfigFile(path, value))
    return found, warnings


@dataclass(frozen=True, slots=True)
class Layout:
    """Where things go on the node (as mounted in the installer's container)."""

    bin_dir: Path
    net_dir: Path

    @property
    def wrapper(self) -> Path:
        return self.bin_dir / WRAPPER_NAME

    @property
    def bundles(self) -> Path:
        return self.bin_dir / BUNDLES_DIR


@dataclass
class PassReport:
    """What one pass changed (empty when the node was already installed)."""

    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def install_bundle(bundle: Bundle, layout: Layout, report: PassReport) -> None:
    target = layout.bundles / bundle.id
    if target.is_dir():
        return
    layout.bundles.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=layout.bundles, prefix=f"{_TEMP_PREFIX}{bundle.id}-"))
    try:
        shutil.copytree(bundle.root, staging, dirs_exist_ok=True)
        os.chmod(staging, 0o755)
        # The copy must run from where it will live on the node, before anything points at it.
        self_check(read_bundle(staging))
        os.rename(staging, target)
    except BundleError as e:
        raise InstallError(f"the copied bundle does not run from {layout.bundles}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.changes.append(f"installed the plugin bundle {bundle.id} in {target}")


def install_wrapper(bundle: Bundle, layout: Layout, report: PassReport) -> None:
    script = wrapper_script(bundle).encode()
    try:
        current = layout.wrapper.read_bytes()
    except FileNotFoundError:
        current = None
    if current == script and os.access(layout.wrapper, os.X_OK):
        return
    _atomic_write(layout.wrapper, script, 0o755)
    report.changes.append(f"wrote {layout.wrapper} (bundle {bundle.id})")


def remove_other_bundles(keep: str | None, layout: Layout, report: PassReport) -> None:
    if not layout.bundles.is_dir():
        return
    for entry in sorted(layout.bundles.iterdir()):
        if entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)
            report.changes.append(f"removed {entry}")


def chain_network_config(entry: Mapping[str, Any], layout: Layout, report: PassReport) -> None:
    files, warnings = read_network_configs(layout.net_dir)
    report.warnings.extend(warnings)
    if not files:
        raise InstallError(
            f"no CNI network configuration in {layout.net_dir} yet (is the primary CNI plugin installed?)"
        )
    current = files[0]
    desired = chained(current.config, entry)
    target = current.path.with_name(chained_file_name(current.path.name, current.config))
    if target == current.path and desired == current.config:
        return
    if target != current.path and target.exists():
        raise InstallError(
            f"cannot convert {current.path} to a configuration list: {target} exists already (and is not "
            "the file the runtime uses); remove one of them"
        )
    mode = current.path.stat().st_mode & 0o777
    _atomic_write(target, _render(desired), mode)
    if target != current.path:
        current.path.unlink()
        report.changes.append(f"converted {current.path} to the configuration list {target}")
    report.changes.append(f"chained {PLUGIN_TYPE} into {target}")


def install_pass(bundle_dir: Path, plugin_config: Path, layout: Layout) -> PassReport:
    """Bring the node to the installed state (see the module docstring); what changed."""
    report = PassReport()
    try:
        entry = read_plugin_entry(plugin_config.read_text(), str(plugin_config))
    except OSError as e:
        raise InstallError(
            f"cannot read the plugin configuration {plugin_config}: {e.strerror or e}"
        ) from None
    try:
        bundle = read_bundle(bundle_dir)
    except BundleError as e:
        raise InstallError(str(e)) from None
    if not layout.bin_dir.is_dir():
        raise InstallError(f"the CNI bin directory {layout.bin_dir} does not exist")
    install_bundle(bundle, layout, report)
    install_wrapper(bundle, layout, report)
    # The plugin is in place before any configuration names it: a runtime never finds it missing.
    chain_network_config(entry, layout, report)
    remove_other_bundles(bundle.id, layout, report)
    return report


def check(bundle_dir: Path, plugin_config: Path, layout: Layout) -> list[str]:
    """What is not as `install_pass` would leave it (empty when installed and current)."""
    try:
        entry = read_plugin_entry(plugin_config.read_text(), str(plugin_config))
        bundle = read_bundle(bundle_dir)
        files, _ = read_network_configs(layout.net_dir)
    except (InstallError, BundleError, OSError) as e:
        return [str(e)]
    problems = []
    if not (layout.bundles / bundle.id).is_dir():
        problems.append(f"the plugin bundle {bundle.id} is not in {layout.bundles}")
    try:
        if layout.wrapper.read_text() != wrapper_script(bundle):
            problems.append(f"{layout.wrapper} does not run bundle {bundle.id}")
    except OSError:
        problems.append(f"{layout.wrapper} is missing")
    if not files:
        problems.append(f"no CNI network configuration in {layout.net_dir}")
    else:
        first = files[0]
        plugins = first.config.get("plugins")
        if not isinstance(plugins, list) or not plugins or plugins[-1] != entry:
            problems.append(f"{first.path} does not end with the current {PLUGIN_TYPE} entry")
        elif sum(1 for p in plugins if _is_loom(p)) != 1:
            problems.append(f"{first.path} holds more than one {PLUGIN_TYPE} entry")
    return problems


def uninstall_pass(layout: Layout) -> PassReport:
    """Take loom-cni out of every network configuration of the directory, then remove the plugin."""
    report = PassReport()
    if layout.net_dir.is_dir():
        files, warnings = read_network_configs(layout.net_dir)
        report.warnings.extend(warnings)
        for item in files:
            desired = unchained(item.config)
            if desired != item.config:
                _atomic_write(item.path, _render(desired), item.path.stat().st_mode & 0o777)
                report.changes.append(f"removed {PLUGIN_TYPE} from {item.path}")
    # The configuration no longer names the plugin: now it can go.
    if layout.wrapper.exists():
        layout.wrapper.unlink()
        report.changes.append(f"removed {layout.wrapper}")
    remove_other_bundles(None, layout, report)
    if layout.bundles.is_dir():
        layout.bundles.rmdir()
    return report


# ---------------------------------------------------------------------------------------------------
# process


def _log_report(report: PassReport) -> None:
    for warning in report.warnings:
        log.warning("%s", warning)
    for change in report.changes:
        log.info("%s", change)


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def watch(
    bundle_dir: Path, plugin_config: Path, layout: Layout, interval: float, stop: threading.Event
) -> None:
    """Install pass every `interval` seconds until `stop` is set; a failing pass is logged and retried."""
    last_error = ""
    while not stop.is_set():
        try:
            _log_report(install_pass(bundle_dir, plugin_config, layout))
            if last_error:
                log.info("installed")
            last_error = ""
        except (InstallError, OSError) as e:
            if str(e) != last_error:  # the same problem is logged once, not every interval
                log.error("%s (retrying every %gs)", e, interval)
            last_error = str(e)
        stop.wait(interval)


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="install-cni", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("install", "install the plugin and chain it (see the module docstring)"),
        ("check", "exit 0 when installed and current, else 1 listing what is not"),
        ("uninstall", "remove the plugin from every configuration, then the plugin itself"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--cni-bin-dir", type=Path, required=True, help="the node's CNI bin directory")
        command.add_argument(
            "--cni-net-dir", type=Path, required=True, help="the node's CNI config directory"
        )
        if name != "uninstall":
            command.add_argument("--bundle", type=Path, required=True, help="the plugin bundle to install")
            command.add_argument(
                "--plugin-config", type=Path, required=True, help="JSON file with the loom-cni chain entry"
            )
        if name == "install":
            command.add_argument("--watch", action="store_true", help="repeat until SIGTERM")
            command.add_argument(
                "--interval",
                type=float,
                default=DEFAULT_INTERVAL,
                help=f"seconds between passes with --watch (default {DEFAULT_INTERVAL:g})",
            )
        if name == "uninstall":
            command.add_argument(
                "--wait", action="store_true", help="after uninstalling, wait for SIGTERM (a DaemonSet's pod)"
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    layout = Layout(args.cni_bin_dir, args.cni_net_dir)
    if args.command == "check":
        problems = check(args.bundle, args.plugin_config, layout)
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    waits = getattr(args, "watch", False) or getattr(args, "wait", False)
    # Handlers first: a SIGTERM that arrives during the first pass still ends the process cleanly.
    stop = _stop_event() if waits else threading.Event()
    if args.command == "install" and args.watch:
        if not args.interval > 0:
            print("install-cni: --interval must be a positive number of seconds", file=sys.stderr)
            return 2
        watch(args.bundle, args.plugin_config, layout, args.interval, stop)
        return 0
    try:
        report = (
            install_pass(args.bundle, args.plugin_config, layout)
            if args.command == "install"
            else uninstall_pass(layout)
        )
    except (InstallError, OSError) as e:
        log.error("%s", e)
        return 1
    _log_report(report)
    if not report.changes:
        log.info(
            "nothing to change: the node is already %s", "installed" if args.command == "install" else "clean"
        )
    if waits:
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
