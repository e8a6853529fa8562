"""CNI spec conformance of `cni.plugin.run`: ADD/DEL/CHECK/VERSION/STATUS/GC, prevResult pass-through,
every error's JSON shape and code, excluded namespaces, and the node-agent outcomes (against a stand-in
agent on a real unix socket, or a fake transport where the socket adds nothing)."""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any, Literal

import pytest
from cni_standin_agent import dead_socket, running_agent, short_socket_dir
from hypothesis import given, settings
from hypothesis import strategies as st

from cni import events
from cni.events import AgentReply, AgentRequest, Attachment, Outcome, RequestKind
from cni.plugin import SUPPORTED_VERSIONS, AgentTransport, ErrorCode, PluginOutput, run

PREV_RESULT_1_0: dict[str, Any] = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
        {"name": "veth3a1c", "mac": "5e:2b:19:aa:01:02"},
        {"name": "eth0", "mac": "0a:58:0a:f4:01:07", "sandbox": "/var/run/netns/cni-1234"},
    ],
    "ips": [
        {"address": "10.244.1.1/24", "interface": 0},
        {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 2},
        {"address": "fd00:10:244:1::7/64", "gateway": "fd00:10:244:1::1", "interface": 2},
    ],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
}
PREV_RESULT_0_4: dict[str, Any] = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1234"}],
    "ips": [{"version": "4", "address": "10.244.2.9/24", "gateway": "10.244.2.1", "interface": 0}],
    "dns": {},
}
POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=bookinfo;K8S_POD_NAME=reviews-v1-5b7c;K8S_POD_UID=8e0f-4a1b"


def cni_env(command: str, **overrides: str | None) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "4f1cbeef01",
        "CNI_NETNS": "/var/run/netns/cni-1234",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": POD_ARGS,
        "CNI_PATH": "/opt/cni/bin",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


_ABSENT = object()


def net_conf(
    socket_path: str = "/tmp/nonexistent-lc/ev.sock",
    version: str = "1.0.0",
    prev: Any = _ABSENT,
    dotted: dict[str, Any] | None = None,
    **extra: Any,
) -> bytes:
    """A network configuration; `dotted` carries keys that are not identifiers (cni.dev/...)."""
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "loom-cni",
        "agentSocket": socket_path,
    }
    if prev is _ABSENT:
        prev = PREV_RESULT_1_0 if version.startswith("1.") else PREV_RESULT_0_4
    if prev is not None:
        conf["prevResult"] = prev
    conf.update(extra)
    conf.update(dotted or {})
    return json.dumps(conf).encode()


def must_not_call(socket_path: str, request: AgentRequest, timeout: float) -> AgentReply:
    raise AssertionError(f"the agent must not be asked here, got {request}")


def answering(reply: AgentReply, seen: list[AgentRequest] | None = None) -> AgentTransport:
    def transport(socket_path: str, request: AgentRequest, timeout: float) -> AgentReply:
        if seen is not None:
            seen.append(request)
        return reply

    return transport


def error_of(output: PluginOutput) -> dict[str, Any]:
    """The error object, after checking the spec's shape: non-zero exit, exactly these keys."""
    assert output.exit_code != 0
    obj: dict[str, Any] = json.loads(output.stdout)
    assert set(obj) <= {"cniVersion", "code", "msg", "details"}
    assert {"cniVersion", "code", "msg"} <= set(obj)
    assert isinstance(obj["code"], int) and isinstance(obj["msg"], str) and obj["msg"]
    assert obj["cniVersion"] in SUPPORTED_VERSIONS
    return obj


def result_of(output: PluginOutput) -> dict[str, Any]:
    assert output.exit_code == 0, output.stdout
    result: dict[str, Any] = json.loads(output.stdout)
    return result


