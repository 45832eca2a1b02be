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
# Written for both regorus (in-process in the gate) and OPA: regorus treats `not x[_]` over an
# empty or missing collection as undefined where OPA gives true, so negations here go through
# helper rules or count(...) == 0 instead.
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

# The actions the gate asks about.
actions := {"run.start", "tool.call", "model.call", "approval.answer", "run.cancel", "halt", "halt.lift"}

# Stopping work (controls.rego) is about a run or a scope, not about running an agent.
control_actions := {"run.cancel", "halt", "halt.lift"}

control_action if input.action in control_actions

agent_action if not control_action

# Every request names these as non-empty strings; without them no other rule can judge it.
required_fields := ["action", "tenant", "principal"]

deny contains sprintf("input.%s must be a non-empty string", [field]) if {
	some field in required_fields
	not non_empty_string(input[field])
}

deny contains "input.agent must be a non-empty string" if {
	agent_action
	not non_empty_string(input.agent)
}

deny contains sprintf("unknown action %s (expected one of: %s)", [input.action, concat(", ", sort(actions))]) if {
	non_empty_string(input.action)
	not input.action in actions
}

non_empty_string(value) if {
	is_string(value)
	value != ""
}
