# Unit tests for answers to approval requests (review.rego): who may approve, four eyes.
package warden.authz_test

import rego.v1

answer(principal, tool, requested_by) := {
	"action": "approval.answer",
	"tenant": "acme",
	"principal": principal,
	"agent": "refunds",
	"tool": {"name": tool, "arguments": {"amount": 5}},
	"approval": {"id": "A1", "requested_by": requested_by, "approve": true},
	"run": {"id": "R1"},
}

test_an_approver_may_answer_someone_elses_request if {
	decision := data.warden.authz.decision with input as answer("dana", "payments.refund", "carol")
	decision == {
		"effect": "allow",
		"reasons": [
			"dana is not the principal who asked for the run (carol)",
			"principal dana may approve payments.refund as approver",
		],
	}
}

test_the_requester_may_not_approve_their_own_request if {
	decision := data.warden.authz.decision with input as answer("dana", "payments.refund", "dana")
	decision == {"effect": "deny", "reasons": ["dana asked for this run and may not answer its own request (four eyes)"]}
}

test_a_principal_without_an_approver_role_does_not_count if {
	decision := data.warden.authz.decision with input as answer("bob", "payments.refund", "carol")
	decision == {
		"effect": "deny",
		"reasons": ["principal bob in tenant acme has roles [viewer]; none of them may approve payments.refund (roles that may: [approver])"],
	}
}

test_running_the_agent_is_neither_needed_nor_enough_to_approve if {
	# alice may run every operator agent but holds no approver role.
	decision := data.warden.authz.decision with input as answer("alice", "payments.refund", "carol")
	decision.effect == "deny"
	count(decision.reasons) == 1
	startswith(decision.reasons[0], "principal alice in tenant acme has roles [operator]; none of them may approve")
}

test_a_tool_without_its_own_approver_roles_uses_the_default if {
	decision := data.warden.authz.decision with input as answer("dana", "http.post", "alice")
	decision.effect == "allow"
	"principal dana may approve http.post as approver" in decision.reasons
}

test_a_tools_own_approver_roles_replace_the_default if {
	refund := {"requires_approval": true, "approver_roles": ["support"]}
	by_dana := data.warden.authz.decision with input as answer("dana", "payments.refund", "alice")
		with data.warden.tools["payments.refund"] as refund
	by_dana.effect == "deny"
	by_carol := data.warden.authz.decision with input as answer("carol", "payments.refund", "alice")
		with data.warden.tools["payments.refund"] as refund
	by_carol.effect == "allow"
}

test_an_unknown_principal_does_not_count if {
	decision := data.warden.authz.decision with input as answer("mallory", "payments.refund", "carol")
	decision == {"effect": "deny", "reasons": ["principal mallory is not known in tenant acme"]}
}

test_an_answer_without_its_requester_does_not_count if {
	request := json.patch(answer("dana", "payments.refund", "carol"), [{"op": "remove", "path": "/approval/requested_by"}])
	decision := data.warden.authz.decision with input as request
	decision == {"effect": "deny", "reasons": ["approval.answer needs approval.requested_by as a non-empty string"]}
}

test_an_answer_without_a_tool_does_not_count if {
	request := object.union(answer("dana", "payments.refund", "carol"), {"tool": null})
	decision := data.warden.authz.decision with input as request
	decision == {"effect": "deny", "reasons": ["approval.answer needs tool.name as a non-empty string"]}
}
