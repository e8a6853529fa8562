"""cni/rules.py against the real iptables-restore/iptables-save and iproute2 inside a pod namespace.
Root only."""

from __future__ import annotations

import pytest

from cni.rules import InpodConfig, InpodRules, IpFamily, parse_iptables_save
from loom.testing.netns import NetnsLab, apply_inpod_rules, remove_inpod_rules

pytestmark = pytest.mark.root

FAMILIES = pytest.mark.parametrize("family", list(IpFamily), ids=lambda f: f.name.lower())


def our_chains(save: str) -> dict[str, tuple[str, ...]]:
    return {
        name: tuple(chain for chain in table.chains if chain.startswith("ISTIO_"))
        for name, table in parse_iptables_save(save).items()
    }


def all_rules(save: str) -> list[tuple[str, str, str]]:
    """Every rule of every table (tables without rules may or may not be listed, depending on the backend)."""
    return [
        (name, chain, spec)
        for name, table in parse_iptables_save(save).items()
        for chain, spec in table.rules
    ]


@FAMILIES
def test_rendered_rules_survive_a_save_round_trip_and_reapplying_changes_nothing(
    lab: NetnsLab, family: IpFamily
) -> None:
    pod = lab.add_pod(lab.add_node("n1"), "a")
    rules = InpodRules()
    assert rules.verify(family, pod.netns.iptables_save(family)) != ()
    apply_inpod_rules(pod.netns, rules, [family])
    first = pod.netns.iptables_save(family)
    # The rendered text is exactly what iptables-save prints back, line by line.
    assert rules.verify(family, first) == ()
    apply_inpod_rules(pod.netns, rules, [family])
    second = pod.netns.iptables_save(family)
    assert parse_iptables_save(second) == parse_iptables_save(first)

    rule = rules.policy_rule(family)
    route = rules.local_route(family)
    rule_entries = [
        e for e in pod.netns.ip_json(family.ip_flag, "rule", "show") if e.get("priority") == 32764
    ]
    assert len(rule_entries) == 1 and rule.found_in(rule_entries)
    assert route.found_in(pod.netns.ip_json(family.ip_flag, "route", "show", "table", "100"))


@FAMILIES
def test_removal_leaves_no_chain_rule_or_route(lab: NetnsLab, family: IpFamily) -> None:
    pod = lab.add_pod(lab.add_node("n1"), "a")
    rules = InpodRules(InpodConfig(dns_capture=True))
    pristine = pod.netns.iptables_save(family)
    apply_inpod_rules(pod.netns, rules, [family])
    assert our_chains(pod.netns.iptables_save(family))["raw"] == ("ISTIO_OUTPUT", "ISTIO_PRERT")
    remove_inpod_rules(pod.netns, rules, [family])
    after = pod.netns.iptables_save(family)
    assert all(chains == () for chains in our_chains(after).values())
    assert all_rules(after) == all_rules(pristine)
    assert not rules.policy_rule(family).found_in(pod.netns.ip_json(family.ip_flag, "rule", "show"))
    assert pod.netns.ip_json(family.ip_flag, "route", "show", "table", "100") == []
    remove_inpod_rules(pod.netns, rules, [family])  # a second removal is a no-op


def test_switching_dns_capture_off_cleans_the_raw_table(lab: NetnsLab) -> None:
    pod = lab.add_pod(lab.add_node("n1"), "a")
    apply_inpod_rules(pod.netns, InpodRules(InpodConfig(dns_capture=True)))
    apply_inpod_rules(pod.netns, InpodRules())
    save = pod.netns.iptables_save()
    assert our_chains(save)["raw"] == ()
    assert InpodRules().verify(IpFamily.V4, save) == ()


def test_foreign_rules_in_the_pod_are_left_alone(lab: NetnsLab) -> None:
    pod = lab.add_pod(lab.add_node("n1"), "a")
    pod.netns.exec(["iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.99.0.1/32", "-j", "ACCEPT"])
    apply_inpod_rules(pod.netns)
    nat = parse_iptables_save(pod.netns.iptables_save())["nat"]
    assert nat.rules_of("OUTPUT") == ("-j ISTIO_OUTPUT", "-d 10.99.0.1/32 -j ACCEPT")
    remove_inpod_rules(pod.netns)
    nat = parse_iptables_save(pod.netns.iptables_save())["nat"]
    assert nat.rules_of("OUTPUT") == ("-d 10.99.0.1/32 -j ACCEPT",)
