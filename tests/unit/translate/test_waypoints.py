"""Waypoint binding: Istio's use-waypoint model, the per-service-account model, their precedence,
fail-closed binding of missing waypoints, and that a waypoint never gets a waypoint."""

from __future__ import annotations

import pytest

from controller.translate import Translation
from loom.resources.model import Resource

from .builders import AMBIENT, namespace, pod, run, service, service_of, waypoint, waypoint_host, workload_of

USE = "istio.io/use-waypoint"
USE_NS = "istio.io/use-waypoint-namespace"
APP = {"app": "a"}
WAYPOINT_POD = {"gateway.networking.k8s.io/gateway-name": "waypoint"}


def short(host: str | None) -> str | None:
    """'wp.ns.svc.cluster.local' -> 'ns/wp'."""
    if host is None:
        return None
    name, ns = host.split(".")[:2]
    return f"{ns}/{name}"


def bindings(translation: Translation, *names: str) -> dict[str, str | None]:
    """{"pod:<name>" or "svc:<name>": "<ns>/<waypoint>" or None} for the named objects in default."""
    result: dict[str, str | None] = {}
    for name in names:
        kind, obj = name.split(":")
        if kind == "pod":
            result[name] = short(waypoint_host(workload_of(translation, obj)))
        else:
            result[name] = short(waypoint_host(service_of(translation, obj)))
    return result


def app_pod(
    name: str = "p", *, labels: dict[str, str] | None = None, sa: str = "default", ip: str = "10.0.0.1"
) -> Resource:
    return pod(name, labels={**APP, **(labels or {})}, sa=sa, ips=(ip,))


def app_service(name: str = "s", labels: dict[str, str] | None = None) -> Resource:
    return service(name, selector=APP, labels=labels)


# --- Istio's current model -------------------------------------------------------------------------

CURRENT_MODEL_CASES: list[tuple[str, tuple[Resource, ...], dict[str, str | None]]] = [
    (
        "namespace label, service waypoint binds services not pods",
        (namespace("default", {USE: "waypoint"}), waypoint(), app_pod(), app_service()),
        {"pod:p": None, "svc:s": "default/waypoint"},
    ),
    (
        "namespace label, workload waypoint binds pods not services",
        (
            namespace("default", {USE: "waypoint"}),
            waypoint(waypoint_for="workload"),
            app_pod(),
            app_service(),
        ),
        {"pod:p": "default/waypoint", "svc:s": None},
    ),
    (
        "namespace label, waypoint for all binds both",
        (namespace("default", {USE: "waypoint"}), waypoint(waypoint_for="all"), app_pod(), app_service()),
        {"pod:p": "default/waypoint", "svc:s": "default/waypoint"},
    ),
    (
        "namespace label, waypoint for none binds nothing",
        (namespace("default", {USE: "waypoint"}), waypoint(waypoint_for="none"), app_pod(), app_service()),
        {"pod:p": None, "svc:s": None},
    ),
    (
        "service label binds the service",
        (namespace("default"), waypoint(), app_pod(), app_service(labels={USE: "waypoint"})),
        {"pod:p": None, "svc:s": "default/waypoint"},
    ),
    (
        "pod label binds the pod",
        (
            namespace("default"),
            waypoint(waypoint_for="workload"),
            app_pod(labels={USE: "waypoint"}),
            app_service(),
        ),
        {"pod:p": "default/waypoint", "svc:s": None},
    ),
    (
        "pod label none opts out of the namespace waypoint",
        (
            namespace("default", {USE: "waypoint"}),
            waypoint(waypoint_for="all"),
            app_pod(labels={USE: "none"}),
        ),
        {"pod:p": None},
    ),
    (
        "pod label #none opts out too",
        (
            namespace("default", {USE: "waypoint"}),
            waypoint(waypoint_for="all"),
            app_pod(labels={USE: "#none"}),
        ),
        {"pod:p": None},
    ),
    (
        "service label none opts out of the namespace waypoint",
        (namespace("default", {USE: "waypoint"}), waypoint(), app_pod(), app_service(labels={USE: "none"})),
        {"svc:s": None},
    ),
    (
        "object label wins over the namespace label",
        (
            namespace("default", {USE: "waypoint"}),
            waypoint(),
            waypoint("special"),
            app_pod(),
            app_service(labels={USE: "special"}),
        ),
        {"svc:s": "default/special"},
    ),
    (
        "use-waypoint-namespace names another namespace",
        (waypoint("shared", "infra"), app_pod(), app_service(labels={USE: "shared", USE_NS: "infra"})),
        {"svc:s": "infra/shared"},
    ),
    (
        "namespace/name value names another namespace",
        (waypoint("shared", "infra"), app_pod(), app_service(labels={USE: "infra/shared"})),
        {"svc:s": "infra/shared"},
    ),
    (
        "namespace label with use-waypoint-namespace",
        (namespace("default", {USE: "shared", USE_NS: "infra"}), waypoint("shared", "infra"), app_service()),
        {"svc:s": "infra/shared"},
    ),
    (
        "unknown traffic type binds both",
        (
            namespace("default", {USE: "waypoint"}),
            waypoint(waypoint_for="everything"),
            app_pod(),
            app_service(),
        ),
        {"pod:p": "default/waypoint", "svc:s": "default/waypoint"},
    ),
]