# ---------------------------------------------------------------------------------------------------------
# VERSION
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stdin", "expected_version"),
    [
        pytest.param(b'{"cniVersion": "0.4.0"}', "0.4.0", id="echoes a supported version"),
        pytest.param(b'{"cniVersion": "1.1.0"}', "1.1.0", id="echoes 1.1.0"),
        pytest.param(b"", "1.1.0", id="empty stdin answers in the latest version"),
        pytest.param(b'{"cniVersion": "0.2.0"}', "1.1.0", id="unsupported version still gets the list"),
    ],
)
def test_version_lists_supported_versions(stdin: bytes, expected_version: str) -> None:
    output = run({"CNI_COMMAND": "VERSION"}, stdin, must_not_call)
    assert result_of(output) == {
        "cniVersion": expected_version,
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_version_with_undecodable_stdin_is_decode_error() -> None:
    assert error_of(run({"CNI_COMMAND": "VERSION"}, b"{not json", must_not_call))["code"] == 6


# ---------------------------------------------------------------------------------------------------------
# ADD against the stand-in agent
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outcome", [Outcome.ENROLLED, Outcome.NOT_ENROLLED], ids=["enrolled", "not enrolled"]
)
def test_add_passes_prev_result_through_once_agent_answers(outcome: Outcome) -> None:
    with running_agent(lambda request: AgentReply(outcome)) as agent:
        output = run(cni_env("ADD"), net_conf(agent.socket_path))
    assert result_of(output) == PREV_RESULT_1_0
    assert len(agent.requests) == 1
    request = agent.requests[0]
    assert request.kind is RequestKind.ADD
    assert request.pod == events.PodAttachment(
        namespace="bookinfo",
        name="reviews-v1-5b7c",
        uid="8e0f-4a1b",
        container_id="4f1cbeef01",
        netns="/var/run/netns/cni-1234",
        ifname="eth0",
        # the bridge's own address (interface 0, no sandbox) is not the pod's
        ips=(ipaddress.ip_address("10.244.1.7"), ipaddress.ip_address("fd00:10:244:1::7")),
    )


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_result_is_written_in_the_configured_version(version: str) -> None:
    prev = PREV_RESULT_1_0 if version.startswith("1.") else PREV_RESULT_0_4
    with running_agent(lambda request: AgentReply(Outcome.ENROLLED)) as agent:
        result = result_of(
            run(
                cni_env("ADD"),
                net_conf(agent.socket_path, version=version, prev={**prev, "cniVersion": version}),
            )
        )
    assert result == {**prev, "cniVersion": version}


@pytest.mark.parametrize(
    ("config_version", "prev", "expected_ips"),
    [
        pytest.param(
            "1.0.0",
            PREV_RESULT_0_4,
            [{"address": "10.244.2.9/24", "gateway": "10.244.2.1", "interface": 0}],
            id="0.4.0 result into 1.0.0 drops ips version",
        ),
        pytest.param(
            "0.3.1",
            {k: v for k, v in PREV_RESULT_1_0.items() if k != "cniVersion"},
            [
                {"address": "10.244.1.1/24", "interface": 0, "version": "4"},
                {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 2, "version": "4"},
                {
                    "address": "fd00:10:244:1::7/64",
                    "gateway": "fd00:10:244:1::1",
                    "interface": 2,
                    "version": "6",
                },
            ],
            id="versionless 1.0 result into 0.3.1 gains ips version",
        ),
    ],
)
def test_add_converts_prev_result_of_another_version(
    config_version: str, prev: dict[str, Any], expected_ips: list[Any]
) -> None:
    result = result_of(
        run(
            cni_env("ADD"),
            net_conf(version=config_version, prev=prev),
            answering(AgentReply(Outcome.ENROLLED)),
        )
    )
    assert result["cniVersion"] == config_version
    assert result["ips"] == expected_ips
    assert result["interfaces"] == prev["interfaces"]


def test_add_in_excluded_namespace_does_not_ask_the_agent() -> None:
    env = cni_env("ADD", CNI_ARGS="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-7db6d8ff4d-x2x9q")
    # The socket does not exist: passing through must not even try it.
    assert result_of(run(env, net_conf(), must_not_call)) == PREV_RESULT_1_0


