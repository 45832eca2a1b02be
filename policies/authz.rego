# Warden's authorization decision: the one document the policy gate queries.
#
# data.warden.authz.decision is always an object {"effect": ..., "reasons": [...]}:
#   - "deny" with every reason any rule gave for refusing (rules add to the `deny` set),
#   - "require_approval" when nothing denies, the request is otherwise allowed, and some rule
#     asks for a human (rules add to the `approval` set),
#   - "allow" when nothing denies and the rules for the action positively grant it (`allowed`),
#     with the reasons that granted it (rules add to the `grants` set).
# Anything else is a deny by default: a request is allowed only because a rule says so.
#
# Rules are split over files by subject (runs.rego, tools.rego) but all live in this package.
# Written for both regorus (in-process in the gate) and OPA (tests/test_opa.py holds them to the
# same decisions), so some things are never written here:
#   - `not x[_]` over an empty or missing collection: undefined in regorus, true in OPA. Use
#     count(...) == 0 or negate a helper rule.
#   - `not f(ref)` where ref may be undefined (`not is_number(input.run.usage.tool_calls)`): true in
#     regorus, but OPA first binds ref to a variable outside the `not`, so the whole rule is
#     undefined there. Put the reference inside a helper rule and negate the rule (`not has_agent`).
#   - A rule head built from a value that may be undefined (`sprintf("unknown tool %s", [tool_name])`):
#     the interpreter and OPA leave the element out, regorus's compiled VM adds "<undefined>". The
#     body names the value first (`tool_name`) so every engine skips the rule.
package warden.authz

import rego.v1

default decision := {"effect": "deny", "reasons": ["no rule allows this request (deny by default)"]}

decision := {"effect": "deny", "reasons": sort(deny)} if count(deny) > 0

decision := {"effect": "require_approval", "reasons": array.concat(sort(approval), sort(grants))} if {
	count(deny) == 0
	count(approval) > 0
	allowed
}

decision := {"effect": "allow", "reasons": sort(grants)} if {
	count(deny) == 0
	count(approval) == 0
	allowed
}

# Each action's own findings, gathered behind one check of the action. The sets are written in
# the action's file (`tool_call_denials` in tools.rego, and so on); a request pays only for its
# own action's rules, because the compiled VM spends about a microsecond on every definition of a
# set it tries, even one whose first line fails, and `warden policy replay` re-decides every
# recorded request. The rules here and in runs.rego concern every action.
deny contains reason if {
	tool_call
	some reason in tool_call_denials
}

deny contains reason if {
	model_call
	some reason in model_call_denials
}

deny contains reason if {
	approval_answer
	some reason in answer_denials
}

deny contains reason if {
	control_action
	some reason in control_denials
}

deny contains reason if {
	policy_action
	some reason in policy_change_denials
}

grants contains reason if {
	tool_call
	some reason in tool_call_grants
}

grants contains reason if {
	model_call
	some reason in model_call_grants
}

grants contains reason if {
	approval_answer
	some reason in answer_grants
}

grants contains reason if {
	control_action
	some reason in control_grants
}

grants contains reason if {
	policy_action
	some reason in policy_change_grants
}

approval contains reason if {
	tool_call
	some reason in tool_call_approvals
}

# The actions the gate asks about.
actions := {
	"run.start", "tool.call", "model.call", "approval.answer", "run.cancel", "halt", "halt.lift",
	"policy.change",
}

# Stopping work (controls.rego) is about a run or a scope, not about running an agent.
control_actions := {"run.cancel", "halt", "halt.lift"}

control_action if input.action in control_actions

# Changing the installation's policy (policy.rego) is about no agent either.
policy_action if input.action == "policy.change"

agent_action if {
	not control_action
	not policy_action
}

# Every request names these as non-empty strings; without them no other rule can judge it.
required_fields := ["action", "tenant", "principal"]

deny contains sprintf("input.%s must be a non-empty string", [field]) if {
	some field in required_fields
	not has_field(field)
}

has_field(field) if non_empty_string(input[field])

deny contains "input.agent must be a non-empty string" if {
	agent_action
	not has_agent
}

has_agent if non_empty_string(input.agent)

deny contains sprintf("unknown action %s (expected one of: %s)", [input.action, concat(", ", sort(actions))]) if {
	non_empty_string(input.action)
	not input.action in actions
}

non_empty_string(value) if {
	is_string(value)
	value != ""
}

# Numbers both engines hold alike. regorus keeps a number as a double, OPA as an exact decimal, so
# past 2^53 they add, compare and print it differently (2^64 + 3 prints as 18446744073709552000 in
# one and 18446744073709551619 in the other): a count beyond that is refused, never judged.
max_safe_integer := 9007199254740991

whole_count(value) if {
	is_number(value)
	abs(value) <= max_safe_integer
	value == round(value)
}

# An amount of USD: at most a billion, so that in micro-USD it is still a whole number below 2^53.
usd_amount(value) if {
	is_number(value)
	abs(value) <= 1000000000
}

# An amount as reasons print it: rounded to micro-USD. Printed as given, 1e-07 reads "1e-07" in OPA
# (the input's own digits) and "0.0000001" in regorus; a rounded result prints alike in both.
usd(value) := round(value * 1000000) / 1000000
