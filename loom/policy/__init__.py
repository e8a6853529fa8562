"""L4 authorization shared by the controller's tests and the node proxy.

`loom.policy.rbac` compiles `istio.security.Authorization` resources (what the controller sends) into
matchers once, at load time, and decides each connection against them.
"""

from loom.policy.rbac import (
    BrokenPolicy,
    CompiledPolicy,
    Connection,
    Decision,
    DecisionReason,
    PolicyAction,
    PolicyCompileError,
    PolicyEvaluator,
    PolicyScope,
    applicable_policies,
    compile_authorization,
    decide,
    missing_policies,
)

__all__ = [
    "BrokenPolicy",
    "CompiledPolicy",
    "Connection",
    "Decision",
    "DecisionReason",
    "PolicyAction",
    "PolicyCompileError",
    "PolicyEvaluator",
    "PolicyScope",
    "applicable_policies",
    "compile_authorization",
    "decide",
    "missing_policies",
]