def test_excluded_namespaces_come_from_config() -> None:
    conf = net_conf(excludeNamespaces=["bookinfo"])
    assert result_of(run(cni_env("ADD"), conf, must_not_call)) == PREV_RESULT_1_0
    seen: list[AgentRequest] = []
    env = cni_env("ADD", CNI_ARGS="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1")
    result_of(run(env, conf, answering(AgentReply(Outcome.NOT_ENROLLED), seen)))
    assert [r.pod.namespace for r in seen if r.pod] == ["kube-system"]


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        pytest.param(
            AgentReply(Outcome.ERROR, "ztunnel is not connected", retry=True), 11, id="transient error"
        ),
        pytest.param(AgentReply(Outcome.ERROR, "netns /proc/9/ns/net is gone"), 100, id="permanent error"),
    ],
)
def test_add_agent_error_carries_agent_message(reply: AgentReply, code: int) -> None:
    with running_agent(lambda request: reply) as agent:
        error = error_of(run(cni_env("ADD"), net_conf(agent.socket_path)))
    assert error["code"] == code
    assert reply.message in error["msg"]
    assert "bookinfo/reviews-v1-5b7c" in error["msg"]
    assert error["cniVersion"] == "1.0.0"


@pytest.mark.parametrize("wrong", [Outcome.DONE], ids=["done is not an ADD answer"])
def test_add_with_an_answer_that_is_not_enrolled_or_not_enrolled_fails_closed(wrong: Outcome) -> None:
    assert error_of(run(cni_env("ADD"), net_conf(), answering(AgentReply(wrong))))["code"] == 101


def test_add_with_garbled_agent_reply_fails_closed() -> None:
    def garbled(socket_path: str, request: AgentRequest, timeout: float) -> AgentReply:
        raise events.AgentProtocolError(socket_path, "reply is not JSON")

    error = error_of(run(cni_env("ADD"), net_conf(), garbled))
    assert error["code"] == 101
    assert "/tmp/nonexistent-lc/ev.sock" in error["msg"]


def test_add_with_no_agent_socket_is_try_again_later_naming_the_socket() -> None:
    with short_socket_dir() as directory:
        path = f"{directory}/missing.sock"
        error = error_of(run(cni_env("ADD"), net_conf(path)))
    assert error["code"] == 11
    assert path in error["msg"]


def test_add_with_refused_connection_is_try_again_later() -> None:
    with dead_socket() as path:
        error = error_of(run(cni_env("ADD"), net_conf(path)))
    assert error["code"] == 11
    assert path in error["msg"]


@pytest.mark.parametrize("behaviour", ["hang", "close"], ids=["agent never answers", "agent hangs up"])
def test_add_with_silent_agent_is_try_again_later_within_the_timeout(
    behaviour: Literal["hang", "close"],
) -> None:
    with running_agent(lambda request: behaviour) as agent:
        started = time.monotonic()
        error = error_of(run(cni_env("ADD"), net_conf(agent.socket_path, agentTimeoutSeconds=0.3)))
        elapsed = time.monotonic() - started
    assert error["code"] == 11
    assert agent.socket_path in error["msg"]
    # Bounded by the configured deadline (generous slack for a loaded CI machine).
    assert elapsed < 5


# ---------------------------------------------------------------------------------------------------------
# DEL
# ---------------------------------------------------------------------------------------------------------


def test_del_tells_the_agent_and_succeeds_with_no_output() -> None:
    with running_agent(lambda request: AgentReply(Outcome.DONE)) as agent:
        output = run(cni_env("DEL"), net_conf(agent.socket_path))
    assert output == PluginOutput(b"", 0)
    assert [r.kind for r in agent.requests] == [RequestKind.DEL]


@pytest.mark.parametrize(
    "transport_name", ["missing socket", "refused", "agent error", "garbled"], ids=lambda name: name
)
def test_del_always_succeeds(transport_name: str) -> None:
    def failing(socket_path: str, request: AgentRequest, timeout: float) -> AgentReply:
        if transport_name == "agent error":
            return AgentReply(Outcome.ERROR, "boom", retry=True)
        if transport_name == "garbled":
            raise events.AgentProtocolError(socket_path, "nonsense")
        return events.call_agent(socket_path, request, timeout)

    with dead_socket() as refused:
        path = refused if transport_name == "refused" else "/tmp/nonexistent-lc/ev.sock"
        output = run(cni_env("DEL"), net_conf(path), failing)
    assert output == PluginOutput(b"", 0)


