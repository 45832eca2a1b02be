# Unit tests for stopping work (controls.rego): who may cancel, halt and lift a halt.
package warden.authz_test

import rego.v1

control(action, principal, agent, scope) := {
	"action": action,
	"tenant": "acme",
	"principal": principal,
	"agent": agent,
	"tool": null,
	"model": null,
	"control": {"reason": "incident 42", "scope": scope},
	"run": null,
}

test_an_operator_may_halt_a_tenant if {
	decision := data.warden.authz.decision with input as control("halt", "alice", null, "tenant")
	decision == {"effect": "allow", "reasons": ["principal alice in tenant acme may halt as operator"]}
}

test_an_operator_may_halt_an_agent_and_lift_it if {
	halted := data.warden.authz.decision with input as control("halt", "alice", "slow", "agent")
	halted.effect == "allow"
	lifted := data.warden.authz.decision with input as control("halt.lift", "alice", "slow", "agent")
	lifted.effect == "allow"
}

test_an_operator_may_cancel_a_run if {
	request := object.union(control("run.cancel", "alice", null, "tenant"), {"run": {"id": "R1"}})
	decision := data.warden.authz.decision with input as request
	decision.effect == "allow"
}

test_a_viewer_may_not_halt if {
	decision := data.warden.authz.decision with input as control("halt", "bob", null, "tenant")
	decision == {"effect": "deny", "reasons": ["principal bob in tenant acme has roles [viewer]; none of them may halt"]}
}

test_running_an_agent_is_not_enough_to_cancel if {
	# carol may run refunds as support, which lists no controls.
	decision := data.warden.authz.decision with input as control("run.cancel", "carol", null, "tenant")
	decision.effect == "deny"
}

test_an_unknown_principal_may_not_halt if {
	decision := data.warden.authz.decision with input as control("halt", "mallory", null, "tenant")
	decision == {"effect": "deny", "reasons": ["principal mallory is not known in tenant acme"]}
}

test_a_halt_of_an_agent_names_the_agent if {
	decision := data.warden.authz.decision with input as control("halt", "alice", null, "agent")
	decision == {"effect": "deny", "reasons": ["halt of an agent needs input.agent as a non-empty string"]}
}

test_a_role_given_controls_may_use_them if {
	decision := data.warden.authz.decision with input as control("run.cancel", "carol", null, "tenant")
		with data.warden.roles.support.controls as ["run.cancel"]
	decision.effect == "allow"
}

test_an_agent_action_still_needs_an_agent if {
	request := {"action": "run.start", "tenant": "acme", "principal": "alice", "agent": null}
	decision := data.warden.authz.decision with input as request
	"input.agent must be a non-empty string" in decision.reasons
}
