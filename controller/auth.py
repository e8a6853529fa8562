"""Who is calling: authentication of node proxies on the xDS and CA port.

Theory of operation
-------------------
Every xDS stream and every CSR carries `authorization: Bearer <credential>` in its call metadata. A
`NodeAuthenticator` turns that into a `NodeIdentity`: the node the caller serves. Everything the caller
may see or obtain (its xDS stream, the identities it may get certificates for) is derived from that node
name, never from what the caller claims in a request body.

Two implementations:

* `LabNodeAuthenticator` (directory mode, the local lab): the controller issues each node a credential
  `loom-node.v1.<node>.<mac>`, where mac = HMAC-SHA256(key, node), base64url. The key (32 random bytes)
  lives in the state directory with mode 0600. Credentials do not expire; rotating the key file revokes
  them all. Comparison is constant-time.
* `KubernetesNodeAuthenticator`: the credential is a projected service-account token (audience
  `istio-ca`, what ztunnel sends). A TokenReview says whose it is; the account must be one of the
  trusted node-proxy accounts (default istio-system/ztunnel), and the pod the token is bound to must
  exist in the controller's current snapshot with the same UID and service account. The node is that
  pod's `spec.nodeName`. Successful reviews are cached briefly by token hash (a reconnect storm of
  every node proxy must not become a TokenReview storm), but the pod checks run against the current
  snapshot on every call, so a deleted or replaced pod loses access at once.

Failures raise `AuthenticationError` with a short, bounded `reason` (used as a metric label and in the
log) and a longer `detail` for the log. Callers answer every failure with one opaque error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loom.resources.model import ConfigSnapshot, Pod

logger = logging.getLogger("controller.auth")

Metadata = Iterable[tuple[str, str | bytes]]

LAB_TOKEN_PREFIX = "loom-node.v1."
LAB_KEY_FILE = "node-credential.key"
LAB_KEY_BYTES = 32  # HMAC-SHA256 key: the hash's block-size-independent recommended minimum
# What ztunnel's projected token is minted for (Istio's CA audience).
DEFAULT_AUDIENCES: tuple[str, ...] = ("istio-ca",)
# A reconnect storm of every node proxy then costs one TokenReview per node per minute at most; a
# revoked token (deleted service account) keeps working for at most this long on new streams.
DEFAULT_REVIEW_CACHE_SECONDS = 60.0
# Bound on cached reviews: a few per node proxy; beyond that the oldest are forgotten.
MAX_CACHED_REVIEWS = 4096
# Bearer credentials larger than this are not tokens we issue or Kubernetes mints (JWTs are ~1 KiB).
MAX_CREDENTIAL_BYTES = 8192

_POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
_POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
_NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
_SA_PREFIX = "system:serviceaccount:"
_TERMINATED_PHASES = frozenset({"Failed", "Succeeded"})
# Kubernetes node names are DNS-1123 subdomains.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class AuthenticationError(Exception):
    """The caller could not be authenticated. `reason` is a short bounded token; `detail` explains."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """An authenticated node proxy."""

    node_name: str  # the node it serves: the only thing authorization looks at
    subject: str  # who presented the credential, for logs: "node/<name>" or the service account user
    pod: str = ""  # "<namespace>/<name>" of the calling pod (Kubernetes), for logs
    # Set when the caller is a waypoint proxy, not a node proxy (controller/waypoints/auth.py):
    # "<namespace>/<name>" of its Gateway, and the service account it runs as, the only identity it
    # may get a certificate for. A waypoint serves no node: authorization then looks at these only.
    waypoint: str = ""
    waypoint_service_account: str = ""


class NodeAuthenticator(Protocol):
    async def authenticate(self, metadata: Metadata) -> NodeIdentity:
        """The calling node proxy, or raise AuthenticationError."""
        ...


def valid_node_name(name: str) -> bool:
    return len(name) <= 253 and bool(_NODE_NAME.fullmatch(name))  # fullmatch: "$" allows a trailing \n


def bearer_token(metadata: Metadata) -> str:
    """The bearer credential of a call; exactly one `authorization` entry is accepted."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        raise AuthenticationError("missing-credential", "no authorization metadata")
    if len(values) > 1:
        raise AuthenticationError("malformed-credential", f"{len(values)} authorization entries")
    value = values[0]
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("malformed-credential", "authorization is not 'Bearer <token>'")
    if len(token) > MAX_CREDENTIAL_BYTES:
        raise AuthenticationError("malformed-credential", f"credential of {len(token)} bytes is too large")
    return token