@pytest.mark.parametrize(
    ("objects", "expected"), [c[1:] for c in CURRENT_MODEL_CASES], ids=[c[0] for c in CURRENT_MODEL_CASES]
)
def test_current_model(objects: tuple[Resource, ...], expected: dict[str, str | None]) -> None:
    assert bindings(run(*objects), *expected) == expected


def test_pod_label_naming_a_service_waypoint_warns() -> None:
    translation = run(waypoint(), app_pod(labels={USE: "waypoint"}))
    assert bindings(translation, "pod:p") == {"pod:p": None}
    [warning] = [d for d in translation.diagnostics if d.key is not None and d.key.kind == "Pod"]
    assert "does not serve workload traffic" in warning.message


# --- fail closed on missing waypoints ----------------------------------------------------------------

MISSING_CASES: list[tuple[str, tuple[Resource, ...], dict[str, str | None], tuple[str, str]]] = [
    (
        "pod label naming a missing waypoint",
        (app_pod(labels={USE: "ghost"}), app_service()),
        {"pod:p": "default/ghost", "svc:s": None},
        ("Pod", "p"),
    ),
    (
        "service label naming a missing waypoint",
        (app_pod(), app_service(labels={USE: "ghost"})),
        {"pod:p": None, "svc:s": "default/ghost"},
        ("Service", "s"),
    ),
    (
        "namespace label naming a missing waypoint binds services and pods",
        (namespace("default", {USE: "ghost"}), app_pod(), app_service()),
        {"pod:p": "default/ghost", "svc:s": "default/ghost"},
        ("Namespace", "default"),
    ),
    (
        "gateway of another class is not a waypoint",
        (waypoint("ghost", gateway_class="istio"), app_pod(), app_service(labels={USE: "ghost"})),
        {"svc:s": "default/ghost"},
        ("Service", "s"),
    ),
    (
        "a value that is no valid reference",
        (app_pod(), app_service(labels={USE: "a/b/c"})),
        {"svc:s": "default/a/b/c"},
        ("Service", "s"),
    ),
]


@pytest.mark.parametrize(
    ("objects", "expected", "warned"), [c[1:] for c in MISSING_CASES], ids=[c[0] for c in MISSING_CASES]
)
def test_missing_waypoint_binds_anyway_and_warns(
    objects: tuple[Resource, ...], expected: dict[str, str | None], warned: tuple[str, str]
) -> None:
    translation = run(*objects)
    assert bindings(translation, *expected) == expected
    warnings = [d for d in translation.diagnostics if "names waypoint" in d.message]
    assert len(warnings) == 1
    [warning] = warnings
    assert warning.key is not None and (warning.key.kind, warning.key.name) == warned
    assert warning.field == f"metadata.labels[{USE}]"
    assert "connections fail until the waypoint exists" in warning.message


# --- a waypoint never gets a waypoint ----------------------------------------------------------------

NEVER_CASES: list[tuple[str, tuple[Resource, ...], dict[str, str | None]]] = [
    (
        "waypoint pod (gateway-name label) in a namespace bound for all",
        (
            namespace("default", {USE: "waypoint"}),
            waypoint(waypoint_for="all"),
            pod("p", labels=WAYPOINT_POD),
            service("waypoint", selector=WAYPOINT_POD),
        ),
        {"pod:p": None, "svc:waypoint": None},
    ),
    (
        "pod labelled networking.istio.io/tunnel=http",
        (
            namespace("default", {USE: "waypoint"}),
            waypoint(waypoint_for="all"),
            pod("p", labels={"networking.istio.io/tunnel": "http"}),
        ),
        {"pod:p": None},
    ),
    (
        "waypoint pod even with its own use-waypoint label",
        (waypoint(waypoint_for="all"), pod("p", labels={**WAYPOINT_POD, USE: "waypoint"})),
        {"pod:p": None},
    ),
    (
        "waypoint service even with its own use-waypoint label",
        (waypoint(), service("waypoint", selector=WAYPOINT_POD, labels={USE: "waypoint"})),
        {"svc:waypoint": None},
    ),
    (
        "per-service-account waypoint pods running as the served account",
        (
            waypoint("wp", for_sa="reviews"),
            pod("p", sa="reviews", labels={"gateway.networking.k8s.io/gateway-name": "wp"}),
        ),
        {"pod:p": None},
    ),
]


