"""Table tests for the in-pod redirection rules (cni/rules.py), with a small iptables-restore model that
checks idempotent application and removal from arbitrary starting states."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni.rules import (
    ALL_TABLES,
    InpodConfig,
    InpodRules,
    InpodRulesError,
    IpFamily,
    IptablesSaveError,
    LocalRoute,
    PolicyRule,
    parse_iptables_save,
    rule_target,
)

DEFAULT_V4 = (
    "*mangle\n"
    ":ISTIO_PRERT - [0:0]\n"
    ":ISTIO_OUTPUT - [0:0]\n"
    "-I PREROUTING 1 -j ISTIO_PRERT\n"
    "-I OUTPUT 1 -j ISTIO_OUTPUT\n"
    "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff\n"
    "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark"
    " --nfmask 0xffffffff --ctmask 0xffffffff\n"
    "COMMIT\n"
    "*nat\n"
    ":ISTIO_PRERT - [0:0]\n"
    ":ISTIO_OUTPUT - [0:0]\n"
    "-I PREROUTING 1 -j ISTIO_PRERT\n"
    "-I OUTPUT 1 -j ISTIO_OUTPUT\n"
    "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT\n"
    "-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark"
    " 0x539/0xfff -j REDIRECT --to-ports 15006\n"
    "-A ISTIO_OUTPUT -d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT\n"
    "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT\n"
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT\n"
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j"
    " REDIRECT --to-ports 15001\n"
    "COMMIT\n"
)

BUILTIN = {
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}


# -- a model of iptables-restore --noflush, enough for the commands the renderer emits ----------------


@dataclass
class ModelTable:
    chains: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Model:
    tables: dict[str, ModelTable] = field(
        default_factory=lambda: {t: ModelTable({c: [] for c in cs}) for t, cs in BUILTIN.items()}
    )

    def save(self) -> str:
        out = []
        for name, table in self.tables.items():
            out.append(f"*{name}")
            out += [f":{chain} {'ACCEPT' if chain in BUILTIN[name] else '-'} [0:0]" for chain in table.chains]
            out += [f"-A {chain} {spec}" for chain, specs in table.chains.items() for spec in specs]
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    def restore(self, text: str) -> None:
        """Apply like iptables-restore: all-or-nothing per table (errors raise before committing)."""
        staged: dict[str, list[str]] | None = None
        table_name = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table_name = line[1:]
                staged = {c: list(r) for c, r in self.tables[table_name].chains.items()}
            elif line == "COMMIT":
                assert staged is not None
                self.tables[table_name].chains = staged
                staged = None
            else:
                assert staged is not None, f"command outside a table: {line}"
                if line.startswith(":"):
                    staged[line[1:].split()[0]] = []  # create, or flush an existing chain
                    continue
                command, chain, *rest = line.split(" ", 2)
                spec = rest[0] if rest else ""
                if command == "-A":
                    staged[chain].append(spec)
                elif command == "-I":
                    position, _, spec = spec.partition(" ")
                    staged[chain].insert(int(position) - 1, spec)
                elif command == "-D":
                    staged[chain].remove(spec)  # ValueError = "does not exist", like the real tool
                elif command == "-F":
                    staged[chain] = []
                elif command == "-X":
                    assert chain not in BUILTIN[table_name]
                    assert not staged[chain], f"deleting non-empty chain {chain}"
                    for specs in staged.values():
                        assert all(rule_target(s) != chain for s in specs), f"{chain} is still referenced"
                    del staged[chain]
                else:
                    raise AssertionError(f"unexpected command {line}")
        assert staged is None, "restore input ended without COMMIT"


# -- rendering ------------------------------------------------------------------------------------


def test_default_rules_for_a_fresh_pod_match_the_reference_layout() -> None:
    assert InpodRules().iptables_restore_v4() == DEFAULT_V4


def test_rendering_uses_only_mangle_and_nat_without_dns_capture() -> None:
    rules = InpodRules()
    assert rules.tables() == ("mangle", "nat")
    assert "15053" not in rules.iptables_restore_v4()
    assert "*raw" not in rules.iptables_restore_v4()


def test_dns_capture_adds_dns_redirects_before_the_outbound_redirect_and_the_raw_table() -> None:
    rules = InpodRules(InpodConfig(dns_capture=True))
    nat_output = [r.spec for r in rules.rules(IpFamily.V4) if r.table == "nat" and r.chain == "ISTIO_OUTPUT"]
    assert nat_output == [
        "-d 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
        "! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053",
        "! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff"
        " -j REDIRECT --to-ports 15053",
        "-p tcp -m mark --mark 0x111/0xfff -j ACCEPT",
        "! -d 127.0.0.1/32 -o lo -j ACCEPT",
        "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
    ]
    raw = [(r.chain, r.spec) for r in rules.rules(IpFamily.V4) if r.table == "raw"]
    assert raw == [
        ("ISTIO_PRERT", "-p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1"),
        ("ISTIO_OUTPUT", "-p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1"),
    ]


@pytest.mark.parametrize(
    ("config", "family", "expected_prerouting"),
    [
        pytest.param(
            InpodConfig(),
            IpFamily.V4,
            [
                "-s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
                "! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff"
                " -j REDIRECT --to-ports 15006",
            ],
            id="default ipv4: probe bypass then inbound redirect except hbone",
        ),
        pytest.param(
            InpodConfig(),
            IpFamily.V6,
            [
                "-s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128 -p tcp -m tcp -j ACCEPT",
                "! -d ::1/128 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff"
                " -j REDIRECT --to-ports 15006",
            ],
            id="ipv6 uses ::1 and the v6 probe address",
        ),
        pytest.param(
            InpodConfig(inbound_capture=False),
            IpFamily.V4,
            ["-s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT"],
            id="ingress mode has no inbound redirect",
        ),
        pytest.param(
            InpodConfig(virtual_interfaces=("tap0", "net1")),
            IpFamily.V4,
            [
                "-s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
                "-i tap0 -p tcp -j REDIRECT --to-ports 15001",
                "-i net1 -p tcp -j REDIRECT --to-ports 15001",
                "! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff"
                " -j REDIRECT --to-ports 15006",
            ],
            id="virtual interfaces are rerouted as outbound before inbound capture",
        ),
        pytest.param(
            InpodConfig(
                outbound_port=16001, inbound_plaintext_port=16006, inbound_hbone_port=16008, mark=0x7
            ),
            IpFamily.V4,
            [
                "-s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
                "! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 16008 -m mark ! --mark 0x7/0xfff"
                " -j REDIRECT --to-ports 16006",
            ],
            id="ports and mark come from the configuration",
        ),
    ],
)
def test_nat_prerouting_rules(config: InpodConfig, family: IpFamily, expected_prerouting: list[str]) -> None:
    rules = InpodRules(config).rules(family)
    assert [r.spec for r in rules if r.table == "nat" and r.chain == "ISTIO_PRERT"] == expected_prerouting


def test_ipv6_restore_is_the_ipv4_layout_with_ipv6_addresses() -> None:
    v6 = InpodRules().iptables_restore_v6()
    expected = DEFAULT_V4.replace("169.254.7.127/32", "fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128").replace(
        "127.0.0.1/32", "::1/128"
    )
    assert v6 == expected


# -- idempotency and removal against the restore model ---------------------------------------------


def apply(model: Model, rules: InpodRules, family: IpFamily = IpFamily.V4) -> None:
    model.restore(rules.iptables_restore(family, model.save()))


def test_applying_twice_leaves_one_copy_and_second_pass_adds_no_jumps() -> None:
    model, rules = Model(), InpodRules()
    apply(model, rules)
    second = rules.iptables_restore_v4(model.save())
    assert "-I " not in second and "-D " not in second
    model.restore(second)
    assert rules.verify(IpFamily.V4, model.save()) == ()
    assert model.tables["nat"].chains["PREROUTING"] == ["-j ISTIO_PRERT"]


def test_apply_keeps_foreign_rules_and_puts_the_jump_first() -> None:
    model, rules = Model(), InpodRules()
    model.tables["nat"].chains["OUTPUT"] = ["-d 10.0.0.1/32 -j ACCEPT"]
    apply(model, rules)
    assert model.tables["nat"].chains["OUTPUT"] == ["-j ISTIO_OUTPUT", "-d 10.0.0.1/32 -j ACCEPT"]


def test_apply_repairs_duplicate_jumps_stray_references_and_drifted_rules() -> None:
    model, rules = Model(), InpodRules()
    apply(model, rules)
    nat = model.tables["nat"].chains
    nat["PREROUTING"] += ["-j ISTIO_PRERT", "-p udp -j ISTIO_PRERT"]
    nat["INPUT"].append("-g ISTIO_OUTPUT")
    nat["ISTIO_OUTPUT"].pop()
    problems = rules.verify(IpFamily.V4, model.save())
    assert any("expected one jump to ISTIO_PRERT, found 2" in p for p in problems)
    assert any("unexpected reference" in p and "-g ISTIO_OUTPUT" in p for p in problems)
    assert any(p.startswith("nat ISTIO_OUTPUT: expected") for p in problems)
    apply(model, rules)
    assert rules.verify(IpFamily.V4, model.save()) == ()


def test_turning_dns_capture_off_removes_the_raw_table_chains() -> None:
    model = Model()
    apply(model, InpodRules(InpodConfig(dns_capture=True)))
    assert "ISTIO_PRERT" in model.tables["raw"].chains
    off = InpodRules()
    assert any(p.startswith("raw:") for p in off.verify(IpFamily.V4, model.save()))
    apply(model, off)
    assert "ISTIO_PRERT" not in model.tables["raw"].chains
    assert model.tables["raw"].chains["PREROUTING"] == []
    assert off.verify(IpFamily.V4, model.save()) == ()


def test_removal_deletes_references_then_flushes_and_deletes_chains() -> None:
    model, rules = Model(), InpodRules(InpodConfig(dns_capture=True))
    model.tables["nat"].chains["OUTPUT"] = ["-d 10.0.0.1/32 -j ACCEPT"]
    apply(model, rules)
    removal = InpodRules().removal_restore_v4(model.save())  # whatever config wrote the rules
    assert "*raw" in removal
    model.restore(removal)
    assert (
        model.save()
        == Model(
            tables={
                **Model().tables,
                "nat": ModelTable({**Model().tables["nat"].chains, "OUTPUT": ["-d 10.0.0.1/32 -j ACCEPT"]}),
            }
        ).save()
    )
    assert InpodRules().removal_restore_v4(model.save()) == ""


def test_verify_reports_a_pod_without_rules() -> None:
    problems = InpodRules().verify(IpFamily.V4, Model().save())
    assert problems == (
        "mangle: chain ISTIO_PRERT is missing",
        "mangle: chain ISTIO_OUTPUT is missing",
        "nat: chain ISTIO_PRERT is missing",
        "nat: chain ISTIO_OUTPUT is missing",
    )
    assert InpodRules().verify(IpFamily.V4, "") == (
        "mangle: table has none of our rules",
        "nat: table has none of our rules",
    )


configs = st.builds(
    InpodConfig,
    dns_capture=st.booleans(),
    inbound_capture=st.booleans(),
    virtual_interfaces=st.lists(st.sampled_from(["tap0", "net1", "eth9"]), unique=True, max_size=2).map(
        tuple
    ),
)
# Perturbations of a namespace before (re)application: foreign rules, stray/duplicate references.
perturbations = st.lists(
    st.tuples(
        st.sampled_from(ALL_TABLES),
        st.sampled_from(["PREROUTING", "OUTPUT"]),
        st.sampled_from(
            [
                "-j ISTIO_PRERT",
                "-j ISTIO_OUTPUT",
                "-p tcp -j ISTIO_OUTPUT",
                "-d 10.1.0.0/16 -j ACCEPT",
                "-j RETURN",
            ]
        ),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(before=st.none() | configs, after=configs, noise=perturbations, family=st.sampled_from(IpFamily))
def test_apply_converges_and_removal_restores_from_any_state(
    before: InpodConfig | None, after: InpodConfig, noise: list[tuple[str, str, str]], family: IpFamily
) -> None:
    model = Model()
    if before is not None:
        apply(model, InpodRules(before), family)
    for table_name, chain, spec in noise:
        target = rule_target(spec)
        if target is None or target in model.tables[table_name].chains:
            model.tables[table_name].chains[chain].append(spec)
    foreign = {
        (t, c): [s for s in specs if rule_target(s) not in ("ISTIO_PRERT", "ISTIO_OUTPUT")]
        for t, table in model.tables.items()
        for c, specs in table.chains.items()
        if c in BUILTIN[t]
    }
    rules = InpodRules(after)
    apply(model, rules, family)
    assert rules.verify(family, model.save()) == ()
    apply(model, rules, family)
    assert rules.verify(family, model.save()) == ()
    model.restore(rules.removal_restore(family, model.save()))
    for t, table in model.tables.items():
        assert set(table.chains) == set(BUILTIN[t])
        for c, specs in table.chains.items():
            assert specs == foreign[(t, c)], "removal must leave exactly the foreign rules"


# -- parsing iptables-save ------------------------------------------------------------------------


def test_parse_handles_counters_comments_and_quoted_specs() -> None:
    text = """# Generated by iptables-save
