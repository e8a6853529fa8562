"""The `loom-cni` CNI plugin: CNI environment + network configuration in, CNI result or error out.

Theory of operation
-------------------
A container runtime runs `loom-cni` chained after the primary network plugin (the one that creates the
pod's interface and assigns its IP). The CNI specification fixes the contract: the operation and the
attachment come in `CNI_*` environment variables, the network configuration (with the primary plugin's
result as `prevResult`) comes as JSON on stdin, and the answer goes to stdout, a result on success or an
error object ``{cniVersion, code, msg, details}`` with a non-zero exit status on failure. Logs never go to
stdout; the caller (`cni.plugin_main`) sends them to the configured file or stderr.

What loom-cni does per operation:

* ADD: validate everything, then ask the node agent (`cni.events`) about the pod. The agent answers only
  once the pod's in-pod redirection is in place (``enrolled``) or the pod is not to be enrolled
  (``not-enrolled``); in both cases the plugin outputs `prevResult` unchanged and the sandbox starts. An
  unreachable or slow agent (bounded by ``agentTimeoutSeconds``) is CNI error 11 "try again later": the
  kubelet retries the sandbox, and no container of an enrolled pod ever runs uncaptured. Pods in an
  excluded namespace (``kube-system`` by default) pass straight through without asking: the agent, its
  dependencies and the DNS the cluster needs to bootstrap must never wait on the mesh.
* DEL: tell the agent best-effort and always succeed: DEL must tolerate missing state, and a pod must
  remain deletable while the agent is down (the agent cleans up stale pods when it reconciles).
* CHECK: ask the agent whether the redirection is still in place; an unreachable agent is an error.
* VERSION: the spec versions this plugin speaks.
* STATUS (1.1): ready when the agent is reachable and says it is ready; otherwise error 50.
* GC (1.1): forward the runtime's list of valid attachments to the agent.

Everything here is pure except for the injected `AgentTransport` (the real one is `events.call_agent`):
`run(env, stdin, transport)` returns the bytes for stdout and the exit status, so tests can drive the whole
spec surface with a fake agent.

Configuration keys read from the plugin's entry in the network configuration list (all optional)::

    {"type": "loom-cni",
     "agentSocket": "/var/run/loom-cni/pluginevent.sock",
     "agentTimeoutSeconds": 10,
     "excludeNamespaces": ["kube-system"],
     "logFile": "/var/log/loom-cni.log",
     "logLevel": "info"}

Other keys (``runtimeConfig``, ``args``, ``capabilities``, ...) are accepted and ignored, as the spec asks.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cni import events
from cni.events import AgentReply, AgentRequest, Attachment, Outcome, PodAttachment, RequestKind

logger = logging.getLogger(__name__)

# Versions whose result format this plugin understands. 0.1.0/0.2.0 predate prevResult, so a chained
# plugin cannot speak them.
SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION: Final = "1.1.0"

DEFAULT_AGENT_SOCKET: Final = "/var/run/loom-cni/pluginevent.sock"
# The agent must install rules and get ztunnel's ACK; 10 s is generous for that and well inside the
# kubelet's sandbox-creation deadline, so the retry after a timeout still happens promptly.
DEFAULT_AGENT_TIMEOUT: Final = 10.0
# More than a minute would stall the runtime's sandbox creation (CRI calls time out after 2-4 minutes).
MAX_AGENT_TIMEOUT: Final = 60.0
# The control plane of the cluster itself must come up without the mesh.
DEFAULT_EXCLUDED_NAMESPACES: Final = ("kube-system",)
LOG_LEVELS: Final = ("debug", "info", "warning", "error")

# Spec §"Parameters": container IDs start with an alphanumeric character, then alphanumerics, _ . -
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\Z")
# Kubernetes names: namespaces are DNS-1123 labels, pod names DNS-1123 subdomains.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
# Linux IFNAMSIZ is 16 including the NUL.
_MAX_IFNAME = 15


class ErrorCode(enum.IntEnum):
    """CNI error codes: 0-99 are the spec's well-known codes, 100+ are loom-cni's own."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODING_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11
    PLUGIN_NOT_AVAILABLE = 50
    AGENT_REFUSED = 100
    """The agent answered ERROR without retry: trying again cannot help (its message says why)."""
    AGENT_PROTOCOL = 101
    """The agent's reply was malformed or did not fit the request."""
    REDIRECTION_MISSING = 102
    """CHECK: the pod should be enrolled but its redirection is not in place."""
    INTERNAL = 103
    """A bug in loom-cni; the details carry the exception."""


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object."""

    def __init__(self, code: ErrorCode, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        obj: dict[str, Any] = {"cniVersion": cni_version, "code": int(self.code), "msg": self.msg}
        if self.details:
            obj["details"] = self.details
        return obj


class Command(enum.StrEnum):
    ADD = "ADD"
    DEL = "DEL"
    CHECK = "CHECK"
    VERSION = "VERSION"
    STATUS = "STATUS"
    GC = "GC"


# Which operation first appeared in which spec version (CHECK in 0.4.0, STATUS and GC in 1.1.0).
_INTRODUCED_IN: Final[Mapping[Command, tuple[int, int, int]]] = {
    Command.CHECK: (0, 4, 0),
    Command.STATUS: (1, 1, 0),
    Command.GC: (1, 1, 0),
}
# Environment variables each operation needs (spec §2 "Parameters"). CNI_PATH is not required because
# loom-cni delegates to no other plugin.
_REQUIRED_ENV: Final[Mapping[Command, tuple[str, ...]]] = {
    Command.ADD: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    Command.CHECK: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    Command.DEL: ("CNI_CONTAINERID", "CNI_IFNAME"),
    Command.VERSION: (),
    Command.STATUS: (),
    Command.GC: (),
}
_POD_COMMANDS: Final = frozenset({Command.ADD, Command.DEL, Command.CHECK})


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """The parts of the network configuration loom-cni uses."""

    cni_version: str
    """The spec version the runtime speaks for this call; results and errors are written in it."""
    name: str
    """Network name (the configuration list's name)."""
    type: str
    """The plugin type the runtime resolved to this binary."""
    agent_socket: str = DEFAULT_AGENT_SOCKET
    """Unix socket of the node agent (``agentSocket``)."""
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT
    """Overall bound on one exchange with the agent, in seconds (``agentTimeoutSeconds``)."""
    excluded_namespaces: frozenset[str] = frozenset(DEFAULT_EXCLUDED_NAMESPACES)
    """Pods in these namespaces pass through without asking the agent (``excludeNamespaces``)."""
    log_file: str | None = None
    """Where to append logs (``logFile``); stderr when unset."""
    log_level: str = "info"
    """``logLevel``: one of debug, info, warning, error."""
    prev_result: Mapping[str, Any] | None = field(default=None, compare=False)
    """The previous plugin's result (validated), or None when the runtime sent none."""
    valid_attachments: tuple[Attachment, ...] = ()
    """GC only: ``cni.dev/valid-attachments``."""


@dataclass(frozen=True, slots=True)
class RuntimeEnv:
    """The CNI_* environment of one invocation, validated for its command."""

    command: Command
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    cni_args: Mapping[str, str] = field(default_factory=dict)
    """CNI_ARGS as key -> value (``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``, ``K8S_POD_UID``, ...)."""
    cni_path: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Invocation:
    """One fully validated plugin call."""

    env: RuntimeEnv
    config: PluginConfig
    pod: PodAttachment | None
    """Set for ADD, DEL and CHECK: what the agent is told about the attachment."""

    @property
    def command(self) -> Command:
        return self.env.command


@dataclass(frozen=True, slots=True)
class PluginOutput:
    """What the process writes to stdout and the status it exits with."""

    stdout: bytes
    exit_code: int

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


AgentTransport = Callable[[str, AgentRequest, float], AgentReply]
"""(socket path, request, timeout seconds) -> reply; raises events.AgentUnavailable/AgentProtocolError."""


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if match is None:
        raise ValueError(version)
    return int(match[1]), int(match[2]), int(match[3])


def _decode_json(stdin: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(stdin.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CniError(
            ErrorCode.DECODING_FAILURE, "network configuration on stdin is not UTF-8", str(exc)
        ) from None
    except ValueError as exc:
        raise CniError(
            ErrorCode.DECODING_FAILURE, "network configuration on stdin is not valid JSON", str(exc)
        ) from None
    if not isinstance(obj, dict):
        raise CniError(
            ErrorCode.DECODING_FAILURE,
            "network configuration on stdin is not a JSON object",
            f"got a JSON {type(obj).__name__}",
        )
    return obj


def _parse_cni_version(raw: Mapping[str, Any], command: Command) -> str:
    if "cniVersion" not in raw:
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "network configuration has no cniVersion")
    version = raw["cniVersion"]
    if not isinstance(version, str):
        raise CniError(ErrorCode.DECODING_FAILURE, f"cniVersion must be a string, got {version!r}")
    try:
        parsed = _version_tuple(version)
    except ValueError:
        raise CniError(
            ErrorCode.DECODING_FAILURE, f"cniVersion {version!r} is not a semantic version"
        ) from None
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported by loom-cni",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    introduced = _INTRODUCED_IN.get(command)
    if introduced is not None and parsed < introduced:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"{command.value} is not defined in cniVersion {version}",
            f"{command.value} needs cniVersion {'.'.join(map(str, introduced))} or later",
        )
    return version


def _parse_cni_args(raw: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(
                ErrorCode.INVALID_ENVIRONMENT,
                "CNI_ARGS is not a list of KEY=VALUE pairs separated by ';'",
                f"offending entry: {pair!r}",
            )
        args[key] = value
    return args


def parse_env(env: Mapping[str, str]) -> RuntimeEnv:
    """Validate the CNI_* variables for the requested command; every problem is named at once (code 4)."""
    raw_command = env.get("CNI_COMMAND", "")
    try:
        command = Command(raw_command)
    except ValueError:
        known = ", ".join(c.value for c in Command)
        detail = "CNI_COMMAND is not set" if not raw_command else f"CNI_COMMAND={raw_command!r}"
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, f"{detail}: expected one of {known}") from None
    problems = [f"{name} is not set" for name in _REQUIRED_ENV[command] if not env.get(name)]
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.match(container_id):
        problems.append(
            f"CNI_CONTAINERID={container_id!r} must start with a letter or digit and contain only "
            "letters, digits, '_', '.' and '-'"
        )
    ifname = env.get("CNI_IFNAME", "")
    # The kernel's rule (dev_valid_name): at most 15 bytes, no '/', ':' or whitespace, not "." or "..".
    if ifname and (
        len(ifname.encode()) > _MAX_IFNAME
        or ifname in (".", "..")
        or any(c in "/:" or c.isspace() for c in ifname)
    ):
        problems.append(f"CNI_IFNAME={ifname!r} is not a valid Linux interface name")
    if problems:
        raise CniError(ErrorCode.INVALID_ENVIRONMENT, "invalid CNI environment: " + "; ".join(problems))
    cni_path = tuple(p for p in env.get("CNI_PATH", "").split(os.pathsep) if p)
    return RuntimeEnv(
        command=command,
        container_id=container_id,
        netns=env.get("CNI_NETNS", ""),
        ifname=ifname,
        cni_args=_parse_cni_args(env.get("CNI_ARGS", "")),
        cni_path=cni_path,
    )


def _parse_plugin_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The loom-cni specific keys, all problems collected into one code-7 error."""
    problems: list[str] = []
    fields: dict[str, Any] = {}

    socket_path = raw.get("agentSocket", DEFAULT_AGENT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        problems.append(f"agentSocket must be an absolute path, got {socket_path!r}")
    elif len(os.fsencode(socket_path)) > events.MAX_SOCKET_PATH_BYTES:
        problems.append(f"agentSocket {socket_path!r} is longer than {events.MAX_SOCKET_PATH_BYTES} bytes")
    else:
        fields["agent_socket"] = socket_path

    timeout = raw.get("agentTimeoutSeconds", DEFAULT_AGENT_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_AGENT_TIMEOUT
    ):
        problems.append(
            f"agentTimeoutSeconds must be a number in (0, {MAX_AGENT_TIMEOUT:g}], got {timeout!r}"
        )
    else:
        fields["agent_timeout"] = float(timeout)

    excluded = raw.get("excludeNamespaces", list(DEFAULT_EXCLUDED_NAMESPACES))
    if not isinstance(excluded, list) or not all(isinstance(ns, str) and ns for ns in excluded):
        problems.append(f"excludeNamespaces must be a list of namespace names, got {excluded!r}")
    else:
        fields["excluded_namespaces"] = frozenset(excluded)

    log_file = raw.get("logFile")
    if log_file is not None and (not isinstance(log_file, str) or not log_file.startswith("/")):
        problems.append(f"logFile must be an absolute path, got {log_file!r}")
    else:
        fields["log_file"] = log_file or None

    log_level = raw.get("logLevel", "info")
    if not isinstance(log_level, str) or log_level.lower() not in LOG_LEVELS:
        problems.append(f"logLevel must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    else:
        fields["log_level"] = log_level.lower()

    for key in ("name", "type"):
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{key} must be a non-empty string, got {value!r}")
    if problems:
        raise CniError(
            ErrorCode.INVALID_NETWORK_CONFIG, "invalid loom-cni configuration: " + "; ".join(problems)
        )
    return fields


def _bad_prev(path: str, problem: str) -> CniError:
    return CniError(ErrorCode.INVALID_NETWORK_CONFIG, f"prevResult is malformed: {path} {problem}")


def validate_prev_result(prev: object) -> Mapping[str, Any]:
    """Check that `prev` is a well-formed CNI result (0.3.0 .. 1.1.0 shape); return it unchanged."""
    if not isinstance(prev, dict):
        raise _bad_prev("prevResult", f"must be an object, got {type(prev).__name__}")
    version = prev.get("cniVersion")
    if version is not None and not isinstance(version, str):
        raise _bad_prev("prevResult.cniVersion", f"must be a string, got {version!r}")
    interfaces = prev.get("interfaces", [])
    if not isinstance(interfaces, list):
        raise _bad_prev("prevResult.interfaces", "must be a list")
    for index, iface in enumerate(interfaces):
        where = f"prevResult.interfaces[{index}]"
        if not isinstance(iface, dict):
            raise _bad_prev(where, "must be an object")
        if not isinstance(iface.get("name"), str):
            raise _bad_prev(f"{where}.name", "must be a string")
        sandbox = iface.get("sandbox")
        if sandbox is not None and not isinstance(sandbox, str):
            raise _bad_prev(f"{where}.sandbox", "must be a string")
    ips = prev.get("ips", [])
    if not isinstance(ips, list):
        raise _bad_prev("prevResult.ips", "must be a list")
    for index, entry in enumerate(ips):
        where = f"prevResult.ips[{index}]"
        if not isinstance(entry, dict):
            raise _bad_prev(where, "must be an object")
        address = entry.get("address")
        if not isinstance(address, str) or "/" not in address:
            raise _bad_prev(f"{where}.address", f"must be an address with prefix length, got {address!r}")
        try:
            interface_address = ipaddress.ip_interface(address)
        except ValueError:
            raise _bad_prev(
                f"{where}.address", f"{address!r} is not an IP address with prefix length"
            ) from None
        family = entry.get("version")
        if family is not None and family != str(interface_address.version):
            raise _bad_prev(f"{where}.version", f"{family!r} does not match address {address}")
        gateway = entry.get("gateway")
        if gateway is not None:
            try:
                ipaddress.ip_address(gateway)
            except ValueError:
                raise _bad_prev(f"{where}.gateway", f"{gateway!r} is not an IP address") from None
        if "interface" in entry:
            ref = entry["interface"]
            if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(interfaces):
                raise _bad_prev(f"{where}.interface", f"{ref!r} is not an index into prevResult.interfaces")
    routes = prev.get("routes", [])
    if not isinstance(routes, list):
        raise _bad_prev("prevResult.routes", "must be a list")
    for index, route in enumerate(routes):
        where = f"prevResult.routes[{index}]"
        if not isinstance(route, dict):
            raise _bad_prev(where, "must be an object")
        try:
            ipaddress.ip_network(route.get("dst"), strict=False)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _bad_prev(f"{where}.dst", f"{route.get('dst')!r} is not a network") from None
    dns = prev.get("dns")
    if dns is not None and not isinstance(dns, dict):
        raise _bad_prev("prevResult.dns", "must be an object")
    return prev


def pod_ips(prev: Mapping[str, Any]) -> tuple[events.IPAddress, ...]:
    """The pod's addresses from a validated result.

    Addresses on host-side interfaces (a referenced interface without a ``sandbox``, e.g. the bridge
    plugin's bridge and host veth) are not the pod's and are left out; addresses without an interface
    reference are kept.
    """
    interfaces: Sequence[Mapping[str, Any]] = prev.get("interfaces", [])
    found: list[events.IPAddress] = []
    for entry in prev.get("ips", []):
        ref = entry.get("interface")
        if ref is not None and not interfaces[ref].get("sandbox"):
            continue
        address = ipaddress.ip_interface(entry["address"]).ip
        if address not in found:
            found.append(address)
    return tuple(found)


def _parse_valid_attachments(raw: Mapping[str, Any]) -> tuple[Attachment, ...]:
    items = raw.get("cni.dev/valid-attachments", [])
    if not isinstance(items, list):
        raise CniError(ErrorCode.INVALID_NETWORK_CONFIG, "cni.dev/valid-attachments must be a list")
    found: list[Attachment] = []
    for index, item in enumerate(items):
        container_id = item.get("containerID") if isinstance(item, dict) else None
        ifname = item.get("ifname", "") if isinstance(item, dict) else None
        if not isinstance(container_id, str) or not container_id or not isinstance(ifname, str):
            raise CniError(
                ErrorCode.INVALID_NETWORK_CONFIG,
                f"cni.dev/valid-attachments[{index}] must be an object with string containerID and ifname",
                f"got {item!r}",
            )
        found.append(Attachment(container_id=container_id, ifname=ifname))
    return tuple(found)


def _pod_identity(env: RuntimeEnv) -> tuple[str, str, str]:
    namespace = env.cni_args.get("K8S_POD_NAMESPACE", "")
    name = env.cni_args.get("K8S_POD_NAME", "")
    problems: list[str] = []
    if not namespace:
        problems.append("K8S_POD_NAMESPACE is missing")
    elif not _DNS_LABEL.match(namespace):
        problems.append(f"K8S_POD_NAMESPACE={namespace!r} is not a valid namespace name")
    if not name:
        problems.append("K8S_POD_NAME is missing")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        problems.append(f"K8S_POD_NAME={name!r} is not a valid pod name")
    if problems:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            "invalid CNI_ARGS: " + "; ".join(problems),
            "loom-cni needs the Kubernetes pod identity to ask the node agent whether the pod is enrolled",
        )
    return namespace, name, env.cni_args.get("K8S_POD_UID", "")


def parse_invocation(env: Mapping[str, str], stdin: bytes) -> Invocation:
    """Validate one call completely. Raises `CniError` with the spec's code for the first failing stage."""
    runtime_env = parse_env(env)
    command = runtime_env.command
    if command is Command.VERSION:
        raise ValueError("VERSION is answered by version_output(), it has no invocation to parse")
    raw = _decode_json(stdin)
    cni_version = _parse_cni_version(raw, command)
    fields = _parse_plugin_fields(raw)

    prev: Mapping[str, Any] | None = None
    if "prevResult" in raw:
        try:
            prev = validate_prev_result(raw["prevResult"])
        except CniError as exc:
            if command is not Command.DEL:
                raise
            # DEL must succeed with whatever state is left; the addresses are only informational there.
            logger.warning("ignoring malformed prevResult on DEL: %s", exc)
    elif command in (Command.ADD, Command.CHECK):
        raise CniError(
            ErrorCode.INVALID_NETWORK_CONFIG,
            f"{command.value} without prevResult: loom-cni must be chained after the primary network plugin",
            "list loom-cni after the plugin that creates the pod interface in the network configuration list",
        )

    config = PluginConfig(
        cni_version=cni_version,
        name=raw["name"],
        type=raw["type"],
        prev_result=prev,
        valid_attachments=_parse_valid_attachments(raw) if command is Command.GC else (),
        **fields,
    )
    pod: PodAttachment | None = None
    if command in _POD_COMMANDS:
        namespace, name, uid = _pod_identity(runtime_env)
        pod = PodAttachment(
            namespace=namespace,
            name=name,
            uid=uid,
            container_id=runtime_env.container_id,
            netns=runtime_env.netns,
            ifname=runtime_env.ifname,
            ips=pod_ips(prev) if prev is not None else (),
        )
    return Invocation(env=runtime_env, config=config, pod=pod)


# ---------------------------------------------------------------------------------------------------------
# Decisions and output
# ---------------------------------------------------------------------------------------------------------


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, indent=2).encode() + b"\n"


def error_output(error: CniError, cni_version: str) -> PluginOutput:
    return PluginOutput(_dump(error.to_json(cni_version)), 1)


def sniff_version(stdin: bytes) -> str:
    """The version to write an error in: the configuration's, if it is one we speak, else the latest."""
    try:
        version = json.loads(stdin.decode("utf-8")).get("cniVersion")
    except (ValueError, AttributeError):
        return LATEST_VERSION
    return version if version in SUPPORTED_VERSIONS else LATEST_VERSION


def version_output(stdin: bytes) -> PluginOutput:
    """VERSION: echo the requested version if we speak it, and list what we speak.

    A runtime asks VERSION precisely to find out what the plugin supports, so an unsupported or absent
    version in the input is answered (in the latest version) rather than rejected; only undecodable
    input is an error.
    """
    version = LATEST_VERSION
    if stdin.strip():
        raw = _decode_json(stdin)
        requested = raw.get("cniVersion")
        if requested in SUPPORTED_VERSIONS:
            version = requested
    return PluginOutput(_dump({"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}), 0)


def result_for_output(prev: Mapping[str, Any], cni_version: str) -> dict[str, Any]:
    """prevResult as this plugin's result: unchanged, except written in the configuration's version.

    Runtimes normally hand over prevResult in the configuration's version already; when it is absent or
    differs, the result is converted (0.3.x/0.4.0 carry ``ips[].version``, 1.x does not), because the
    spec requires the output's cniVersion to match the configuration's.
    """
    result = dict(prev)
    prev_version = result.get("cniVersion")
    result["cniVersion"] = cni_version
    if prev_version == cni_version or "ips" not in result:
        return result
    legacy = cni_version.startswith("0.")
    converted: list[Any] = []
    for entry in result["ips"]:
        entry = dict(entry)
        if legacy:
            entry.setdefault("version", str(ipaddress.ip_interface(entry["address"]).version))
        else:
            entry.pop("version", None)
        converted.append(entry)
    result["ips"] = converted
    return result


def _success(invocation: Invocation) -> PluginOutput:
    """Success for the command: ADD prints the (passed-through) result, every other command prints nothing."""
    if invocation.command is Command.ADD:
        prev = invocation.config.prev_result
        assert prev is not None, "parse_invocation guarantees prevResult for ADD"
        return PluginOutput(_dump(result_for_output(prev, invocation.config.cni_version)), 0)
    return PluginOutput(b"", 0)


def agent_request(invocation: Invocation) -> AgentRequest | None:
    """What to ask the agent, or None when the answer is known without asking (excluded namespace)."""
    command = invocation.command
    if command in _POD_COMMANDS:
        pod = invocation.pod
        assert pod is not None, "parse_invocation sets the pod for ADD, DEL and CHECK"
        if pod.namespace in invocation.config.excluded_namespaces:
            return None
        kind = {Command.ADD: RequestKind.ADD, Command.DEL: RequestKind.DEL, Command.CHECK: RequestKind.CHECK}
        return AgentRequest(kind=kind[command], pod=pod)
    if command is Command.STATUS:
        return AgentRequest(kind=RequestKind.STATUS)
    if command is Command.GC:
        return AgentRequest(kind=RequestKind.GC, valid_attachments=invocation.config.valid_attachments)
    raise ValueError(f"{command.value} does not involve the node agent")


def _describe(invocation: Invocation) -> str:
    pod = invocation.pod
    return f"pod {pod.namespace}/{pod.name}" if pod is not None else "the node"


def on_agent_reply(invocation: Invocation, reply: AgentReply) -> PluginOutput:
    """Turn the agent's answer into the plugin's output."""
    command = invocation.command
    version = invocation.config.cni_version
    subject = _describe(invocation)
    if command is Command.DEL:
        if reply.outcome is Outcome.ERROR:
            logger.warning(
                "node agent could not clean up %s (ignored, DEL always succeeds): %s", subject, reply.message
            )
        return _success(invocation)
    if reply.outcome is Outcome.ERROR:
        if command is Command.STATUS:
            code = ErrorCode.PLUGIN_NOT_AVAILABLE
        elif reply.retry:
            code = ErrorCode.TRY_AGAIN_LATER
        elif command is Command.CHECK:
            code = ErrorCode.REDIRECTION_MISSING
        else:
            code = ErrorCode.AGENT_REFUSED
        message = reply.message or "no reason given"
        return error_output(
            CniError(code, f"node agent: {command.value} failed for {subject}: {message}"), version
        )
    expected = {
        Command.ADD: (Outcome.ENROLLED, Outcome.NOT_ENROLLED),
        Command.CHECK: (Outcome.ENROLLED, Outcome.NOT_ENROLLED),
        Command.STATUS: (Outcome.DONE,),
        Command.GC: (Outcome.DONE,),
    }[command]
    if reply.outcome not in expected:
        # Fail closed: an answer that does not say "redirection in place" or "not enrolled" is neither.
        return error_output(
            CniError(
                ErrorCode.AGENT_PROTOCOL,
                f"node agent answered {reply.outcome.value!r} to {command.value} for {subject}",
                f"expected one of {', '.join(o.value for o in expected)}",
            ),
            version,
        )
    logger.info("%s %s: agent says %s", command.value, subject, reply.outcome.value)
    return _success(invocation)


def on_agent_failure(invocation: Invocation, failure: Exception) -> PluginOutput:
    """The agent could not be asked (unreachable, timed out, or garbled reply)."""
    command = invocation.command
    version = invocation.config.cni_version
    subject = _describe(invocation)
    if command is Command.DEL:
        logger.warning("could not tell the node agent about DEL of %s (ignored): %s", subject, failure)
        return _success(invocation)
    if isinstance(failure, events.AgentProtocolError):
        code = ErrorCode.PLUGIN_NOT_AVAILABLE if command is Command.STATUS else ErrorCode.AGENT_PROTOCOL
    else:
        code = ErrorCode.PLUGIN_NOT_AVAILABLE if command is Command.STATUS else ErrorCode.TRY_AGAIN_LATER
    return error_output(CniError(code, f"{command.value} for {subject}: {failure}"), version)


def run(env: Mapping[str, str], stdin: bytes, transport: AgentTransport = events.call_agent) -> PluginOutput:
    """One complete plugin call: never raises, always returns the spec's output."""
    try:
        if parse_env(env).command is Command.VERSION:
            return version_output(stdin)
        invocation = parse_invocation(env, stdin)
    except CniError as exc:
        logger.warning("rejecting %s: %s", env.get("CNI_COMMAND", "call"), exc)
        return error_output(exc, sniff_version(stdin))
    request = agent_request(invocation)
    if request is None:
        logger.info(
            "%s %s: namespace excluded, passing through", invocation.command.value, _describe(invocation)
        )
        return _success(invocation)
    config = invocation.config
    try:
        reply = transport(config.agent_socket, request, config.agent_timeout)
    except (events.AgentUnavailable, events.AgentProtocolError) as exc:
        logger.warning("%s %s: %s", invocation.command.value, _describe(invocation), exc)
        return on_agent_failure(invocation, exc)
    return on_agent_reply(invocation, reply)
