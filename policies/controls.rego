# Who may stop work: cancel a run (action "run.cancel"), halt a tenant or one of its agents
# ("halt"), and lift a halt ("halt.lift").
#
# A role lists the controls it may use in `roles.<role>.controls` (the starter data: operators
# may use all three). A halt stops every run in its scope at once, so it is for operators, not
# for whoever happens to run an agent. The principal who submitted a run is not, by that alone,
# allowed to cancel it: the gate would have to read the run's submission to know who that was,
# and a tenant that wants it can give its submitters a role with "run.cancel".
#
# Its findings are the sets `control_denials` and `control_grants`, which authz.rego adds to the
# decision of a control action only.
package warden.authz

import rego.v1

control_roles contains role if {
	control_action
	some role in principal_roles
	input.action in object.get(data.warden.roles, [role, "controls"], [])
}

may_control if count(control_roles) > 0

halt_of_an_agent if {
	input.action in {"halt", "halt.lift"}
	input.control.scope == "agent"
}

allowed if {
	control_action
	may_control
}

control_denials contains msg if {
	known_principal
	not may_control
	msg := sprintf(
		"principal %s in tenant %s has roles [%s]; none of them may %s",
		[input.principal, input.tenant, concat(", ", principal_roles), input.action]
	)
}

control_denials contains sprintf("%s of an agent needs input.agent as a non-empty string", [input.action]) if {
	halt_of_an_agent
	not has_agent
}

control_grants contains msg if {
	some role in control_roles
	msg := sprintf("principal %s in tenant %s may %s as %s", [input.principal, input.tenant, input.action, role])
}
