"""The node's probe SNAT rules (pure rendering and verification against iptables-save text)."""

from __future__ import annotations

import ipaddress

import pytest

from cni.agent.host_rules import HOST_CHAIN, HostProbeRules
from cni.rules import IpFamily

A = ipaddress.ip_address("10.80.1.2")
B = ipaddress.ip_address("10.80.1.3")
V6 = ipaddress.ip_address("fd00::5")

EMPTY = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -o eth0 -j MASQUERADE
COMMIT
"""


def saved(*rules: str, jumps: int = 1, extra: str = "") -> str:
    """A node's nat table holding our chain with `rules` and `jumps` jumps to it."""
    lines = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        f":{HOST_CHAIN} - [0:0]",
    ]
    lines += [f"-A POSTROUTING -j {HOST_CHAIN}"] * jumps
    lines.append("-A POSTROUTING -o eth0 -j MASQUERADE")
    if extra:
        lines.append(extra)
    lines += [f"-A {HOST_CHAIN} {rule}" for rule in rules]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def snat(ip: str) -> str:
    return f"-d {ip}/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127"


RULES = HostProbeRules()


def test_fresh_node_gets_chain_jump_and_one_rule_per_ip() -> None:
    text = RULES.restore(IpFamily.V4, [B, A, A], EMPTY)
    assert text == (
        f"*nat\n:{HOST_CHAIN} - [0:0]\n-I POSTROUTING 1 -j {HOST_CHAIN}\n"
        f"-A {HOST_CHAIN} {snat('10.80.1.2')}\n-A {HOST_CHAIN} {snat('10.80.1.3')}\nCOMMIT\n"
    )


def test_in_place_rules_need_no_write_and_verify_clean() -> None:
    current = saved(snat("10.80.1.2"))
    assert RULES.verify(IpFamily.V4, [A], current) == ()
    assert RULES.restore(IpFamily.V4, [A], current) == ""


@pytest.mark.parametrize(
    ("current", "wanted", "expect_in", "expect_not_in"),
    [
        # a stale pod (left by a crashed agent) is dropped by the wholesale rewrite
        (
            saved(snat("10.80.1.2"), snat("10.80.1.99")),
            [A],
            [snat("10.80.1.2")],
            ["10.80.1.99", "-I POSTROUTING"],
        ),
        # duplicate jumps are reduced to one
        (saved(snat("10.80.1.2"), jumps=2), [A], [f"-D POSTROUTING -j {HOST_CHAIN}"], ["-I POSTROUTING"]),
        # a jump from elsewhere is removed, the missing POSTROUTING jump added
        (
            saved(snat("10.80.1.2"), jumps=0, extra=f"-A OUTPUT -j {HOST_CHAIN}"),
            [A, B],
            [f"-D OUTPUT -j {HOST_CHAIN}", f"-I POSTROUTING 1 -j {HOST_CHAIN}", snat("10.80.1.3")],
            [],
        ),
    ],
)
def test_rewrite_repairs(
    current: str, wanted: list[ipaddress.IPv4Address], expect_in: list[str], expect_not_in: list[str]
) -> None:
    assert RULES.verify(IpFamily.V4, wanted, current) != ()
    text = RULES.restore(IpFamily.V4, wanted, current)
    assert text.startswith(f"*nat\n:{HOST_CHAIN} - [0:0]\n") and text.endswith("COMMIT\n")
    for piece in expect_in:
        assert piece in text
    for piece in expect_not_in:
        assert piece not in text


def test_no_pods_removes_everything() -> None:
    current = saved(snat("10.80.1.2"), jumps=2)
    assert RULES.verify(IpFamily.V4, [], current) != ()
    assert RULES.restore(IpFamily.V4, [], current) == (
        f"*nat\n-D POSTROUTING -j {HOST_CHAIN}\n-D POSTROUTING -j {HOST_CHAIN}\n"
        f"-F {HOST_CHAIN}\n-X {HOST_CHAIN}\nCOMMIT\n"
    )
    assert RULES.restore(IpFamily.V4, [], EMPTY) == ""
    assert RULES.verify(IpFamily.V4, [], EMPTY) == ()


def test_jump_must_come_first() -> None:
    current = saved(snat("10.80.1.2")).replace(
        f"-A POSTROUTING -j {HOST_CHAIN}\n-A POSTROUTING -o eth0 -j MASQUERADE",
        f"-A POSTROUTING -o eth0 -j MASQUERADE\n-A POSTROUTING -j {HOST_CHAIN}",
    )
    assert any("first place" in p for p in RULES.verify(IpFamily.V4, [A], current))


def test_families_take_their_own_addresses() -> None:
    assert RULES.rules(IpFamily.V4, [A, V6]) == (snat("10.80.1.2"),)
    assert RULES.rules(IpFamily.V6, [A, V6]) == (
        "-d fd00::5/128 -p tcp -m owner --socket-exists -j SNAT"
        " --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
    )
