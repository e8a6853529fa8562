"""Configuration from YAML files: a set of directories and/or files, watched for changes.

Theory of operation
-------------------
A *scan* enumerates the configuration files (`*.yaml`, `*.yml`, `*.json` recursively, skipping hidden
entries such as editors' swap files and the `..data` machinery of Kubernetes ConfigMap volumes: the
loader's rules) and for each decides from a per-file cache whether it must be parsed again:

  * the `stat` fingerprint (device, inode, size, mtime) is unchanged and no file-system event named the
    file  -> reuse the cached `LoadResult` without reading the file;
  * otherwise read the bytes; if their hash is unchanged -> reuse (an editor rewrote the same content,
    or a ConfigMap update replaced every file but changed one);
  * otherwise parse the text with the loader (`load_text`; JSON files through `load_paths`, which has
    the JSON reader) and cache the result.

The results of all files are then merged in the loader's order (configured paths as given, files under a
directory by relative path). An object defined in two files keeps its first definition and the second
gets an error diagnostic naming both places, so duplicates are found across the cache even though each
file is parsed alone. A one-file edit in a directory of 10,000 objects therefore costs one parse plus a
`stat` per file and a merge.

`run()` emits the first snapshot, then follows `watchfiles.awatch` (inotify on Linux): directories are
watched recursively, files given by name through their parent directory, so that editors that save by
writing a temporary file and renaming it over the original are seen too. Events only *trigger* a scan;
what changed is decided by the scan itself, which makes renames, deletions, symlink swaps (ConfigMap
updates) and bursts of events all the same case. A batch of events is considered settled after
`debounce` seconds without new events. A periodic scan every `rescan_interval` seconds catches what
inotify can miss (queue overflow, a watched directory that was replaced). `on_change` is called only when
the snapshot or the diagnostics actually differ from what was last sent.

Failure handling: a path that does not exist when the source is created raises FileNotFoundError naming
it. A file that cannot be read or decoded becomes an error diagnostic and the other files are still used.
If a configured path disappears while running, its last loaded objects are *kept* (with an error
diagnostic) until it comes back: an unmounted volume must not silently delete every policy.

Scans do blocking file I/O and YAML parsing, so they run in a worker thread, one at a time (a thread
lock, because a cancelled caller does not stop a scan already running in its thread).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from watchfiles import awatch

from controller.sources.base import ChangeCallback
from loom.resources.diagnostics import Diagnostic, Severity
from loom.resources.loader import CONFIG_SUFFIXES, MAX_FILE_BYTES, LoadResult, load_paths, load_text
from loom.resources.model import ConfigSnapshot, Origin, Resource, ResourceKey

log = logging.getLogger(__name__)

# How long watchfiles may keep collecting one batch under a continuous stream of events, in ms. Bounds
# the delay of a change when something writes to the directory non-stop.
_MAX_BATCH_MS: Final = 1_600


@dataclass(frozen=True, slots=True)
class _Fingerprint:
    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class _CachedFile:
    fingerprint: _Fingerprint | None  # None when the file could not even be stat'ed
    digest: bytes  # of the content; b"" when unknown (unreadable, or JSON read by the loader itself)
    objects: tuple[Resource, ...]
    diagnostics: tuple[Diagnostic, ...]

    def same_content(self, other: _CachedFile) -> bool:
        """Equal objects from the same documents (object equality ignores the origin) and diagnostics."""
        return (
            self.objects == other.objects
            and [o.origin for o in self.objects] == [o.origin for o in other.objects]
            and self.diagnostics == other.diagnostics
        )


@dataclass(frozen=True, slots=True)
class _ConfigFile:
    path: str  # absolute, normalised: the cache key, comparable with watch event paths
    display: str  # as the user would write it (under the configured path), used in diagnostics
    # Merge order, the loader's: configured paths in the order given, files under a directory by
    # their relative path components. It decides which of two duplicate definitions wins.
    order: tuple[int, tuple[str, ...]]


@dataclass(slots=True)
class DirectoryStats:
    """Counters for /metrics and tests."""

    scans: int = 0
    files_read: int = 0  # files whose bytes were read (fingerprint changed or an event named them)
    files_parsed: int = 0  # files handed to the loader (content actually changed)
    notifications: int = 0


class DirectorySource:
    """Configuration from YAML files and directories, watched for changes. See the module docstring."""

    def __init__(
        self,
        paths: Sequence[Path],
        debounce: float = 0.05,
        *,
        rescan_interval: float = 30.0,
    ) -> None:
        """`debounce`: seconds without further file-system events after which a batch is processed.
        `rescan_interval`: seconds between safety-net scans (also the delay before a configured path
        that disappeared and came back is watched again)."""
        if not paths:
            raise ValueError("DirectorySource needs at least one file or directory")
        if debounce < 0 or rescan_interval <= 0:
            raise ValueError(
                f"debounce={debounce!r} must be >= 0 and rescan_interval={rescan_interval!r} > 0"
            )
        self._roots = tuple(Path(p) for p in paths)
        for root in self._roots:
            if not root.exists():
                raise FileNotFoundError(f"configuration path {str(root)!r} does not exist")
        self._debounce = debounce
        self._rescan_interval = rescan_interval
        self._cache: dict[str, _CachedFile] = {}
        self._file_order: tuple[_ConfigFile, ...] = ()
        self._root_diagnostics: tuple[Diagnostic, ...] = ()
        self._merged: tuple[ConfigSnapshot, tuple[Diagnostic, ...]] | None = None
        self._scan_lock = threading.Lock()
        self.stats = DirectoryStats()

    @property
    def paths(self) -> tuple[Path, ...]:
        return self._roots

    async def load_once(self) -> tuple[ConfigSnapshot, tuple[Diagnostic, ...]]:
        """Scan now and return the complete state (used by `loomctl validate` and by `run`)."""
        return await self._scan(frozenset())

    async def run(self, on_change: ChangeCallback) -> None:
        """Emit the first snapshot, then one per settled change, until cancelled."""
        last: tuple[ConfigSnapshot, tuple[Diagnostic, ...]] | None = None
        while True:  # ends by cancellation, like every ConfigSource
            dirs, file_parents = self._watch_targets()
            stop = asyncio.Event()
            batches: asyncio.Queue[frozenset[str]] = asyncio.Queue()
            async with asyncio.TaskGroup() as tasks:
                if dirs:
                    tasks.create_task(self._follow(dirs, True, stop, batches), name="config-watch-dirs")
                if file_parents:
                    tasks.create_task(
                        self._follow(file_parents, False, stop, batches), name="config-watch-files"
                    )
                # Let the watcher tasks take their first step, in which watchfiles registers the inotify
                # watches synchronously; only then scan, so that no change can fall between the scan
                # and the start of watching (the periodic scan would catch it, but late).
                await asyncio.sleep(0)
                try:
                    changed: frozenset[str] = frozenset()
                    while True:
                        current = await self._scan(changed)
                        if current != last:
                            last = current
                            self._emit(on_change, current)
                        if (dirs, file_parents) != self._watch_targets():
                            break  # a configured path vanished or came back: watch the new set
                        try:
                            changed = await asyncio.wait_for(batches.get(), self._rescan_interval)
                        except TimeoutError:
                            changed = frozenset()  # periodic safety-net scan
                        while not batches.empty():
                            changed |= batches.get_nowait()
                finally:
                    stop.set()

    def _emit(self, on_change: ChangeCallback, state: tuple[ConfigSnapshot, tuple[Diagnostic, ...]]) -> None:
        self.stats.notifications += 1
        try:
            on_change(*state)
        except Exception:  # a consumer bug must not stop the watch; the next change retries
            log.exception("the configuration change callback failed")

    def _watch_targets(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(directories to watch recursively, parents of files to watch non-recursively), existing only."""
        dirs = sorted({os.path.abspath(r) for r in self._roots if r.is_dir()})
        parents = sorted({os.path.dirname(os.path.abspath(r)) for r in self._roots if r.is_file()})
        return tuple(dirs), tuple(parents)

    async def _follow(
        self,
        paths: Sequence[str],
        recursive: bool,
        stop: asyncio.Event,
        batches: asyncio.Queue[frozenset[str]],
    ) -> None:
        step_ms = max(1, round(self._debounce * 1000))
        try:
            async for changes in awatch(
                *paths,
                watch_filter=None,
                debounce=max(_MAX_BATCH_MS, step_ms),
                step=step_ms,
                stop_event=stop,
                recursive=recursive,
                ignore_permission_denied=True,
            ):
                # The paths are absolute because the watched paths are, like the cache's keys.
                batches.put_nowait(frozenset(path for _, path in changes))
        except Exception as err:  # e.g. a watched directory was removed; the periodic scan takes over
            log.warning("watching %s stopped (%s); relying on periodic scans", ", ".join(paths), err)
            batches.put_nowait(frozenset())

    # -- scanning ---------------------------------------------------------------------------------------

    async def _scan(self, changed: frozenset[str]) -> tuple[ConfigSnapshot, tuple[Diagnostic, ...]]:
        return await asyncio.to_thread(self._scan_blocking, changed)

    def _scan_blocking(self, changed: frozenset[str]) -> tuple[ConfigSnapshot, tuple[Diagnostic, ...]]:
        with self._scan_lock:
            return self._scan_locked(changed)

    def _scan_locked(self, changed: frozenset[str]) -> tuple[ConfigSnapshot, tuple[Diagnostic, ...]]:
        self.stats.scans += 1
        files, root_diagnostics, missing_roots = self._discover()
        new_cache: dict[str, _CachedFile] = {}
        dirty = self._merged is None or root_diagnostics != self._root_diagnostics
        for config_file in files:
            cached = self._cache.get(config_file.path)
            entry = self._load_file(config_file, cached, config_file.path in changed)
            dirty |= cached is None or not entry.same_content(cached)
            new_cache[config_file.path] = entry
        # Keep what a vanished configured path contributed until it returns (see module docstring).
        kept = [f for f in self._file_order if f.path not in new_cache and _under_any(f.path, missing_roots)]
        for config_file in kept:
            new_cache[config_file.path] = self._cache[config_file.path]
        order = tuple(sorted([*files, *kept], key=lambda f: f.order))
        dirty |= order != self._file_order
        self._cache, self._file_order, self._root_diagnostics = new_cache, order, root_diagnostics
        if dirty or self._merged is None:
            self._merged = self._merge(root_diagnostics)
        return self._merged

    def _discover(self) -> tuple[list[_ConfigFile], tuple[Diagnostic, ...], tuple[str, ...]]:
        files: dict[str, _ConfigFile] = {}
        diagnostics: list[Diagnostic] = []
        missing: list[str] = []
        for index, root in enumerate(self._roots):
            absolute = os.path.abspath(root)
            if not root.exists():
                missing.append(absolute)
                diagnostics.append(
                    Diagnostic(
                        Severity.ERROR,
                        "configuration path disappeared; its last loaded objects are kept until it is back",
                        Origin(str(root)),
                    )
                )
            elif root.is_dir():
                for config_file in _walk(index, root, diagnostics):
                    files.setdefault(config_file.path, config_file)
            else:
                files.setdefault(absolute, _ConfigFile(absolute, str(root), (index, ())))
        return sorted(files.values(), key=lambda f: f.order), tuple(diagnostics), tuple(missing)

    def _load_file(
        self, config_file: _ConfigFile, cached: _CachedFile | None, named_by_event: bool
    ) -> _CachedFile:
        """The cache entry for one file: `cached` itself when nothing changed, else a new entry."""
        try:
            st = os.stat(config_file.path)
        except OSError as err:
            return _unreadable(config_file, cached, None, f"cannot read: {err.strerror or err}")
        fingerprint = _Fingerprint.of(st)
        if cached is not None and cached.fingerprint == fingerprint and not named_by_event:
            return cached
        if st.st_size > MAX_FILE_BYTES:
            message = f"file is {st.st_size} bytes, more than the limit of {MAX_FILE_BYTES}"
            return _unreadable(config_file, cached, fingerprint, message)
        if config_file.path.lower().endswith(".json"):
            # JSON has its own reader in the loader (duplicate keys, depth limit); it reads the file
            # itself, so there is no digest of what it parsed and any change re-parses.
            self.stats.files_parsed += 1
            return _parsed(fingerprint, b"", lambda: load_paths([Path(config_file.display)]), config_file)
        try:
            with open(config_file.path, "rb") as handle:
                content = handle.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            return _unreadable(config_file, cached, fingerprint, f"cannot read: {err.strerror or err}")
        self.stats.files_read += 1
        digest = hashlib.blake2b(content, digest_size=20).digest()
        if cached is not None and cached.digest == digest:
            return cached if cached.fingerprint == fingerprint else _replace_fingerprint(cached, fingerprint)
        try:
            text = content.decode("utf-8-sig")  # like the loader: a byte-order mark is tolerated
        except UnicodeDecodeError as err:
            message = f"not UTF-8 text (invalid byte at offset {err.start})"
            return _unreadable(config_file, cached, fingerprint, message, digest)
        self.stats.files_parsed += 1
        return _parsed(fingerprint, digest, lambda: load_text(text, config_file.display), config_file)

    def _merge(
        self, root_diagnostics: tuple[Diagnostic, ...]
    ) -> tuple[ConfigSnapshot, tuple[Diagnostic, ...]]:
        objects: dict[ResourceKey, Resource] = {}
        diagnostics: list[Diagnostic] = list(root_diagnostics)
        for config_file in self._file_order:
            entry = self._cache[config_file.path]
            diagnostics.extend(entry.diagnostics)
            for obj in entry.objects:
                first = objects.get(obj.key)
                if first is None:
                    objects[obj.key] = obj
                    continue
                # Worded like the loader's own duplicate check, which sees only one file at a time here.
                where = str(first.origin) if first.origin is not None else "another source"
                diagnostics.append(
                    Diagnostic(
                        Severity.ERROR,
                        f"already defined in {where}; this definition is ignored",
                        obj.origin,
                        obj.key,
                    )
                )
        return ConfigSnapshot(objects), tuple(diagnostics)


