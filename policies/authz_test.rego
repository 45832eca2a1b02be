# Unit tests for the decision document itself: its shape, deny by default, how reasons combine.
# Helpers for every *_test.rego file of this package live here.
#
# Tests name the decision in full, `data.warden.authz.decision`, not through `import data.warden.authz`:
# in regorus 0.13 a rule reached through an imported alias under `with input as` comes out
# undefined when its file is not the package's first (a policy file named `aaa.rego`) and rules it
# depends on are in files loaded after it, and every test asking for a positive decision failed.
package warden.authz_test

import rego.v1

# --- Helpers shared by the test files ------------------------------------------------------------

no_usage := {"steps": 0, "tool_calls": 0, "input_tokens": 0, "output_tokens": 0}

run_start(tenant, principal, agent) := {
	"action": "run.start",
	"tenant": tenant,
	"principal": principal,
	"agent": agent,
	"tool": null,
	"run": {"id": "R1", "usage": no_usage},
}

tool_call(principal, agent, name, arguments, tool_calls) := {
	"action": "tool.call",
	"tenant": "acme",
	"principal": principal,
	"agent": agent,
	"tool": {"name": name, "arguments": arguments},
	"run": {"id": "R1", "usage": {"steps": 1, "tool_calls": tool_calls, "input_tokens": 0, "output_tokens": 0}},
}

fetch(url) := tool_call("alice", "researcher", "web.fetch", {"url": url}, 0)

# --- Tests -------------------------------------------------------------------------------------

test_decision_is_an_object_with_effect_and_reasons if {
	decision := data.warden.authz.decision with input as run_start("acme", "alice", "researcher")
	decision.effect == "allow"
	is_array(decision.reasons)
	count(decision.reasons) > 0
}

test_empty_input_is_denied_with_a_reason_per_missing_field if {
	decision := data.warden.authz.decision with input as {}
	decision.effect == "deny"
	decision.reasons == [
		"input.action must be a non-empty string",
		"input.agent must be a non-empty string",
		"input.principal must be a non-empty string",
		"input.tenant must be a non-empty string",
	]
}

test_empty_string_fields_are_denied if {
	decision := data.warden.authz.decision with input as run_start("acme", "", "researcher")
	decision.effect == "deny"
	"input.principal must be a non-empty string" in decision.reasons
}

test_unknown_action_is_denied if {
	request := object.union(run_start("acme", "alice", "researcher"), {"action": "run.delete"})
	decision := data.warden.authz.decision with input as request
	decision.effect == "deny"
	decision.reasons == ["unknown action run.delete (expected one of: approval.answer, halt, halt.lift, model.call, policy.change, run.cancel, run.start, tool.call)"]
}

test_nothing_granted_means_deny_by_default if {
	decision := data.warden.authz.decision with input as run_start("acme", "alice", "researcher")
		with data.warden.authz.allowed as false
	decision == {"effect": "deny", "reasons": ["no rule allows this request (deny by default)"]}
}

test_deny_reasons_come_from_every_failing_rule if {
	request := tool_call("bob", "slow", "web.fetch", {"url": "https://evil.com/"}, 10)
	decision := data.warden.authz.decision with input as request
	decision.effect == "deny"
	decision.reasons == [
		"host evil.com is not in web.fetch's allowed domains [example.com, docs.python.org]",
		"principal bob in tenant acme has roles [viewer]; none of them may run slow",
		"run R1 has already made 10 tool calls; agent slow may make at most 10 per run",
		"tool web.fetch is not allowed for agent slow",
	]
}

test_deny_wins_over_require_approval if {
	request := tool_call("carol", "refunds", "payments.refund", {"amount": 5}, 3)
	decision := data.warden.authz.decision with input as request
	decision.effect == "deny"
	decision.reasons == ["run R1 has already made 3 tool calls; agent refunds may make at most 3 per run"]
}