@pytest.mark.parametrize(
    ("objects", "expected"), [c[1:] for c in NEVER_CASES], ids=[c[0] for c in NEVER_CASES]
)
def test_a_waypoint_never_gets_a_waypoint(
    objects: tuple[Resource, ...], expected: dict[str, str | None]
) -> None:
    translation = run(*objects)
    assert bindings(translation, *expected) == expected
    for key in expected:
        if key.startswith("pod:"):
            assert workload_of(translation, key[4:]).native_tunnel


def test_gateway_pod_label_of_a_non_waypoint_gateway_is_an_ordinary_pod() -> None:
    translation = run(
        waypoint("ingress", gateway_class="istio"),
        pod("p", labels={"gateway.networking.k8s.io/gateway-name": "ingress"}),
    )
    assert not workload_of(translation, "p").native_tunnel


# --- the per-service-account model -------------------------------------------------------------------


def bookinfo(*extra: Resource) -> tuple[Resource, ...]:
    """The shape of /work/shared/samples/ambient/waypoint-reviews-sa.yaml on the Bookinfo workloads:
    reviews v1-v3 run as bookinfo-reviews; the Gateway bookinfo-reviews serves that account; the
    Gateway waypoint is a service waypoint only used through labels."""
    reviews = {"app": "reviews"}
    return (
        namespace("default", AMBIENT),
        waypoint("bookinfo-reviews", for_sa="bookinfo-reviews"),
        waypoint("waypoint", waypoint_for="service"),
        *(
            pod(
                f"reviews-v{v}",
                labels={**reviews, "version": f"v{v}"},
                sa="bookinfo-reviews",
                ips=(f"10.0.0.{v}",),
                owner=f"reviews-v{v}",
            )
            for v in (1, 2, 3)
        ),
        pod("productpage-v1", labels={"app": "productpage"}, sa="bookinfo-productpage", ips=("10.0.0.9",)),
        pod("ratings-v1", labels={"app": "ratings"}, sa="bookinfo-ratings", ips=("10.0.0.8",)),
        service("reviews", selector=reviews, cluster_ips=("172.16.0.2",)),
        service("productpage", selector={"app": "productpage"}, cluster_ips=("172.16.0.3",)),
        service("ratings", selector={"app": "ratings"}, cluster_ips=("172.16.0.4",)),
        # What the waypoint reconciler deploys for the Gateway.
        pod(
            "bookinfo-reviews-abc",
            labels={"gateway.networking.k8s.io/gateway-name": "bookinfo-reviews"},
            sa="bookinfo-reviews-waypoint",
            ips=("10.0.0.20",),
        ),
        service(
            "bookinfo-reviews",
            selector={"gateway.networking.k8s.io/gateway-name": "bookinfo-reviews"},
            cluster_ips=("172.16.0.20",),
        ),
        *extra,
    )


REVIEWS_WP = "default/bookinfo-reviews"
BOOKINFO_NAMES = (
    "pod:reviews-v1",
    "pod:reviews-v2",
    "pod:reviews-v3",
    "pod:productpage-v1",
    "pod:bookinfo-reviews-abc",
    "svc:reviews",
    "svc:productpage",
    "svc:bookinfo-reviews",
)


def test_bookinfo_reviews_per_service_account_waypoint() -> None:
    translation = run(*bookinfo())
    assert bindings(translation, *BOOKINFO_NAMES) == {
        "pod:reviews-v1": REVIEWS_WP,
        "pod:reviews-v2": REVIEWS_WP,
        "pod:reviews-v3": REVIEWS_WP,
        "pod:productpage-v1": None,
        "pod:bookinfo-reviews-abc": None,
        "svc:reviews": REVIEWS_WP,
        "svc:productpage": None,
        "svc:bookinfo-reviews": None,
    }
    assert not [d for d in translation.diagnostics if d.is_error]
    assert workload_of(translation, "bookinfo-reviews-abc").native_tunnel