*nat
:PREROUTING ACCEPT [5:300]
:ISTIO_PRERT - [0:0]
[5:300] -A PREROUTING -j ISTIO_PRERT
-A ISTIO_PRERT -m comment --comment "a b" -j ACCEPT
-A ISTIO_PRERT
COMMIT
"""
    table = parse_iptables_save(text)["nat"]
    assert table.chains == ("PREROUTING", "ISTIO_PRERT")
    assert table.rules_of("PREROUTING") == ("-j ISTIO_PRERT",)
    assert table.rules_of("ISTIO_PRERT") == ('-m comment --comment "a b" -j ACCEPT', "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("*nat\n*mangle\nCOMMIT\n", "line 2: table starts before table 'nat' was committed"),
        ("-A OUTPUT -j ACCEPT\n", "line 1: rule outside a table"),
        ("*nat\n:OUTPUT ACCEPT [0:0]\n", "table 'nat' is not committed"),
        ("COMMIT\n", "line 1: COMMIT outside a table"),
        ("*nat\n-A OUTPUT -j ACCEPT\nCOMMIT\n", "line 2: rule for undeclared chain 'OUTPUT'"),
        ("*nat\n:OUTPUT ACCEPT\nCOMMIT\n", "line 2: chain declaration is not"),
        ('*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -m comment --comment "x\nCOMMIT\n', "unbalanced quoting"),
        ("*nat\nCOMMIT\n*nat\nCOMMIT\n", "line 3: table 'nat' appears twice"),
        ("*nat\nbogus\nCOMMIT\n", "line 2: not a '-A <chain> ...' rule"),
        ("*\nCOMMIT\n", "line 1: bad table name"),
    ],
)
def test_parse_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(IptablesSaveError, match=re.escape(message)):
        parse_iptables_save(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('*:-AJCOMIT ntoa[]0"#\n')), max_size=80))
def test_parse_never_fails_with_anything_but_a_save_error(text: str) -> None:
    try:
        parse_iptables_save(text)
    except IptablesSaveError:
        pass


def test_rule_target_reads_jump_and_goto() -> None:
    assert rule_target("-p tcp -j REDIRECT --to-ports 15001") == "REDIRECT"
    assert rule_target("-g ISTIO_OUTPUT") == "ISTIO_OUTPUT"
    assert rule_target("-p tcp") is None
    assert shlex.split('-m comment --comment "-j X"') == ["-m", "comment", "--comment", "-j X"]
    assert rule_target('-m comment --comment "-j X"') is None


# -- policy routing --------------------------------------------------------------------------------


def test_policy_routing_argument_vectors() -> None:
    rules = InpodRules()
    assert rules.policy_rule(IpFamily.V4).ip_args("add") == (
        "-4", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100",
    )  # fmt: skip
    assert rules.local_route(IpFamily.V4).ip_args("replace") == (
        "-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", "100",
    )  # fmt: skip
    assert rules.local_route(IpFamily.V6).ip_args("del") == (
        "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100",
    )  # fmt: skip


def test_policy_routing_presence_from_ip_json() -> None:
    rule = InpodRules().policy_rule(IpFamily.V4)
    present = [
        {"priority": 0, "src": "all", "table": "local"},
        {"priority": 32764, "src": "all", "fwmark": "0x111", "fwmask": "0xfff", "table": "100"},
    ]
    assert rule.found_in(present)
    assert not rule.found_in(present[:1])
    assert not PolicyRule(IpFamily.V4, 0x111, 0xFFF, 32764, 101).found_in(present)
    route = InpodRules().local_route(IpFamily.V4)
    assert route.found_in([{"type": "local", "dst": "default", "dev": "lo"}])
    assert not route.found_in([{"type": "unicast", "dst": "default", "dev": "lo"}])
    assert LocalRoute(IpFamily.V6, "::/0", "lo", 100).found_in(
        [{"type": "local", "dst": "default", "dev": "lo"}]
    )


# -- configuration validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outbound_port": 0}, "outbound_port=0 is not a TCP port"),
        ({"inbound_plaintext_port": 15001}, "ports must be distinct"),
        ({"mark": 0x1000}, "mark=0x1000 must be non-zero and inside mask 0xfff"),
        ({"tproxy_mark": 0x539}, "mark and tproxy_mark must differ"),
        ({"route_table": 254}, "route_table=254 must be 1-252"),
        ({"rule_priority": 32766}, "rule_priority=32766 must be 1-32765"),
        ({"probe_snat_ipv4": "fd00::1"}, "probe_snat_ipv4='fd00::1' is not an IPv4 address"),
        ({"probe_snat_ipv6": "nonsense"}, "probe_snat_ipv6='nonsense' is not an IP address"),
        ({"probe_snat_ipv6": "FD16::1"}, "must be written canonically as fd16::1"),
        ({"virtual_interfaces": ("a very long interface",)}, "is not a valid interface name"),
        ({"mask": 0}, "mask=0x0 must be a non-zero 32-bit value"),
    ],
)
def test_invalid_configuration_is_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InpodRulesError, match=re.escape(message)):
        InpodConfig(**kwargs)  # type: ignore[arg-type]
