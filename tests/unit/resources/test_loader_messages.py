"""Table-driven checks of the exact diagnostics users see, kind by kind.

Each case is one small manifest (the kind header is added by `manifest`) and the complete list of
rendered diagnostics it must produce: an extra or missing message fails the case, so every table row
also proves the loader reports nothing else.
"""

from __future__ import annotations

import pytest

from loom.resources.loader import load_text

HEADERS = {
    "Namespace": "apiVersion: v1\nkind: Namespace\n",
    "ServiceAccount": "apiVersion: v1\nkind: ServiceAccount\n",
    "Pod": "apiVersion: v1\nkind: Pod\n",
    "Deployment": "apiVersion: apps/v1\nkind: Deployment\n",
    "Service": "apiVersion: v1\nkind: Service\n",
    "AuthorizationPolicy": "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n",
    "PeerAuthentication": "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\n",
    "Gateway": "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n",
    "HTTPRoute": "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n",
}


def manifest(kind: str, body: str, name: str = "x") -> str:
    return f"{HEADERS[kind]}metadata:\n  name: {name}\n{body}"


def prefix(kind: str) -> str:
    """How diagnostics of the object `x` of `kind` begin."""
    return f"x.yaml doc 1 {kind} {'x' if kind == 'Namespace' else 'default/x'}: "


def diagnostics(text: str, source: str = "x.yaml") -> list[str]:
    return [str(d) for d in load_text(text, source).diagnostics]


def test_the_issue_example_renders_exactly() -> None:
    text = """apiVersion: v1
kind: Namespace
metadata:
  name: default
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-legacy
  namespace: default
spec:
  action: DENY
  rules:
  - from:
    - source:
        namespaces: 5
"""
    assert diagnostics(text, "policy.yaml") == [
        "policy.yaml doc 2 AuthorizationPolicy default/deny-legacy: spec.rules[0].from[0].source.namespaces: "
        "expected a list of strings, got int"
    ]


DEPLOYMENT_OK = """spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
"""