PER_SA_CASES: list[tuple[str, tuple[Resource, ...], dict[str, str | None]]] = [
    (
        "pod label wins over the per-service-account waypoint",
        bookinfo(
            waypoint("other", waypoint_for="all"),
            pod(
                "reviews-v4",
                labels={"app": "reviews", USE: "other"},
                sa="bookinfo-reviews",
                ips=("10.0.0.4",),
            ),
        ),
        {"pod:reviews-v4": "default/other", "pod:reviews-v1": REVIEWS_WP},
    ),
    (
        "pod label none wins over the per-service-account waypoint",
        bookinfo(
            pod(
                "reviews-v4", labels={"app": "reviews", USE: "none"}, sa="bookinfo-reviews", ips=("10.0.0.4",)
            )
        ),
        {"pod:reviews-v4": None},
    ),
    (
        "service label wins over the per-service-account waypoint",
        bookinfo(service("reviews-direct", selector={"app": "reviews"}, labels={USE: "waypoint"})),
        {"svc:reviews-direct": "default/waypoint"},
    ),
    (
        "service label none wins over the per-service-account waypoint",
        bookinfo(service("reviews-direct", selector={"app": "reviews"}, labels={USE: "none"})),
        {"svc:reviews-direct": None},
    ),
    (
        "per-service-account waypoint wins over the namespace label",
        bookinfo(namespace("default", {**AMBIENT, USE: "waypoint"})),
        {"svc:reviews": REVIEWS_WP, "svc:productpage": "default/waypoint", "pod:reviews-v1": REVIEWS_WP},
    ),
    (
        "service selecting one version still gets the waypoint",
        bookinfo(service("reviews-v2", selector={"version": "v2"})),
        {"svc:reviews-v2": REVIEWS_WP},
    ),
    (
        "a pod labelled with its own account's waypoint is still served by it",
        bookinfo(
            pod(
                "reviews-v4",
                labels={"app": "reviews", USE: "bookinfo-reviews"},
                sa="bookinfo-reviews",
                ips=("10.0.0.4",),
            )
        ),
        {"svc:reviews": REVIEWS_WP, "pod:reviews-v4": REVIEWS_WP},
    ),
    (
        "service with no pods gets no per-service-account waypoint",
        bookinfo(service("nothing", selector={"app": "nothing"})),
        {"svc:nothing": None},
    ),
    (
        "per-service-account waypoint for service traffic only",
        (waypoint("wp", for_sa="sa1", waypoint_for="service"), app_pod(sa="sa1"), app_service()),
        {"pod:p": None, "svc:s": "default/wp"},
    ),
    (
        "per-service-account waypoint for workload traffic only",
        (waypoint("wp", for_sa="sa1", waypoint_for="workload"), app_pod(sa="sa1"), app_service()),
        {"pod:p": "default/wp", "svc:s": None},
    ),
    (
        "per-service-account waypoint serves its own namespace only",
        (waypoint("wp", "elsewhere", for_sa="sa1"), app_pod(sa="sa1"), app_service()),
        {"pod:p": None, "svc:s": None},
    ),
]


@pytest.mark.parametrize(
    ("objects", "expected"), [c[1:] for c in PER_SA_CASES], ids=[c[0] for c in PER_SA_CASES]
)
def test_per_service_account_model(objects: tuple[Resource, ...], expected: dict[str, str | None]) -> None:
    assert bindings(run(*objects), *expected) == expected


MIXED_CASES: list[tuple[str, tuple[Resource, ...], str | None]] = [
    (
        "pods of two accounts",
        (pod("other", labels={"app": "reviews"}, sa="someone-else", ips=("10.0.0.7",)),),
        None,
    ),
    (
        "a pod opting out with its own label",
        (
            pod(
                "reviews-v4", labels={"app": "reviews", USE: "none"}, sa="bookinfo-reviews", ips=("10.0.0.4",)
            ),
        ),
        None,
    ),
    (
        "mixed pods fall back to the namespace label",
        (
            namespace("default", {**AMBIENT, USE: "waypoint"}),
            pod("other", labels={"app": "reviews"}, sa="someone-else", ips=("10.0.0.7",)),
        ),
        "default/waypoint",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in MIXED_CASES], ids=[c[0] for c in MIXED_CASES])
def test_mixed_service_gets_no_per_service_account_waypoint_and_a_warning(
    extra: tuple[Resource, ...], expected: str | None
) -> None:
    translation = run(*bookinfo(*extra))
    assert bindings(translation, "svc:reviews", "pod:reviews-v1") == {
        "svc:reviews": expected,
        "pod:reviews-v1": REVIEWS_WP,
    }
    [warning] = [d for d in translation.diagnostics if d.key is not None and d.key.kind == "Service"]
    assert warning.key is not None and warning.key.name == "reviews"
    assert "not all served by one per-service-account waypoint" in warning.message
    assert REVIEWS_WP in warning.message


def test_two_waypoints_for_one_account_first_by_name_wins() -> None:
    translation = run(waypoint("b-wp", for_sa="sa1"), waypoint("a-wp", for_sa="sa1"), app_pod(sa="sa1"))
    assert bindings(translation, "pod:p") == {"pod:p": "default/a-wp"}
    [warning] = [d for d in translation.diagnostics if d.key is not None and d.key.kind == "Gateway"]
    assert warning.key is not None and warning.key.name == "b-wp"
