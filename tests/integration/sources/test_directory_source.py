"""DirectorySource on a real file system with real inotify: loading, watching, and the per-file cache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.sources.directory import DirectorySource
from loom.resources.diagnostics import Diagnostic
from loom.resources.model import AuthorizationPolicy, ConfigSnapshot, ResourceKey
from loom.testing import manifests as m
from loom.testing.waiting import eventually

State = tuple[ConfigSnapshot, tuple[Diagnostic, ...]]


def ns_key(name: str) -> ResourceKey:
    return ResourceKey("Namespace", "", name)


def exactly(*keys: ResourceKey) -> Callable[[ConfigSnapshot, tuple[Diagnostic, ...]], bool]:
    return lambda snapshot, diagnostics: set(snapshot) == set(keys)


def write(path: Path, *manifests: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all([dict(x) for x in manifests], sort_keys=False))
    return path


class Recorder:
    def __init__(self) -> None:
        self.calls: list[State] = []
        self._arrived = asyncio.Event()

    def __call__(self, snapshot: ConfigSnapshot, diagnostics: tuple[Diagnostic, ...]) -> None:
        self.calls.append((snapshot, diagnostics))
        self._arrived.set()

    async def wait_for(
        self, predicate: Callable[[ConfigSnapshot, tuple[Diagnostic, ...]], bool], within: float = 5.0
    ) -> State:
        async with asyncio.timeout(within):
            while True:
                if self.calls and predicate(*self.calls[-1]):
                    return self.calls[-1]
                self._arrived.clear()
                await self._arrived.wait()


@contextlib.asynccontextmanager
async def running(source: DirectorySource) -> AsyncIterator[Recorder]:
    recorder = Recorder()
    task = asyncio.create_task(source.run(recorder), name="directory-source-under-test")
    try:
        await recorder.wait_for(lambda s, d: True)
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle(source: DirectorySource, scans_before: int) -> None:
    """Wait until the source has scanned after the last file-system change."""
    await eventually(lambda: source.stats.scans > scans_before, what="a scan after the change")


async def test_load_once_reads_config_files_recursively(tmp_path: Path) -> None:
    root = tmp_path / "config"
    write(root / "namespaces.yaml", m.namespace("a"), m.namespace("b"))
    write(root / "team" / "policy.yml", m.authorization_policy("a", "allow"))
    (root / "team" / "extra.json").write_text(json.dumps(m.service_account("a", "client")))
    write(root / ".hidden" / "ignored.yaml", m.namespace("hidden-dir"))
    write(root / ".swap.yaml", m.namespace("hidden-file"))
    (root / "README.md").write_text("not configuration")
    snapshot, diagnostics = await DirectorySource([root]).load_once()
    assert diagnostics == ()
    assert set(snapshot) == {
        ns_key("a"),
        ns_key("b"),
        ResourceKey("AuthorizationPolicy", "a", "allow"),
        ResourceKey("ServiceAccount", "a", "client"),
    }
    policy = snapshot[ResourceKey("AuthorizationPolicy", "a", "allow")]
    assert policy.origin is not None and policy.origin.source == str(root / "team" / "policy.yml")
    second = snapshot[ns_key("b")]
    assert second.origin is not None and second.origin.document == 2


async def test_single_files_and_directories_together(tmp_path: Path) -> None:
    write(tmp_path / "dir" / "a.yaml", m.namespace("a"))
    single = write(tmp_path / "single.yaml", m.namespace("single"))
    write(tmp_path / "sibling.yaml", m.namespace("not-configured"))  # beside the file, not configured
    snapshot, _ = await DirectorySource([tmp_path / "dir", single]).load_once()
    assert set(snapshot) == {ns_key("a"), ns_key("single")}


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        DirectorySource([tmp_path / "no-such-dir"])
    with pytest.raises(ValueError, match="at least one"):
        DirectorySource([])


async def test_edits_additions_deletions_and_renames_propagate(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", m.namespace("a"))
    source = DirectorySource([tmp_path], debounce=0.02)
    async with running(source) as recorder:
        write(tmp_path / "a.yaml", m.namespace("a", {"istio.io/dataplane-mode": "ambient"}))
        await recorder.wait_for(lambda s, d: ns_key("a") in s and s[ns_key("a")].meta.labels != {})

        write(tmp_path / "sub" / "b.yaml", m.namespace("b"))
        await recorder.wait_for(lambda s, d: ns_key("b") in s)

        (tmp_path / "a.yaml").unlink()
        await recorder.wait_for(lambda s, d: ns_key("a") not in s)

        (tmp_path / "sub" / "b.yaml").rename(tmp_path / "sub" / "b.yaml.disabled")
        await recorder.wait_for(lambda s, d: ns_key("b") not in s)

        (tmp_path / "sub" / "b.yaml.disabled").rename(tmp_path / "renamed.yaml")
        snapshot, _ = await recorder.wait_for(lambda s, d: ns_key("b") in s)
    origin = snapshot[ns_key("b")].origin
    assert origin is not None and origin.source == str(tmp_path / "renamed.yaml")


async def test_editor_save_via_temp_file_and_rename(tmp_path: Path) -> None:
    config = write(tmp_path / "mesh.yaml", m.namespace("v1"))
    source = DirectorySource([config], debounce=0.02)  # a single file: watched through its directory
    async with running(source) as recorder:
        for version in ("v2", "v3"):  # twice: the watch must survive the first replacement
            temp = write(tmp_path / ".mesh.yaml.swp", m.namespace(version))
            os.replace(temp, config)
            await recorder.wait_for(exactly(ns_key(version)))


async def test_invalid_object_in_an_edited_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "policies.yaml",
        m.authorization_policy("a", "first"),
        m.authorization_policy("a", "second"),
    )
    source = DirectorySource([tmp_path], debounce=0.02)
    async with running(source) as recorder:
        write(
            path,
            m.authorization_policy("a", "first", action="DENY"),
            m.authorization_policy("a", "second", action="PERMIT"),
        )
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: bool(d))
    first = snapshot.get_obj(AuthorizationPolicy, "a", "first")
    assert first is not None and first.action == "DENY"  # the valid part of the file applies
    second = snapshot.get_obj(AuthorizationPolicy, "a", "second")
    assert second is not None and second.invalid  # the invalid one stands in as a deny-all
    assert diagnostics and all(d.is_error for d in diagnostics)
    assert any(
        d.origin is not None and (d.origin.source, d.origin.document) == (str(path), 2) for d in diagnostics
    )
    assert any("spec.action" in str(d) for d in diagnostics)


async def test_no_notification_when_nothing_changed(tmp_path: Path) -> None:
    path = write(tmp_path / "a.yaml", m.namespace("a"))
    source = DirectorySource([tmp_path], debounce=0.02)
    async with running(source) as recorder:
        for touch in (
            lambda: path.write_text(path.read_text()),  # same content rewritten
            lambda: os.utime(path),  # only the mtime
            lambda: (tmp_path / "notes.txt").write_text("x"),  # not a config file
            lambda: (tmp_path / ".a.yaml.swp").write_text("garbage: ["),  # an editor's swap file
        ):
            scans = source.stats.scans
            touch()
            await settle(source, scans)
        assert len(recorder.calls) == 1
    assert source.stats.notifications == 1


async def test_only_the_changed_file_is_parsed_again(tmp_path: Path) -> None:
    for i in range(60):
        write(
            tmp_path / f"team-{i // 10}" / f"ns-{i}.yaml",
            m.namespace(f"ns-{i}"),
            m.service_account(f"ns-{i}", "sa"),
        )
    source = DirectorySource([tmp_path], debounce=0.02)
    async with running(source) as recorder:
        assert source.stats.files_parsed == 60
        write(tmp_path / "team-3" / "ns-33.yaml", m.namespace("ns-33", {"edited": "yes"}))
        snapshot, _ = await recorder.wait_for(
            lambda s, d: s[ns_key("ns-33")].meta.labels == {"edited": "yes"}
        )
        assert source.stats.files_parsed == 61
        assert source.stats.files_read == 61  # the other 59 files were not even read
        assert ResourceKey("ServiceAccount", "ns-33", "sa") not in snapshot
        assert len(snapshot) == 119


async def test_duplicates_across_files_are_found_through_the_cache(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", m.namespace("shared", {"from": "a"}))
    source = DirectorySource([tmp_path], debounce=0.02)
    async with running(source) as recorder:
        b = write(tmp_path / "b.yaml", m.namespace("shared", {"from": "b"}), m.namespace("only-b"))
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: ns_key("only-b") in s)
        assert snapshot[ns_key("shared")].meta.labels == {"from": "a"}  # the first path wins
        (duplicate,) = diagnostics
        assert duplicate.is_error and duplicate.key == ns_key("shared")
        assert duplicate.origin is not None and duplicate.origin.source == str(b)
        assert str(a) in duplicate.message

        a.unlink()
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: not d)
    assert snapshot[ns_key("shared")].meta.labels == {"from": "b"}


async def test_unreadable_files_are_diagnostics_and_the_rest_is_used(tmp_path: Path) -> None:
    write(tmp_path / "good.yaml", m.namespace("good"))
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"kind: Namespace\nmetadata:\n  name: caf\xe9\n")
    snapshot, diagnostics = await DirectorySource([tmp_path]).load_once()
    assert set(snapshot) == {ns_key("good")}
    by_file = {d.origin.source: d for d in diagnostics if d.origin is not None}
    assert set(by_file) == {str(tmp_path / "dangling.yaml"), str(tmp_path / "latin1.yaml")}
    assert by_file[str(tmp_path / "dangling.yaml")].message.startswith("cannot read: ")
    assert all(d.is_error for d in by_file.values())
    assert "UTF-8" in by_file[str(tmp_path / "latin1.yaml")].message


async def test_configmap_volume_symlink_swap(tmp_path: Path) -> None:
    """A ConfigMap volume updates by re-pointing the hidden `..data` symlink at a new hidden directory."""
    mount = tmp_path / "mount"
    write(mount / "..2026_01" / "mesh.yaml", m.namespace("v1"))
    (mount / "..data").symlink_to("..2026_01")
    (mount / "mesh.yaml").symlink_to("..data/mesh.yaml")
    source = DirectorySource([mount], debounce=0.02)
    async with running(source) as recorder:
        assert set(recorder.calls[0][0]) == {ns_key("v1")}  # hidden directories are not read twice
        write(mount / "..2026_02" / "mesh.yaml", m.namespace("v2"))
        (mount / "..data_tmp").symlink_to("..2026_02")
        os.replace(mount / "..data_tmp", mount / "..data")
        shutil.rmtree(mount / "..2026_01")
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: ns_key("v2") in s)
    assert set(snapshot) == {ns_key("v2")} and diagnostics == ()


async def test_a_vanished_directory_keeps_its_objects_until_it_returns(tmp_path: Path) -> None:
    stable = write(tmp_path / "stable" / "a.yaml", m.namespace("stable"))
    volatile = tmp_path / "volatile"
    write(volatile / "p.yaml", m.authorization_policy("a", "deny-all", action="DENY"))
    source = DirectorySource([stable.parent, volatile], debounce=0.02, rescan_interval=0.05)
    policy = ResourceKey("AuthorizationPolicy", "a", "deny-all")
    async with running(source) as recorder:
        shutil.rmtree(volatile)
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: bool(d))
        assert policy in snapshot  # dropping it would silently open the mesh
        (gone,) = diagnostics
        assert gone.is_error and "disappeared" in gone.message
        assert gone.origin is not None and gone.origin.source == str(volatile)

        write(volatile / "p.yaml", m.authorization_policy("a", "allow-some"))
        snapshot, diagnostics = await recorder.wait_for(lambda s, d: not d)
        assert policy not in snapshot and ResourceKey("AuthorizationPolicy", "a", "allow-some") in snapshot
        # The re-created directory is watched again: a later edit arrives too.
        write(volatile / "q.yaml", m.namespace("later"))
        await recorder.wait_for(lambda s, d: ns_key("later") in s)


async def test_a_burst_of_writes_is_one_batch(tmp_path: Path) -> None:
    write(tmp_path / "seed.yaml", m.namespace("seed"))
    source = DirectorySource([tmp_path], debounce=0.1)
    async with running(source) as recorder:
        for i in range(40):
            write(tmp_path / f"ns-{i}.yaml", m.namespace(f"ns-{i}"))
        await recorder.wait_for(lambda s, d: len(s) == 41)
        assert len(recorder.calls) <= 3  # not 40


async def test_callback_errors_do_not_stop_the_source(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", m.namespace("a"))
    seen: list[ConfigSnapshot] = []

    def flaky(snapshot: ConfigSnapshot, diagnostics: tuple[Diagnostic, ...]) -> None:
        seen.append(snapshot)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")

    task = asyncio.create_task(DirectorySource([tmp_path], debounce=0.02).run(flaky), name="flaky-consumer")
    try:
        await eventually(lambda: len(seen) == 1)
        write(tmp_path / "b.yaml", m.namespace("b"))
        await eventually(lambda: ns_key("b") in seen[-1])
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