# (case id, kind, body after `metadata.name` (or the whole text when kind is ""), expected diagnostics).
# An expected message not starting with "x.yaml" gets the usual prefix `x.yaml doc 1 <Kind> default/x: `
# (`x.yaml doc 1 Namespace x: ` for the cluster-scoped Namespace).
CASES: list[tuple[str, str, str, list[str]]] = [
    (
        "misspelt spec (an AuthorizationPolicy without spec allows nothing)",
        "AuthorizationPolicy",
        "spce:\n  action: DENY\n",
        ['spce: unknown field, ignored (did you mean "spec"?)'],
    ),
    (
        "misspelt namespace",
        "ServiceAccount",
        "  namspace: prod\n",
        ['metadata.namspace: unknown field, ignored (did you mean "namespace"?)'],
    ),
    (
        "wildcard in a workload selector, empty port map",
        "PeerAuthentication",
        "spec:\n  selector:\n    matchLabels: {app: '*'}\n  portLevelMtls: {}\n",
        [
            'spec.selector.matchLabels.app: invalid label value "*": must be empty or at most 63 characters '
            "of letters, digits, '-', '_' and '.', starting and ending with a letter or digit",
            "spec.portLevelMtls: must hold at least one port when set",
        ],
    ),
    (
        "label value given as a number",
        "Namespace",
        "  labels:\n    team: 5\n",
        [
            "metadata.labels.team: expected a string, got int",
        ],
    ),
    (
        "label value given as a bool",
        "Pod",
        "  labels:\n    istio.io/dataplane-mode: true\n",
        [
            "metadata.labels.istio.io/dataplane-mode: expected a string, got bool",
        ],
    ),
    (
        "annotation value given as a number",
        "ServiceAccount",
        "  annotations:\n    prometheus.io/port: 9080\n",
        [
            "metadata.annotations.prometheus.io/port: expected a string, got int",
        ],
    ),
    (
        "labels not a mapping",
        "ServiceAccount",
        "  labels: [a, b]\n",
        [
            "metadata.labels: expected a mapping of strings to strings, got list",
        ],
    ),
    (
        "misspelt enrolment label",
        "Namespace",
        "  labels:\n    istio.io/dataplane-mode: ambiant\n",
        [
            'metadata.labels.istio.io/dataplane-mode: unknown value "ambiant" has no effect (expected '
            "ambient or none)",
        ],
    ),
    (
        "namespace with a slash (it would forge a SPIFFE path)",
        "ServiceAccount",
        "  namespace: a/b\n",
        [
            'x.yaml doc 1 ServiceAccount a/b/x: metadata.namespace: invalid name "a/b": must be at most 63 '
            "characters of lowercase letters, digits and '-', starting and ending with a letter or digit",
        ],
    ),
    (
        "pod service account with a slash",
        "Pod",
        "spec:\n  serviceAccountName: ns/sa\n",
        [
            'spec.serviceAccountName: invalid name "ns/sa": must be at most 253 characters of lowercase '
            "letters, digits, '-' and '.', starting and ending with a letter or digit",
        ],
    ),
    (
        "container command with a number",
        "Pod",
        "spec:\n  containers:\n  - name: app\n    command: [sleep, 5]\n",
        [
            "spec.containers[0].command[1]: expected a string, got int",
        ],
    ),
    (
        "container without a name, duplicate names",
        "Pod",
        "spec:\n  containers:\n  - image: a\n  - name: b\n  - name: b\n",
        [
            "spec.containers[0].name: required field is missing",
            'spec.containers[2].name: duplicate container name "b"',
        ],
    ),
    (
        "containers not a list",
        "Pod",
        "spec:\n  containers: {name: app}\n",
        [
            "spec.containers: expected a list, got mapping",
        ],
    ),
    (
        "bad pod IP and phase from status",
        "Pod",
        "status:\n  podIP: 10.0.0.256\n  phase: Started\n",
        [
            'status.podIP: invalid IP address "10.0.0.256"',
            'status.phase: must be one of Pending, Running, Succeeded, Failed, Unknown, got "Started"',
        ],
    ),
    (
        "unknown pod spec field",
        "Pod",
        "spec:\n  serviceAcountName: web\n",
        [
            'spec.serviceAcountName: unknown field, ignored (did you mean "serviceAccountName"?)',
        ],
    ),
    (
        "negative replicas",
        "Deployment",
        "spec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n"
        "      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n  replicas: -1\n",
        [
            "spec.replicas: must be at least 0, got -1",
        ],
    ),
    (
        "replicas as a string",
        "Deployment",
        "spec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n"
        '      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n  replicas: "3"\n',
        [
            "spec.replicas: expected an integer, got string",
        ],
    ),
    (
        "selector does not match the template",
        "Deployment",
        "spec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n"
        "      labels: {app: api}\n",
        [
            "spec.selector: does not match the template labels (spec.template.metadata.labels)",
        ],
    ),
    (
        "selector expression operator",
        "Deployment",
        "spec:\n  selector:\n    matchExpressions:\n    - {key: app, operator: Equals, values: [web]}\n"
        "  template:\n    metadata:\n      labels: {app: web}\n",
        [
            "spec.selector.matchExpressions[0].operator: must be one of In, NotIn, Exists, DoesNotExist, "
            'got "Equals"',
        ],
    ),
    (
        "selector expression values",
        "Deployment",
        "spec:\n  selector:\n    matchExpressions:\n    - {key: app, operator: In}\n"
        "    - {key: tier, operator: Exists, values: [x]}\n  template:\n    metadata:\n"
        "      labels: {app: web}\n",
        [
            "spec.selector.matchExpressions[0].values: must not be empty for operator In",
            "spec.selector.matchExpressions[1].values: must be empty for operator Exists",
        ],
    ),
    (
        "deployment without selector and template",
        "Deployment",
        "spec:\n  replicas: 2\n",
        [
            "spec.selector: required field is missing",
            "spec.template: required field is missing",
        ],
    ),
    (
        "template spec checked like a pod spec",
        "Deployment",
        "spec:\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n"
        "      labels: {app: web}\n    spec:\n      containers:\n      - name: web\n        ports:\n"
        "        - containerPort: 70000\n",
        [
            "spec.template.spec.containers[0].ports[0].containerPort: must be between 1 and 65535, got 70000",
        ],
    ),
    (
        "old apps version is skipped",
        "",
        "apiVersion: apps/v1beta2\nkind: Deployment\nmetadata:\n  name: x\n",
        [
            "x.yaml doc 1 Deployment x: apps/v1beta2 Deployment is not an API version loom reads (it reads "
            "apps/v1); skipped",
        ],
    ),
    (
        "service port out of range and bad protocol",
        "Service",
        "spec:\n  ports:\n  - port: 0\n    protocol: tcp\n",
        [
            "spec.ports[0].port: must be between 1 and 65535, got 0",
            'spec.ports[0].protocol: must be one of TCP, UDP, SCTP, got "tcp"',
        ],
    ),
    (
        "numeric string targetPort",
        "Service",
        'spec:\n  ports:\n  - port: 80\n    targetPort: "8080"\n',
        [
            'spec.ports[0].targetPort: invalid port name "8080": must be at most 15 characters of '
            "lowercase letters, digits and '-', contain a letter, and neither start nor end with '-' nor "
            "contain '--'",
        ],
    ),
    (
        "targetPort out of range",
        "Service",
        "spec:\n  ports:\n  - port: 80\n    targetPort: 0\n",
        [
            "spec.ports[0].targetPort: must be between 1 and 65535, got 0",
        ],
    ),
    (
        "several ports need names",
        "Service",
        "spec:\n  ports:\n  - port: 80\n  - port: 443\n",
        [
            "spec.ports[0].name: required when a Service has more than one port",
            "spec.ports[1].name: required when a Service has more than one port",
        ],
    ),
    (
        "bad cluster IP",
        "Service",
        "spec:\n  clusterIP: 10.96.0.300\n",
        [
            'spec.clusterIP: invalid IP address "10.96.0.300" (or "None" for a headless Service)',
        ],
    ),
    (
        "selector value as a number",
        "Service",
        "spec:\n  selector:\n    version: 1\n",
        [
            "spec.selector.version: expected a string, got int",
        ],
    ),
    (
        "service name must start with a letter",
        "",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: 1web\n",
        [
            'x.yaml doc 1 Service default/1web: metadata.name: invalid name "1web": must be at most 63 '
            "characters of lowercase letters, digits and '-', starting with a letter and ending with a "
            "letter or digit",
        ],
    ),
    (
        "bad action",
        "AuthorizationPolicy",
        "spec:\n  action: PERMIT\n",
        [
            'spec.action: must be one of ALLOW, DENY, AUDIT, CUSTOM, got "PERMIT"',
        ],
    ),
    (
        "selector and targetRefs",
        "AuthorizationPolicy",
        "spec:\n  selector:\n    matchLabels: {app: a}\n  targetRefs:\n"
        "  - {kind: Service, group: '', name: a}\n",
        [
            "spec.selector: selector and targetRef/targetRefs are mutually exclusive",
        ],
    ),
    (
        "targetRef and targetRefs, bad target kind, cross-namespace",
        "AuthorizationPolicy",
        "spec:\n  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: w}\n  targetRefs:\n"
        "  - {kind: Deployment, group: apps, name: a, namespace: other}\n",
        [
            "spec.targetRefs[0].namespace: cross-namespace targets are not supported; omit the namespace",
            'spec.targetRefs[0]: unsupported target "apps/Deployment": expected kind Service (group ""), '
            "ServiceEntry (group networking.istio.io), or Gateway or GatewayClass (group "
            "gateway.networking.k8s.io)",
            "spec.targetRefs: only one of targetRef and targetRefs may be set",
        ],
    ),
    (
        "CUSTOM without provider",
        "AuthorizationPolicy",
        "spec:\n  action: CUSTOM\n  rules:\n  - to:\n    - operation:\n        paths: [/admin]\n",
        [
            "spec.provider.name: required for action CUSTOM",
        ],
    ),
    (
        "provider with ALLOW",
        "AuthorizationPolicy",
        "spec:\n  provider: {name: ext}\n  rules: [{}]\n",
        [
            "spec.provider: only allowed with action CUSTOM, not ALLOW",
        ],
    ),
    (
        "DENY without rules",
        "AuthorizationPolicy",
        "spec:\n  action: DENY\n",
        [
            "spec.rules: required for action DENY: without rules the policy never matches (add an empty "
            "rule {} to match every request)",
        ],
    ),
    (
        "wildcard in the middle of a principal",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/*/sa/web]\n",
        [
            "spec.rules[0].from[0].source.principals[0]: \"cluster.local/ns/*/sa/web\": '*' is only "
            "allowed as the whole value, a prefix (*x) or a suffix (x*)",
        ],
    ),
    (
        "principals with serviceAccounts",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - source:\n        principals: [a]\n"
        "        serviceAccounts: [default/web]\n",
        [
            "spec.rules[0].from[0].source: serviceAccounts cannot be combined with principals or "
            "namespaces in one source",
        ],
    ),
    (
        "malformed service account",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - source:\n        serviceAccounts: [a/b/c]\n",
        [
            'spec.rules[0].from[0].source.serviceAccounts[0]: "a/b/c": expected "<service account>" or '
            '"<namespace>/<service account>"',
        ],
    ),
    (
        "bad ip block",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [10.0.0.0/33]\n",
        [
            'spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address or CIDR range "10.0.0.0/33"',
        ],
    ),
    (
        "empty source and empty operation",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - source: {}\n    to:\n    - operation: {}\n",
        [
            "spec.rules[0].from[0].source: source must not be empty",
            "spec.rules[0].to[0].operation: operation must not be empty",
        ],
    ),
    (
        "from entry without source, empty to",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - {}\n    to: []\n",
        [
            "spec.rules[0].from[0].source: required field is missing",
            "spec.rules[0].to: must not be empty (omit it to match any operation)",
        ],
    ),
    (
        "empty string value",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - source:\n        namespaces: ['']\n",
        [
            "spec.rules[0].from[0].source.namespaces[0]: must not be empty",
        ],
    ),
    (
        "port names are not ports",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - to:\n    - operation:\n        ports: [http, 0, '65536']\n",
        [
            'spec.rules[0].to[0].operation.ports[0]: must be a port number between 1 and 65535, got "http"',
            "spec.rules[0].to[0].operation.ports[1]: must be a port number between 1 and 65535, got int 0",
            'spec.rules[0].to[0].operation.ports[2]: must be a port number between 1 and 65535, got "65536"',
        ],
    ),
    (
        "unsupported path template",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - to:\n    - operation:\n        paths: ['/{*}/{name}']\n",
        [
            'spec.rules[0].to[0].operation.paths[0]: "/{*}/{name}": invalid or unsupported path template',
        ],
    ),
    (
        "unknown when key",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - when:\n    - key: request.method\n      values: [GET]\n",
        [
            'spec.rules[0].when[0].key: unknown key "request.method"',
        ],
    ),
    (
        "when without values, header key without a name, bad port value",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - when:\n    - key: source.ip\n    - key: request.headers[]\n"
        "      values: [x]\n    - key: destination.port\n      notValues: [http]\n",
        [
            "spec.rules[0].when[0]: at least one of values or notValues must be set",
            'spec.rules[0].when[1].key: "request.headers[]": expected the form request.headers[<name>]',
            'spec.rules[0].when[2].notValues[0]: must be a port number between 1 and 65535, got "http"',
        ],
    ),
    (
        "known when keys are accepted",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - when:\n    - {key: source.ip, values: [10.0.0.0/8, 192.168.1.1]}\n"
        "    - {key: 'request.headers[x-user]', values: [a]}\n"
        "    - {key: 'request.auth.claims[iss]', values: [b]}\n"
        "    - key: experimental.envoy.filters.network.mysql_proxy[db.table]\n      values: ['[update]']\n"
        "    - {key: connection.sni, notValues: ['*.example.com']}\n"
        "    - {key: destination.port, values: ['9080']}\n",
        [],
    ),
    (
        "rules entry that is not a mapping",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - null\n",
        [
            "spec.rules[0]: expected a mapping, got null",
        ],
    ),
    (
        "unknown source field",
        "AuthorizationPolicy",
        "spec:\n  rules:\n  - from:\n    - source:\n        principal: [a]\n",
        [
            "spec.rules[0].from[0].source: source must not be empty",
            'spec.rules[0].from[0].source.principal: unknown field, ignored (did you mean "principals"?)',
        ],
    ),
    (
        "lowercase mode",
        "PeerAuthentication",
        "spec:\n  mtls:\n    mode: strict\n",
        [
            'spec.mtls.mode: must be one of UNSET, PERMISSIVE, STRICT, DISABLE, got "strict"',
        ],
    ),
    (
        "port level mTLS without a selector",
        "PeerAuthentication",
        "spec:\n  portLevelMtls:\n    8080:\n      mode: DISABLE\n",
        [
            "spec.portLevelMtls: requires spec.selector with matchLabels (a namespace- or mesh-wide policy "
            "cannot set per-port modes)",
        ],
    ),
    (
        "port level mTLS keys",
        "PeerAuthentication",
        "spec:\n  selector:\n    matchLabels: {app: a}\n  portLevelMtls:\n    http: {mode: DISABLE}\n"
        "    '0': {mode: DISABLE}\n    '8080': {mode: DISABLE}\n    8080: {mode: STRICT}\n",
        [
            'spec.portLevelMtls.http: key must be a port number, got string "http"',
            "spec.portLevelMtls.0: must be between 1 and 65535, got 0",
            "spec.portLevelMtls.8080: port 8080 is listed twice",
        ],
    ),
    (
        "typo in spec",
        "PeerAuthentication",
        "spec:\n  mtl:\n    mode: STRICT\n",
        [
            'spec.mtl: unknown field, ignored (did you mean "mtls"?)',
        ],
    ),
    (
        "missing class and listeners",
        "Gateway",
        "spec: {}\n",
        [
            "spec.gatewayClassName: required field is missing",
            "spec.listeners: required field is missing",
        ],
    ),
    (
        "bad waypoint-for label",
        "Gateway",
        "  labels:\n    istio.io/waypoint-for: services\nspec:\n  gatewayClassName: istio-waypoint\n"
        "  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n",
        [
            "metadata.labels.istio.io/waypoint-for: must be one of service, workload, all, none, got "
            '"services"',
        ],
    ),
    (
        "waypoint without an HBONE listener",
        "Gateway",
        "spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n"
        "  - {name: mesh, port: 15008, protocol: TCP}\n",
        [
            "spec.listeners: a waypoint (gatewayClassName istio-waypoint) needs a listener with protocol "
            "HBONE; none found, so no traffic can reach it",
        ],
    ),
    (
        "listener problems",
        "Gateway",
        "spec:\n  gatewayClassName: istio\n  listeners:\n  - {name: http, port: 0, protocol: HTTP}\n"
        "  - {name: http, port: 80}\n",
        [
            "spec.listeners[0].port: must be between 1 and 65535, got 0",
            'spec.listeners[1].name: duplicate listener name "http"',
            "spec.listeners[1].protocol: required field is missing",
        ],
    ),
    (
        "per-service-account annotation must be an account name",
        "Gateway",
        "  annotations:\n    istio.io/for-service-account: ns/sa\nspec:\n"
        "  gatewayClassName: istio-waypoint\n  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE}\n",
        [
            'metadata.annotations.istio.io/for-service-account: invalid name "ns/sa": must be at most 253 '
            "characters of lowercase letters, digits, '-' and '.', starting and ending with a letter or "
            "digit",
        ],
    ),
    (
        "weight out of range",
        "HTTPRoute",
        "spec:\n  rules:\n  - backendRefs:\n    - {name: a, port: 80, weight: 1000001}\n",
        [
            "spec.rules[0].backendRefs[0].weight: must be between 0 and 1000000, got 1000001",
        ],
    ),
    (
        "backend Service without a port, parentRef without a name",
        "HTTPRoute",
        "spec:\n  parentRefs:\n  - kind: Service\n  rules:\n  - backendRefs:\n    - name: a\n",
        [
            "spec.parentRefs[0].name: required field is missing",
            "spec.rules[0].backendRefs[0].port: required when referring to a Service",
        ],
    ),
    (
        "relative path",
        "HTTPRoute",
        "spec:\n  rules:\n  - matches:\n    - path: {type: PathPrefix, value: reviews}\n",
        [
            "spec.rules[0].matches[0].path.value: \"reviews\": must be an absolute path starting with '/'",
        ],
    ),
    (
        "path with a dot segment",
        "HTTPRoute",
        "spec:\n  rules:\n  - matches:\n    - path: {type: Exact, value: /a/../admin}\n",
        [
            'spec.rules[0].matches[0].path.value: "/a/../admin": must not contain "/../"',
        ],
    ),
    (
        "path type and method",
        "HTTPRoute",
        "spec:\n  rules:\n  - matches:\n    - path: {type: Prefix, value: /}\n      method: get\n",
        [
            "spec.rules[0].matches[0].path.type: must be one of Exact, PathPrefix, RegularExpression, got "
            '"Prefix"',
            "spec.rules[0].matches[0].method: must be one of GET, HEAD, POST, PUT, DELETE, CONNECT, "
            'OPTIONS, TRACE, PATCH, got "get"',
        ],
    ),
    (
        "header match problems",
        "HTTPRoute",
        "spec:\n  rules:\n  - matches:\n    - headers:\n      - {name: 'bad header', value: a}\n"
        "      - {name: x-user, value: a, type: Prefix}\n      - {name: X-User, value: b}\n",
        [
            'spec.rules[0].matches[0].headers[0].name: invalid name "bad header"',
            'spec.rules[0].matches[0].headers[1].type: must be one of Exact, RegularExpression, got "Prefix"',
            'spec.rules[0].matches[0].headers[2].name: "X-User" is matched twice in one match',
        ],
    ),
    (
        "filter without its config, with another type's config",
        "HTTPRoute",
        "spec:\n  rules:\n  - filters:\n    - type: RequestHeaderModifier\n      urlRewrite: {hostname: a}\n",
        [
            "spec.rules[0].filters[0].urlRewrite: must not be set for a filter of type RequestHeaderModifier",
            "spec.rules[0].filters[0].requestHeaderModifier: required for a filter of type "
            "RequestHeaderModifier",
        ],
    ),
    (
        "repeated filter, redirect with rewrite and backends",
        "HTTPRoute",
        "spec:\n  rules:\n  - filters:\n    - {type: URLRewrite, urlRewrite: {hostname: a.example}}\n"
        "    - {type: URLRewrite, urlRewrite: {hostname: b.example}}\n"
        "    - {type: RequestRedirect, requestRedirect: {statusCode: 307, scheme: https}}\n"
        "    backendRefs:\n    - {name: a, port: 80}\n",
        [
            "spec.rules[0].filters[1].type: a rule may hold at most one URLRewrite filter",
            "spec.rules[0].filters: RequestRedirect and URLRewrite cannot be used in the same rule",
            "spec.rules[0].backendRefs: must be empty when the rule has a RequestRedirect filter",
        ],
    ),
    (
        "header modifier contents",
        "HTTPRoute",
        "spec:\n  rules:\n  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n"
        "        set:\n        - {name: x-a, value: 1}\n        remove: [x-b, 'c d']\n",
        [
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].value: expected a string, got int",
            'spec.rules[0].filters[0].requestHeaderModifier.remove[1]: invalid header name "c d"',
        ],
    ),
    (
        "prefix rewrite needs one PathPrefix match",
        "HTTPRoute",
        "spec:\n  rules:\n  - matches:\n    - path: {type: Exact, value: /a}\n    filters:\n"
        "    - type: URLRewrite\n      urlRewrite:\n"
        "        path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}\n",
        [
            "spec.rules[0].filters: a ReplacePrefixMatch path modifier needs exactly one match, and it "
            "must be a PathPrefix match",
        ],
    ),
    (
        "bad durations",
        "HTTPRoute",
        "spec:\n  rules:\n  - timeouts:\n      request: 10 seconds\n    retry:\n      attempts: -1\n"
        "      backoff: 1d\n      codes: [200, 503]\n",
        [
            'spec.rules[0].timeouts.request: invalid duration "10 seconds": expected e.g. 10s, 500ms or 1h2m',
            "spec.rules[0].retry.attempts: must be at least 0, got -1",
            'spec.rules[0].retry.backoff: invalid duration "1d": expected e.g. 10s, 500ms or 1h2m',
            "spec.rules[0].retry.codes[0]: must be an HTTP status code 400-599, got 200",
        ],
    ),
    (
        "backend timeout longer than the request timeout",
        "HTTPRoute",
        "spec:\n  rules:\n  - timeouts: {request: 1s, backendRequest: 2s}\n",
        [
            "spec.rules[0].timeouts.backendRequest: must not be longer than the request timeout",
        ],
    ),
    (
        "hostnames",
        "HTTPRoute",
        "spec:\n  hostnames: [reviews.default.svc.cluster.local, '*.example.com', 'Bad_Host', 5]\n",
        [
            "spec.hostnames[3]: expected a string, got int",
        ],
    ),
    (
        "hostname syntax",
        "HTTPRoute",
        "spec:\n  hostnames: [reviews.default.svc.cluster.local, '*.example.com', 'Bad_Host']\n",
        [
            'spec.hostnames[2]: invalid hostname "Bad_Host"',
        ],
    ),
]


@pytest.mark.parametrize(("case_id", "kind", "body", "expected"), CASES, ids=[c[0] for c in CASES])
def test_diagnostics(case_id: str, kind: str, body: str, expected: list[str]) -> None:
    text = manifest(kind, body) if kind else body  # without a kind, `body` is the whole text
    assert diagnostics(text) == [e if e.startswith("x.yaml") else prefix(kind) + e for e in expected]


def test_required_object_fields() -> None:
    assert diagnostics(
        "kind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nmetadata: {name: a}\n"
    ) == [
        "x.yaml doc 1 Namespace a: apiVersion: required field is missing",
        "x.yaml doc 2: kind: required field is missing",
    ]
    assert diagnostics(
        "apiVersion: v1\nkind: Pod\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: 5}\n"
    ) == [
        "x.yaml doc 1: metadata.name: required field is missing",
        "x.yaml doc 2: metadata.name: expected a string, got int",
    ]
    assert diagnostics("apiVersion: 1\nkind: [Pod]\n") == [
        "x.yaml doc 1: apiVersion: expected a string, got int",
        "x.yaml doc 1: kind: expected a string, got list",
    ]