# ---------------------------------------------------------------------------------------------------
# lab: per-node credentials issued by the controller


def _load_or_create_key(path: Path) -> bytes:
    """The HMAC key at `path`, created (0600, atomically, never overwriting) if absent."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(LAB_KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                # link() fails if another process created the key meanwhile; then theirs wins.
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        key = path.read_bytes()
    if len(key) != LAB_KEY_BYTES:
        raise ValueError(
            f"{path}: node credential key must be {LAB_KEY_BYTES} bytes, found {len(key)}; "
            "remove it to generate a new one (every node credential must then be re-issued)"
        )
    return key


class LabNodeAuthenticator:
    """Per-node credentials: `loom-node.v1.<node>.<base64url HMAC-SHA256(key, node)>`."""

    def __init__(self, key: bytes) -> None:
        if len(key) < LAB_KEY_BYTES:
            raise ValueError(f"node credential key must be at least {LAB_KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def load_or_create(cls, state_dir: Path) -> LabNodeAuthenticator:
        return cls(_load_or_create_key(state_dir / LAB_KEY_FILE))

    def _mac(self, node: str) -> str:
        return self.keyed_mac("loom-node.v1", node)

    def keyed_mac(self, purpose: str, subject: str) -> str:
        """base64url HMAC-SHA256 of `subject` under this key, separated by `purpose` so that a
        credential minted for one kind of subject never verifies as another (waypoint credentials)."""
        message = purpose.encode("ascii") + b"\x00" + subject.encode("ascii")
        digest = hmac.new(self._key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def issue_node_token(self, node: str) -> str:
        if not valid_node_name(node):
            raise ValueError(
                f"{node!r} is not a valid node name (lowercase DNS subdomain, at most 253 chars)"
            )
        return f"{LAB_TOKEN_PREFIX}{node}.{self._mac(node)}"

    def verify(self, token: str) -> str:
        """The node a credential was issued to, or raise AuthenticationError."""
        if not token.startswith(LAB_TOKEN_PREFIX):
            raise AuthenticationError("malformed-credential", "not a loom node credential")
        node, _, mac = token[len(LAB_TOKEN_PREFIX) :].rpartition(".")
        if not node or not mac or not valid_node_name(node):
            raise AuthenticationError("malformed-credential", "loom node credential without node or mac")
        if not hmac.compare_digest(mac.encode("ascii", "replace"), self._mac(node).encode("ascii")):
            raise AuthenticationError("bad-credential", f"credential for node {node!r} does not verify")
        return node

    async def authenticate(self, metadata: Metadata) -> NodeIdentity:
        node = self.verify(bearer_token(metadata))
        return NodeIdentity(node_name=node, subject=f"node/{node}")


# ---------------------------------------------------------------------------------------------------
# Kubernetes: projected service-account tokens checked with TokenReview


class TokenReviewer(Protocol):
    async def token_review(self, token: str, audiences: list[str]) -> Mapping[str, Any]:
        """The TokenReview status for `token` (`authenticated`, `user`, `audiences`, `error`)."""
        ...


@dataclass(frozen=True, slots=True)
class _Review:
    """What a successful TokenReview established."""

    namespace: str
    service_account: str
    username: str
    pod_name: str
    pod_uid: str
    node_name: str  # from the token's node binding, when the API server provides it


def _first_extra(user: Mapping[str, Any], key: str) -> str:
    extra = user.get("extra")
    values = extra.get(key) if isinstance(extra, Mapping) else None
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return ""


def parse_trusted_account(text: str) -> tuple[str, str]:
    """'<namespace>/<service account>' -> (namespace, service account)."""
    namespace, _, account = text.partition("/")
    if not namespace or not account or "/" in account:
        raise ValueError(f"{text!r}: expected <namespace>/<service account>")
    return namespace, account


class KubernetesNodeAuthenticator:
    """Node proxies identified by their service-account token (TokenReview) and their pod."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        snapshot: Callable[[], ConfigSnapshot],
        trusted_accounts: Collection[tuple[str, str]],
        *,
        audiences: Collection[str] = DEFAULT_AUDIENCES,
        cache_seconds: float = DEFAULT_REVIEW_CACHE_SECONDS,
        max_cached: int = MAX_CACHED_REVIEWS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reviewer = reviewer
        self._snapshot = snapshot
        self._trusted = frozenset(trusted_accounts)
        self._audiences = list(audiences)
        self._cache_seconds = cache_seconds
        self._max_cached = max_cached
        self._clock = clock
        self._cache: OrderedDict[bytes, tuple[float, _Review]] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Task[_Review]] = {}
        self.reviews_requested = 0  # TokenReviews actually sent (for tests and debugging)

    async def authenticate(self, metadata: Metadata) -> NodeIdentity:
        token = bearer_token(metadata)
        review = await self._review(token)
        if (review.namespace, review.service_account) not in self._trusted:
            raise AuthenticationError(
                "untrusted-account", f"{review.username} is not a trusted node proxy account"
            )
        if not review.pod_name or not review.pod_uid:
            raise AuthenticationError("unbound-token", f"token of {review.username} is not bound to a pod")
        pod = self._snapshot().get_obj(Pod, review.namespace, review.pod_name)
        where = f"{review.namespace}/{review.pod_name}"
        if pod is None:
            raise AuthenticationError("caller-pod-not-found", f"pod {where} does not exist")
        if pod.meta.uid != review.pod_uid:
            raise AuthenticationError(
                "caller-pod-uid-mismatch",
                f"pod {where} has uid {pod.meta.uid!r}, token is for {review.pod_uid!r}",
            )
        if pod.spec.service_account != review.service_account:
            raise AuthenticationError(
                "caller-pod-account-mismatch", f"pod {where} runs as {pod.spec.service_account!r}"
            )
        if pod.phase in _TERMINATED_PHASES or not pod.spec.node_name:
            raise AuthenticationError(
                "caller-pod-not-running", f"pod {where} is {pod.phase} on {pod.spec.node_name!r}"
            )
        if review.node_name and review.node_name != pod.spec.node_name:
            raise AuthenticationError(
                "caller-node-mismatch",
                f"token is bound to node {review.node_name!r}, pod {where} is on {pod.spec.node_name!r}",
            )
        return NodeIdentity(node_name=pod.spec.node_name, subject=review.username, pod=where)

    async def _review(self, token: str) -> _Review:
        key = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[key]
        task = self._in_flight.get(key)
        if task is None:
            # One TokenReview per token at a time: concurrent reconnects with the same token share it.
            # It runs as its own task so that a caller giving up does not cancel it for the others.
            task = asyncio.create_task(self._ask(token), name="token-review")
            self._in_flight[key] = task
            task.add_done_callback(lambda t: self._reviewed(key, t))
        return await asyncio.shield(task)

    def _reviewed(self, key: bytes, task: asyncio.Task[_Review]) -> None:
        self._in_flight.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return  # failures are not cached: the next call asks again
        self._cache[key] = (self._clock() + self._cache_seconds, task.result())
        while len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)

    async def _ask(self, token: str) -> _Review:
        self.reviews_requested += 1
        try:
            status = await self._reviewer.token_review(token, list(self._audiences))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure to get an answer fails closed
            raise AuthenticationError("token-review-failed", f"TokenReview failed: {e}") from e
        if status.get("authenticated") is not True:
            raise AuthenticationError(
                "not-authenticated", f"TokenReview: {status.get('error') or 'rejected'}"
            )
        # The API server must confirm one of our audiences: an empty or missing list means the token is
        # valid for the API server's own audience (or the authenticator ignores audiences), not ours.
        audiences = status.get("audiences")
        if not isinstance(audiences, list) or not set(audiences) & set(self._audiences):
            raise AuthenticationError(
                "wrong-audience", f"token audiences {audiences} are not {self._audiences}"
            )
        user = status.get("user")
        user = user if isinstance(user, Mapping) else {}
        username = user.get("username")
        if not isinstance(username, str) or not username.startswith(_SA_PREFIX):
            raise AuthenticationError("untrusted-account", f"{username!r} is not a service account")
        namespace, _, account = username[len(_SA_PREFIX) :].partition(":")
        if not namespace or not account:
            raise AuthenticationError("untrusted-account", f"{username!r} is not a service account")
        return _Review(
            namespace=namespace,
            service_account=account,
            username=username,
            pod_name=_first_extra(user, _POD_NAME_EXTRA),
            pod_uid=_first_extra(user, _POD_UID_EXTRA),
            node_name=_first_extra(user, _NODE_NAME_EXTRA),
        )