@pytest.mark.parametrize(
    ("env_overrides", "prev"),
    [
        pytest.param({"CNI_NETNS": None}, _ABSENT, id="without CNI_NETNS"),
        pytest.param({}, None, id="without prevResult"),
        pytest.param({}, {"ips": [{"address": "nonsense"}]}, id="with malformed prevResult"),
    ],
)
def test_del_tolerates_missing_state(env_overrides: dict[str, str | None], prev: Any) -> None:
    seen: list[AgentRequest] = []
    output = run(
        cni_env("DEL", **env_overrides), net_conf(prev=prev), answering(AgentReply(Outcome.DONE), seen)
    )
    assert output == PluginOutput(b"", 0)
    assert len(seen) == 1 and seen[0].pod is not None


def test_del_in_excluded_namespace_does_not_ask_the_agent() -> None:
    env = cni_env("DEL", CNI_ARGS="K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1")
    assert run(env, net_conf(), must_not_call) == PluginOutput(b"", 0)


# ---------------------------------------------------------------------------------------------------------
# CHECK, STATUS, GC
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        pytest.param(AgentReply(Outcome.ENROLLED), None, id="redirection in place"),
        pytest.param(AgentReply(Outcome.NOT_ENROLLED), None, id="pod not enrolled"),
        pytest.param(AgentReply(Outcome.ERROR, "ISTIO_OUTPUT chain missing"), 102, id="redirection missing"),
        pytest.param(AgentReply(Outcome.ERROR, "agent still syncing", retry=True), 11, id="agent not ready"),
        pytest.param(AgentReply(Outcome.DONE), 101, id="wrong answer"),
    ],
)
def test_check_asks_the_agent(reply: AgentReply, code: int | None) -> None:
    with running_agent(lambda request: reply) as agent:
        output = run(cni_env("CHECK"), net_conf(agent.socket_path))
    assert [r.kind for r in agent.requests] == [RequestKind.CHECK]
    if code is None:
        assert output == PluginOutput(b"", 0)
    else:
        error = error_of(output)
        assert error["code"] == code
        assert reply.message in error["msg"]


def test_check_with_agent_unreachable_is_an_error() -> None:
    assert error_of(run(cni_env("CHECK"), net_conf()))["code"] == 11


@pytest.mark.parametrize(
    ("transport", "code"),
    [
        pytest.param(answering(AgentReply(Outcome.DONE)), None, id="ready"),
        pytest.param(
            answering(AgentReply(Outcome.ERROR, "not synced", retry=True)), 50, id="agent not ready"
        ),
        pytest.param(events.call_agent, 50, id="agent unreachable"),
    ],
)
def test_status(transport: Any, code: int | None) -> None:
    output = run({"CNI_COMMAND": "STATUS"}, net_conf(version="1.1.0", prev=None), transport)
    if code is None:
        assert output == PluginOutput(b"", 0)
    else:
        assert error_of(output)["code"] == code


def test_gc_forwards_valid_attachments() -> None:
    valid = [{"containerID": "4f1cbeef01", "ifname": "eth0"}, {"containerID": "77aa", "ifname": "net1"}]
    with running_agent(lambda request: AgentReply(Outcome.DONE)) as agent:
        conf = net_conf(
            agent.socket_path, version="1.1.0", prev=None, dotted={"cni.dev/valid-attachments": valid}
        )
        output = run({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}, conf)
    assert output == PluginOutput(b"", 0)
    assert agent.requests == [
        AgentRequest(
            RequestKind.GC, valid_attachments=(Attachment("4f1cbeef01", "eth0"), Attachment("77aa", "net1"))
        )
    ]


def test_gc_with_malformed_attachments_is_invalid_config() -> None:
    conf = net_conf(version="1.1.0", prev=None, dotted={"cni.dev/valid-attachments": [{"ifname": "eth0"}]})
    error = error_of(run({"CNI_COMMAND": "GC"}, conf, must_not_call))
    assert error["code"] == 7
    assert "valid-attachments[0]" in error["msg"]


