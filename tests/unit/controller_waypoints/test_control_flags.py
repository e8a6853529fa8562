"""The controller's waypoint settings (controller/config.py) and what a stream may see by who it is
(controller/xds/server.py `stream_scope`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.auth import NodeIdentity
from controller.config import Config, ConfigError, HostPort
from controller.translate import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from controller.xds.resources import WAYPOINT_CONFIG_TYPE_URL, versioned
from controller.xds.server import stream_scope


def test_defaults_deploy_nothing() -> None:
    config = Config.from_args(["--config-dir", "/tmp/x"], {})
    assert not config.deploy_waypoints
    assert config.waypoint_command == () and config.waypoint_xds_address is None and config.lab_store is None


def test_lab_flags() -> None:
    argv = ["--config-dir", "/lab/config", "--deploy-waypoints", "--lab-store", "/lab/config"]
    argv += ["--waypoint-command", "'/opt/my venv/bin/loom-waypoint' --log-level debug"]
    argv += ["--waypoint-xds-address", "10.0.0.2:15012"]
    config = Config.from_args(argv, {})
    assert config.deploy_waypoints and config.lab_store == Path("/lab/config")
    assert config.waypoint_command == ("/opt/my venv/bin/loom-waypoint", "--log-level", "debug")
    assert config.waypoint_xds_address == HostPort("10.0.0.2", 15012)


def test_environment_variables() -> None:
    env = {"LOOM_DEPLOY_WAYPOINTS": "true", "LOOM_WAYPOINT_IMAGE": "reg/loom:3"}
    config = Config.from_args(["--kubernetes"], env)
    assert config.deploy_waypoints and config.waypoint_image == "reg/loom:3"


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        pytest.param(
            ["--config-dir", "/c", "--deploy-waypoints"], "needs --lab-store", id="lab store missing"
        ),
        pytest.param(["--kubernetes", "--lab-store", "/c"], "directory mode", id="lab store on Kubernetes"),
        pytest.param(
            ["--config-dir", "/c", "--deploy-waypoints", "--lab-store", "/elsewhere"],
            "one of the --config-dir",
            id="lab store not read back",
        ),
        pytest.param(["--kubernetes", "--waypoint-command", "'open"], "not a command line", id="bad quoting"),
        pytest.param(["--kubernetes", "--waypoint-image", " "], "must not be empty", id="empty image"),
        pytest.param(
            ["--kubernetes", "--waypoint-xds-address", "nowhere"], "--waypoint-xds-address", id="address"
        ),
    ],
)
def test_invalid_waypoint_settings(argv: list[str], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        Config.from_args(argv, {})
    assert any(problem in p for p in error.value.problems), error.value.problems


def test_stream_scope_by_caller() -> None:
    node = stream_scope(NodeIdentity("node-a", "node/node-a"))
    assert node.types == (AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL)
    waypoint = stream_scope(
        NodeIdentity("", "w", waypoint="default/waypoint", waypoint_service_account="waypoint")
    )
    assert waypoint.types == (WAYPOINT_CONFIG_TYPE_URL, ADDRESS_TYPE_URL)

    resources = {
        AUTHORIZATION_TYPE_URL: {"default/p": versioned(b"p")},
        ADDRESS_TYPE_URL: {"default/a": versioned(b"a")},
        WAYPOINT_CONFIG_TYPE_URL: {"default/waypoint": versioned(b"1"), "default/second": versioned(b"2")},
    }
    seen = waypoint.view(resources)
    assert set(seen) == {WAYPOINT_CONFIG_TYPE_URL, ADDRESS_TYPE_URL}
    assert list(seen[WAYPOINT_CONFIG_TYPE_URL]) == ["default/waypoint"]
    assert seen[ADDRESS_TYPE_URL] is resources[ADDRESS_TYPE_URL]  # not copied
    assert set(node.view(resources)) == {AUTHORIZATION_TYPE_URL, ADDRESS_TYPE_URL}
