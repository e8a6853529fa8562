"""Which Workload an enrolled pod is (`find_local_workload`) and waiting for it (`StateChanges`)."""

from __future__ import annotations

import asyncio

from loom.testing.workload_api import by_name, state_with, uid, workload
from ztunnel.inpod import WorkloadInfo
from ztunnel.proxy import StateChanges, find_local_workload
from ztunnel.state import ProxyState


def test_found_by_uid_or_by_namespace_and_name_on_this_node() -> None:
    state = state_with(
        workload("web", "10.0.0.1", service_account="sa-web"),
        workload("db", "10.0.0.2", namespace="data", service_account="sa-db"),
        workload("remote", "10.0.1.1", node="node-b"),
    )
    found = find_local_workload(state, uid("web"), WorkloadInfo("ignored", "ignored", ""))
    assert found is not None and found.name == "web"
    by_info = find_local_workload(state, "3f2c-k8s-uid", WorkloadInfo("db", "data", "sa-db"))
    assert by_info is not None and by_info.uid == uid("db", "data")
    assert find_local_workload(state, "x", WorkloadInfo("remote", "default", "")) is None, "not on this node"
    assert find_local_workload(state, "x", WorkloadInfo("web", "other", "sa-web")) is None


def test_a_service_account_disagreement_fails_closed() -> None:
    state = state_with(workload("web", "10.0.0.1", service_account="sa-web"), workload("plain", "10.0.0.3"))
    assert find_local_workload(state, "k8s-uid", WorkloadInfo("web", "default", "sa-other")) is None
    # An empty service account in the workload API is Kubernetes' "default".
    plain = find_local_workload(state, "k8s-uid", WorkloadInfo("plain", "default", "default"))
    assert plain is not None and plain.name == "plain"


async def test_waiting_returns_as_soon_as_the_workload_arrives() -> None:
    state = ProxyState("node-a")
    changes = StateChanges(state)
    info = WorkloadInfo("late", "default", "")
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, lambda: state.apply_addresses(by_name(workload("late", "10.0.0.9"))))
    started = loop.time()
    found = await changes.wait_for(lambda: find_local_workload(state, "k8s-uid", info), 5.0)
    assert found is not None and found.name == "late"
    assert loop.time() - started < 1.0
    changes.close()


async def test_waiting_gives_up_at_the_bound() -> None:
    state = ProxyState("node-a")
    changes = StateChanges(state)
    # Unrelated changes wake the waiter, which keeps waiting until its deadline.
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, lambda: state.apply_addresses(by_name(workload("other", "10.0.0.8"))))
    info = WorkloadInfo("never", "default", "")
    assert await changes.wait_for(lambda: find_local_workload(state, "x", info), 0.05) is None
    changes.close()