# ---------------------------------------------------------------------------------------------------------
# Error cases: code and message naming what was wrong
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "stdin", "code", "named"),
    [
        pytest.param(cni_env("ADD", CNI_COMMAND=None), net_conf(), 4, "CNI_COMMAND", id="no CNI_COMMAND"),
        pytest.param(
            cni_env("ADD", CNI_COMMAND="ATTACH"), net_conf(), 4, "CNI_COMMAND", id="unknown CNI_COMMAND"
        ),
        pytest.param(
            cni_env("ADD", CNI_CONTAINERID=None), net_conf(), 4, "CNI_CONTAINERID", id="ADD no container id"
        ),
        pytest.param(cni_env("ADD", CNI_NETNS=None), net_conf(), 4, "CNI_NETNS", id="ADD no netns"),
        pytest.param(cni_env("ADD", CNI_IFNAME=None), net_conf(), 4, "CNI_IFNAME", id="ADD no ifname"),
        pytest.param(cni_env("CHECK", CNI_NETNS=""), net_conf(), 4, "CNI_NETNS", id="CHECK empty netns"),
        pytest.param(cni_env("DEL", CNI_IFNAME=None), net_conf(), 4, "CNI_IFNAME", id="DEL no ifname"),
        pytest.param(
            cni_env("ADD", CNI_CONTAINERID="-bad id"), net_conf(), 4, "CNI_CONTAINERID", id="bad container id"
        ),
        pytest.param(
            cni_env("ADD", CNI_IFNAME="a-very-long-ifname0"),
            net_conf(),
            4,
            "CNI_IFNAME",
            id="ifname too long",
        ),
        pytest.param(cni_env("ADD", CNI_IFNAME="eth:0"), net_conf(), 4, "CNI_IFNAME", id="ifname with colon"),
        pytest.param(
            cni_env("ADD", CNI_ARGS="K8S_POD_NAMESPACE=bookinfo"),
            net_conf(),
            4,
            "K8S_POD_NAME",
            id="no pod name",
        ),
        pytest.param(
            cni_env("ADD", CNI_ARGS="K8S_POD_NAME=x"), net_conf(), 4, "K8S_POD_NAMESPACE", id="no namespace"
        ),
        pytest.param(
            cni_env("ADD", CNI_ARGS="K8S_POD_NAMESPACE=Bad_NS;K8S_POD_NAME=x"),
            net_conf(),
            4,
            "Bad_NS",
            id="bad namespace",
        ),
        pytest.param(cni_env("ADD", CNI_ARGS="garbage"), net_conf(), 4, "CNI_ARGS", id="unparsable CNI_ARGS"),
        pytest.param(cni_env("ADD"), b"{not json", 6, "JSON", id="stdin not JSON"),
        pytest.param(cni_env("ADD"), b"\xff\xfe", 6, "UTF-8", id="stdin not UTF-8"),
        pytest.param(cni_env("ADD"), b"[1, 2]", 6, "object", id="stdin not an object"),
        pytest.param(
            cni_env("ADD"), b'{"name": "n", "type": "loom-cni"}', 7, "cniVersion", id="no cniVersion"
        ),
        pytest.param(cni_env("ADD"), net_conf(version="one"), 6, "one", id="cniVersion not semver"),
        pytest.param(
            cni_env("ADD"),
            net_conf(version="0.2.0", prev=PREV_RESULT_0_4),
            1,
            "0.2.0",
            id="cniVersion too old",
        ),
        pytest.param(cni_env("ADD"), net_conf(version="2.0.0"), 1, "2.0.0", id="cniVersion too new"),
        pytest.param(cni_env("CHECK"), net_conf(version="0.3.1"), 1, "CHECK", id="CHECK before 0.4.0"),
        pytest.param(
            {"CNI_COMMAND": "STATUS"}, net_conf(version="1.0.0"), 1, "STATUS", id="STATUS before 1.1.0"
        ),
        pytest.param({"CNI_COMMAND": "GC"}, net_conf(version="0.4.0"), 1, "GC", id="GC before 1.1.0"),
        pytest.param(cni_env("ADD"), net_conf(prev=None), 7, "prevResult", id="ADD not chained"),
        pytest.param(cni_env("CHECK"), net_conf(prev=None), 7, "prevResult", id="CHECK without prevResult"),
        pytest.param(cni_env("ADD"), net_conf(name=""), 7, "name", id="empty name"),
        pytest.param(
            cni_env("ADD"), net_conf(agentSocket="run/ev.sock"), 7, "agentSocket", id="relative socket"
        ),
        pytest.param(
            cni_env("ADD"), net_conf(agentSocket="/" + "s" * 120), 7, "agentSocket", id="socket path too long"
        ),
        pytest.param(
            cni_env("ADD"), net_conf(agentTimeoutSeconds=0), 7, "agentTimeoutSeconds", id="zero timeout"
        ),
        pytest.param(
            cni_env("ADD"), net_conf(agentTimeoutSeconds=600), 7, "agentTimeoutSeconds", id="huge timeout"
        ),
        pytest.param(
            cni_env("ADD"), net_conf(agentTimeoutSeconds=True), 7, "agentTimeoutSeconds", id="bool timeout"
        ),
        pytest.param(
            cni_env("ADD"),
            net_conf(excludeNamespaces="kube-system"),
            7,
            "excludeNamespaces",
            id="namespaces not a list",
        ),
        pytest.param(cni_env("ADD"), net_conf(logLevel="loud"), 7, "logLevel", id="bad log level"),
        pytest.param(cni_env("ADD"), net_conf(logFile="loom.log"), 7, "logFile", id="relative log file"),
    ],
)
def test_errors_have_the_spec_code_and_name_the_problem(
    env: dict[str, str], stdin: bytes, code: int, named: str
) -> None:
    error = error_of(run(env, stdin, must_not_call))
    assert error["code"] == code
    assert named in error["msg"] + error.get("details", "")


