"""PeerAuthentication -> L4 DENY policies: precedence, port-level settings, the representation
(workload-selector policies only, the fewest of them), and a property test of plaintext decisions
against the precedence rules written out directly."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.translate import Translation
from loom.api import authorization_pb2 as pb
from loom.identity import Identity
from loom.policy.rbac import Connection, applicable_policies, decide
from loom.resources.model import PeerAuthentication, Resource

from .builders import namespace, peer_auth, pod, run, warnings_for, workload_of

ROOT = "istio-system"
STATIC = f"{ROOT}/istio_converted_static_strict"
POD_LABELS = {"app": "a", "version": "v1"}
PEER = Identity("cluster.local", "client", "sa")


def plaintext_allowed(translation: Translation, pod_name: str, port: int, ns: str = "default") -> bool:
    workload = workload_of(translation, pod_name, ns)
    conn = Connection(None, ipaddress.ip_address("10.9.9.9"), ipaddress.ip_address("10.0.0.1"), port)
    return decide(applicable_policies(workload, translation.authorizations), conn).allowed


def mtls_allowed(translation: Translation, pod_name: str, port: int, ns: str = "default") -> bool:
    workload = workload_of(translation, pod_name, ns)
    conn = Connection(PEER, ipaddress.ip_address("10.9.9.9"), ipaddress.ip_address("10.0.0.1"), port)
    return decide(applicable_policies(workload, translation.authorizations), conn).allowed


def scenario(*pas: PeerAuthentication) -> Translation:
    return run(
        namespace("default"),
        namespace("other"),
        namespace(ROOT),
        pod("target", labels=POD_LABELS),
        pod("neighbour", labels={"app": "b"}, ips=("10.0.0.2",)),
        pod("elsewhere", "other", labels=POD_LABELS, ips=("10.0.0.3",)),
        *pas,
    )


# (id, PeerAuthentications, target pod: plaintext allowed on port 80, on 8080; converted key listed)
CASES: list[tuple[str, tuple[PeerAuthentication, ...], bool, bool, str | None]] = [
    ("no peer authentication", (), True, True, None),
    ("mesh strict", (peer_auth("mesh", ROOT, mode="STRICT"),), False, False, STATIC),
    ("mesh permissive", (peer_auth("mesh", ROOT, mode="PERMISSIVE"),), True, True, None),
    ("namespace strict", (peer_auth("ns", mode="STRICT"),), False, False, STATIC),
    ("namespace disable is permissive", (peer_auth("ns", mode="DISABLE"),), True, True, None),
    (
        "namespace permissive overrides mesh strict",
        (peer_auth("mesh", ROOT, mode="STRICT"), peer_auth("ns", mode="PERMISSIVE")),
        True,
        True,
        None,
    ),
    (
        "namespace unset inherits mesh strict",
        (peer_auth("mesh", ROOT, mode="STRICT"), peer_auth("ns", mode="UNSET")),
        False,
        False,
        STATIC,
    ),
    (
        "workload permissive overrides namespace strict",
        (peer_auth("ns", mode="STRICT"), peer_auth("wl", selector={"app": "a"}, mode="PERMISSIVE")),
        True,
        True,
        None,
    ),
    (
        "workload strict overrides namespace permissive",
        (peer_auth("ns", mode="PERMISSIVE"), peer_auth("wl", selector={"app": "a"}, mode="STRICT")),
        False,
        False,
        STATIC,
    ),
    (
        "workload unset inherits namespace strict",
        (peer_auth("ns", mode="STRICT"), peer_auth("wl", selector={"app": "a"})),
        False,
        False,
        STATIC,
    ),
    (
        "strict with a permissive port",
        (peer_auth("wl", selector={"app": "a"}, mode="STRICT", ports={8080: "PERMISSIVE"}),),
        False,
        True,
        "default/converted_peer_authentication_wl",
    ),
    (
        "permissive with a strict port",
        (peer_auth("wl", selector={"app": "a"}, mode="PERMISSIVE", ports={8080: "STRICT"}),),
        True,
        False,
        "default/converted_peer_authentication_wl",
    ),
    (
        "namespace strict, workload unset with a permissive port",
        (peer_auth("ns", mode="STRICT"), peer_auth("wl", selector={"app": "a"}, ports={8080: "PERMISSIVE"})),
        False,
        True,
        "default/converted_peer_authentication_wl",
    ),
    (
        "port setting equal to the workload mode needs no exception",
        (peer_auth("wl", selector={"app": "a"}, mode="STRICT", ports={8080: "STRICT"}),),
        False,
        False,
        STATIC,
    ),
    (
        "unset port setting inherits",
        (peer_auth("wl", selector={"app": "a"}, mode="STRICT", ports={8080: "UNSET"}),),
        False,
        False,
        STATIC,
    ),
    (
        "port-level settings without selector are ignored",
        (peer_auth("ns", mode="STRICT", ports={8080: "PERMISSIVE"}),),
        False,
        False,
        STATIC,
    ),
    (
        "workload selector of another pod does not apply",
        (peer_auth("wl", selector={"app": "b"}, mode="STRICT"),),
        True,
        True,
        None,
    ),
    ("unknown mode fails closed to strict", (peer_auth("ns", mode="STRCT"),), False, False, STATIC),
]


@pytest.mark.parametrize(
    ("pas", "plain_80", "plain_8080", "listed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_effective_mode(
    pas: tuple[PeerAuthentication, ...], plain_80: bool, plain_8080: bool, listed: str | None
) -> None:
    translation = scenario(*pas)
    assert plaintext_allowed(translation, "target", 80) is plain_80
    assert plaintext_allowed(translation, "target", 8080) is plain_8080
    assert mtls_allowed(translation, "target", 80) and mtls_allowed(translation, "target", 8080)
    converted = [
        k for k in workload_of(translation, "target").authorization_policies if "converted" in k.split("/")[1]
    ]
    assert converted == ([listed] if listed else [])


def test_workload_permissive_does_not_weaken_its_neighbours() -> None:
    translation = scenario(
        peer_auth("ns", mode="STRICT"), peer_auth("wl", selector={"app": "a"}, mode="PERMISSIVE")
    )
    assert plaintext_allowed(translation, "target", 80)
    assert not plaintext_allowed(translation, "neighbour", 80)
    # Another namespace is unaffected by default's namespace policy.
    assert plaintext_allowed(translation, "elsewhere", 80, "other")


def test_converted_policies_are_workload_selector_denies_of_missing_identity() -> None:
    translation = scenario(
        peer_auth("mesh", ROOT, mode="STRICT"),
        peer_auth("wl", selector={"app": "a"}, mode="PERMISSIVE", ports={8080: "STRICT", 9090: "STRICT"}),
    )
    static = translation.authorizations[STATIC]
    converted = translation.authorizations["default/converted_peer_authentication_wl"]
    presence = pb.StringMatch()
    presence.presence.SetInParent()
    assert static == pb.Authorization(
        name="istio_converted_static_strict",
        namespace=ROOT,
        scope=pb.WORKLOAD_SELECTOR,
        action=pb.DENY,
        groups=[pb.Group(rules=[pb.Rules(matches=[pb.Match(not_principals=[presence])])])],
    )
    assert converted == pb.Authorization(
        name="converted_peer_authentication_wl",
        namespace="default",
        scope=pb.WORKLOAD_SELECTOR,
        action=pb.DENY,
        groups=[
            pb.Group(
                rules=[
                    pb.Rules(matches=[pb.Match(not_principals=[presence], destination_ports=[8080, 9090])])
                ]
            )
        ],
    )


def test_the_fewest_distinct_policies() -> None:
    objects: list[Resource] = [
        namespace("default"),
        namespace("other"),
        peer_auth("mesh", ROOT, mode="STRICT"),
    ]
    objects += [pod(f"p{i}", labels={"app": f"a{i}"}, ips=(f"10.0.0.{i + 1}",)) for i in range(5)]
    objects += [pod(f"q{i}", "other", ips=(f"10.0.1.{i + 1}",)) for i in range(5)]
    translation = run(*objects)
    assert set(translation.authorizations) == {STATIC}
    assert all(list(a.workload.authorization_policies) == [STATIC] for a in translation.addresses.values())


def test_several_workload_policies_pick_the_first_by_name_and_warn() -> None:
    translation = scenario(
        peer_auth("b-strict", selector={"app": "a"}, mode="STRICT"),
        peer_auth("a-permissive", selector={"version": "v1"}, mode="PERMISSIVE"),
    )
    assert plaintext_allowed(translation, "target", 80)
    [warning] = warnings_for(translation, "Pod", "target")
    assert "a-permissive" in warning.message and "b-strict" in warning.message


@pytest.mark.parametrize(
    ("pas", "fragment"),
    [
        ((peer_auth("ns", mode="STRICT", ports={8080: "PERMISSIVE"}),), "need a workload selector"),
        ((peer_auth("ns", mode="STRCT"),), "treats it as STRICT"),
        ((peer_auth("a"), peer_auth("b", mode="STRICT")), "already has the namespace-wide"),
    ],
    ids=["port level without selector", "unknown mode", "two namespace-wide policies"],
)
def test_warnings(pas: tuple[PeerAuthentication, ...], fragment: str) -> None:
    translation = scenario(*pas)
    assert any(
        fragment in d.message and d.key is not None and d.key.kind == "PeerAuthentication"
        for d in translation.diagnostics
    )


# --- property: plaintext decisions follow the precedence rules --------------------------------------

MODES = ["UNSET", "PERMISSIVE", "STRICT", "DISABLE"]
PORTS = [80, 8080, 9090]
modes = st.sampled_from(MODES)
port_levels = st.dictionaries(st.sampled_from(PORTS), modes, max_size=2)


def reference_strict(
    mesh: PeerAuthentication | None,
    ns: PeerAuthentication | None,
    workload_level: list[PeerAuthentication],
    labels: Mapping[str, str],
    port: int,
) -> bool:
    """Istio's precedence, written out: most specific setting that is not UNSET wins."""
    strict = False
    for level in (mesh, ns):
        if level is not None and level.mode != "UNSET":
            strict = level.mode == "STRICT"
    selecting = sorted(
        (pa for pa in workload_level if pa.selector is not None and pa.selector.matches(labels)),
        key=lambda pa: pa.name,
    )
    if selecting:
        chosen = selecting[0]
        if chosen.mode != "UNSET":
            strict = chosen.mode == "STRICT"
        port_mode = chosen.port_level_mtls.get(port, "UNSET")
        if port_mode != "UNSET":
            strict = port_mode == "STRICT"
    return strict


@settings(max_examples=200, deadline=None)
@given(
    mesh=st.none() | modes.map(lambda m: peer_auth("mesh", ROOT, mode=m)),
    ns=st.none() | st.builds(lambda m, p: peer_auth("ns", mode=m, ports=p), modes, port_levels),
    workload_level=st.lists(
        st.builds(
            lambda i, sel, m, p: peer_auth(f"wl{i}", selector=sel, mode=m, ports=p),
            st.integers(0, 3),
            st.sampled_from([{"app": "a"}, {"version": "v1"}, {"app": "b"}]),
            modes,
            port_levels,
        ),
        max_size=3,
        unique_by=lambda pa: pa.name,
    ),
)
def test_plaintext_is_denied_exactly_where_mtls_is_strict(
    mesh: PeerAuthentication | None, ns: PeerAuthentication | None, workload_level: list[PeerAuthentication]
) -> None:
    pas = [pa for pa in (mesh, ns, *workload_level) if pa is not None]
    translation = scenario(*pas)
    for port in PORTS:
        strict = reference_strict(mesh, ns, workload_level, POD_LABELS, port)
        assert plaintext_allowed(translation, "target", port) is not strict, port
        assert mtls_allowed(translation, "target", port)
