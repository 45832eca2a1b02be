# Unit tests for who may run which agent (runs.rego).
package warden.authz_test

import rego.v1

test_operator_may_run_researcher if {
	decision := data.warden.authz.decision with input as run_start("acme", "alice", "researcher")
	decision == {
		"effect": "allow",
		"reasons": ["principal alice in tenant acme has roles [operator]; operator may run researcher"],
	}
}

test_viewer_may_run_no_agent if {
	every agent, _ in data.warden.agents {
		decision := data.warden.authz.decision with input as run_start("acme", "bob", agent)
		decision.effect == "deny"
		decision.reasons == [sprintf("principal bob in tenant acme has roles [viewer]; none of them may run %s", [agent])]
	}
}

test_any_of_the_principals_roles_may_grant if {
	decision := data.warden.authz.decision with input as run_start("acme", "carol", "refunds")
	decision == {
		"effect": "allow",
		"reasons": ["principal carol in tenant acme has roles [support, viewer]; support may run refunds"],
	}
}

test_unknown_principal_is_denied if {
	decision := data.warden.authz.decision with input as run_start("acme", "mallory", "demo")
	decision == {"effect": "deny", "reasons": ["principal mallory is not known in tenant acme"]}
}

test_unknown_tenant_is_denied if {
	decision := data.warden.authz.decision with input as run_start("initech", "alice", "demo")
	decision == {"effect": "deny", "reasons": ["unknown tenant initech"]}
}

test_principals_belong_to_one_tenant if {
	decision := data.warden.authz.decision with input as run_start("globex", "alice", "demo")
	decision == {"effect": "deny", "reasons": ["principal alice is not known in tenant globex"]}
}

test_other_tenant_has_its_own_principals if {
	allowed := data.warden.authz.decision with input as run_start("globex", "gina", "demo")
	allowed.effect == "allow"
	denied := data.warden.authz.decision with input as run_start("globex", "hank", "demo")
	denied.effect == "deny"
}

test_unknown_agent_is_denied if {
	decision := data.warden.authz.decision with input as run_start("acme", "alice", "ghost")
	decision == {"effect": "deny", "reasons": ["unknown agent ghost"]}
}

test_role_grants_come_from_data if {
	decision := data.warden.authz.decision with input as run_start("acme", "bob", "demo")
		with data.warden.roles.viewer.agents as ["demo"]
	decision.effect == "allow"
}

test_tool_call_needs_the_right_to_run_the_agent if {
	decision := data.warden.authz.decision with input as tool_call("bob", "demo", "math.add", {"a": 1, "b": 2}, 0)
	decision == {
		"effect": "deny",
		"reasons": ["principal bob in tenant acme has roles [viewer]; none of them may run demo"],
	}
}
