# Unit tests for changing the installation's policy (policy.rego): only a policy administrator may.
package warden.authz_test

import rego.v1

policy_change(tenant, principal, change) := {
	"action": "policy.change",
	"tenant": tenant,
	"principal": principal,
	"agent": null,
	"tool": null,
	"model": null,
	"run": null,
	"policy": {"change": change, "revision": "sha256:0123456789abcdef", "reason": "ticket 7"},
}

test_the_policy_administrator_may_shadow_promote_withdraw_and_roll_back if {
	every change in ["shadow", "promote", "rollback", "withdraw"] {
		decision := data.warden.authz.decision with input as policy_change("_warden", "operator", change)
		decision == {
			"effect": "allow",
			"reasons": [sprintf("principal operator in tenant _warden may %s policy as policy_admin", [change])],
		}
	}
}

test_another_principal_of_the_installation_may_not if {
	decision := data.warden.authz.decision with input as policy_change("_warden", "auditor", "promote")
	decision == {
		"effect": "deny",
		"reasons": ["principal auditor in tenant _warden has roles [viewer]; none of them may change policy"],
	}
}

test_an_unknown_principal_may_not if {
	decision := data.warden.authz.decision with input as policy_change("_warden", "mallory", "shadow")
	decision == {"effect": "deny", "reasons": ["principal mallory is not known in tenant _warden"]}
}

test_a_tenants_operator_may_not if {
	decision := data.warden.authz.decision with input as policy_change("acme", "alice", "shadow")
	decision == {
		"effect": "deny",
		"reasons": ["policy is changed in the installation's tenant _warden only, not in acme"],
	}
}

test_a_tenants_role_never_grants_it if {
	roles := object.union(data.warden.roles, {"operator": {"agents": [], "policy_change": true}})
	decision := data.warden.authz.decision with input as policy_change("acme", "alice", "rollback")
		with data.warden.roles as roles
	decision.effect == "deny"
}

test_a_role_grants_it_only_when_it_says_true if {
	roles := object.union(data.warden.roles, {"policy_admin": {"agents": [], "policy_change": "yes"}})
	decision := data.warden.authz.decision with input as policy_change("_warden", "operator", "promote")
		with data.warden.roles as roles
	decision.effect == "deny"
}

test_a_policy_change_needs_no_agent if {
	decision := data.warden.authz.decision with input as policy_change("_warden", "operator", "shadow")
	every reason in decision.reasons {
		not contains(reason, "agent")
	}
}