def test_all_environment_problems_are_reported_at_once() -> None:
    env = cni_env("ADD", CNI_CONTAINERID=None, CNI_NETNS=None, CNI_IFNAME=None)
    message = error_of(run(env, net_conf(), must_not_call))["msg"]
    for name in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"):
        assert name in message


def test_error_is_written_in_the_configured_version() -> None:
    error = error_of(run(cni_env("ADD", CNI_NETNS=None), net_conf(version="0.4.0"), must_not_call))
    assert error["cniVersion"] == "0.4.0"


@pytest.mark.parametrize(
    ("prev", "path"),
    [
        pytest.param("a string", "prevResult", id="not an object"),
        pytest.param({"ips": {"address": "10.0.0.1/24"}}, "prevResult.ips", id="ips not a list"),
        pytest.param({"ips": [{"address": "10.0.0.300/24"}]}, "prevResult.ips[0].address", id="bad address"),
        pytest.param(
            {"ips": [{"address": "10.0.0.3"}]}, "prevResult.ips[0].address", id="address without prefix"
        ),
        pytest.param(
            {"ips": [{"address": "10.0.0.3/24", "version": "6"}]},
            "prevResult.ips[0].version",
            id="family mismatch",
        ),
        pytest.param(
            {"ips": [{"address": "10.0.0.3/24", "gateway": "x"}]},
            "prevResult.ips[0].gateway",
            id="bad gateway",
        ),
        pytest.param(
            {"ips": [{"address": "10.0.0.3/24", "interface": 1}]},
            "prevResult.ips[0].interface",
            id="dangling iface",
        ),
        pytest.param(
            {"interfaces": [{"mac": "aa"}]}, "prevResult.interfaces[0].name", id="interface without name"
        ),
        pytest.param({"routes": [{"gw": "10.0.0.1"}]}, "prevResult.routes[0].dst", id="route without dst"),
        pytest.param({"dns": []}, "prevResult.dns", id="dns not an object"),
    ],
)
def test_malformed_prev_result_is_invalid_config_naming_the_field(prev: Any, path: str) -> None:
    error = error_of(run(cni_env("ADD"), net_conf(prev=prev), must_not_call))
    assert error["code"] == 7
    assert path in error["msg"]


def test_unknown_config_keys_are_ignored() -> None:
    conf = net_conf(
        runtimeConfig={"portMappings": []}, capabilities={"portMappings": True}, args={"labels": {}}
    )
    assert result_of(run(cni_env("ADD"), conf, answering(AgentReply(Outcome.ENROLLED)))) == PREV_RESULT_1_0


@settings(max_examples=200, deadline=None)
@given(
    stdin=st.binary(max_size=300), command=st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"])
)
def test_any_input_yields_a_spec_shaped_answer(stdin: bytes, command: str) -> None:
    output = run(cni_env(command), stdin, answering(AgentReply(Outcome.ENROLLED)))
    if output.exit_code != 0:
        assert error_of(output)["code"] in {int(code) for code in ErrorCode}
    elif output.stdout:
        assert isinstance(json.loads(output.stdout), dict)