def _parsed(
    fingerprint: _Fingerprint, digest: bytes, load: Callable[[], LoadResult], config_file: _ConfigFile
) -> _CachedFile:
    try:
        result = load()
    except Exception as err:  # a loader bug must not take the other files down with it
        log.exception("loading %s failed unexpectedly", config_file.display)
        return _unreadable(config_file, None, fingerprint, f"could not be loaded: {err}", digest)
    return _CachedFile(fingerprint, digest, tuple(result.objects), tuple(result.diagnostics))


def _unreadable(
    config_file: _ConfigFile,
    cached: _CachedFile | None,
    fingerprint: _Fingerprint | None,
    message: str,
    digest: bytes = b"",
) -> _CachedFile:
    entry = _CachedFile(
        fingerprint, digest, (), (Diagnostic(Severity.ERROR, message, Origin(config_file.display)),)
    )
    return cached if cached == entry else entry


def _replace_fingerprint(cached: _CachedFile, fingerprint: _Fingerprint) -> _CachedFile:
    return _CachedFile(fingerprint, cached.digest, cached.objects, cached.diagnostics)


def _under_any(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _is_config_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(CONFIG_SUFFIXES)


def _walk(index: int, root: Path, diagnostics: list[Diagnostic]) -> list[_ConfigFile]:
    """Configuration files under `root`, following symlinks (with loop protection), skipping hidden
    entries. Directories that cannot be listed become error diagnostics."""
    found: list[_ConfigFile] = []
    seen_dirs: set[tuple[int, int]] = set()

    def on_error(err: OSError) -> None:
        where = os.path.relpath(err.filename, root) if err.filename else ""
        diagnostics.append(
            Diagnostic(
                Severity.ERROR,
                f"cannot list this directory: {err.strerror or err}",
                Origin(str(root / where)),
            )
        )

    for directory, subdirs, names in os.walk(root, onerror=on_error, followlinks=True):
        try:
            st = os.stat(directory)
        except OSError as err:
            on_error(err)
            subdirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # a symlink loop or a second link to the same tree
            subdirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in names:
            if _is_config_name(name):
                file = Path(directory, name)
                found.append(
                    _ConfigFile(os.path.abspath(file), str(file), (index, file.relative_to(root).parts))
                )
    return found
