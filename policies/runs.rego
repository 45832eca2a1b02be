# Who may run which agent: principals hold roles per tenant, roles list the agents they may run.
#
# These rules apply to every action: a tool call is judged against the principal's right to run
# the agent too, so taking a role away stops the tool calls of runs already under way.
package warden.authz

import rego.v1

# The principal's roles in the tenant; undefined when the tenant or the principal is unknown.
principal_roles := data.warden.tenants[input.tenant].principals[input.principal]

known_tenant if is_object(data.warden.tenants[input.tenant])

known_principal if is_array(principal_roles)

known_agent if is_object(data.warden.agents[input.agent])

# The principal's roles that may run the requested agent.
run_roles contains role if {
	some role in principal_roles
	input.agent in data.warden.roles[role].agents
}

may_run_agent if {
	known_agent
	count(run_roles) > 0
}

allowed if {
	input.action == "run.start"
	may_run_agent
}

grants contains msg if {
	agent_action
	input.action != "approval.answer"
	may_run_agent
	some role in run_roles
	msg := sprintf(
		"principal %s in tenant %s has roles [%s]; %s may run %s",
		[input.principal, input.tenant, concat(", ", principal_roles), role, input.agent]
	)
}

deny contains sprintf("unknown tenant %s", [input.tenant]) if {
	non_empty_string(input.tenant)
	not known_tenant
}

deny contains sprintf("principal %s is not known in tenant %s", [input.principal, input.tenant]) if {
	non_empty_string(input.principal)
	known_tenant
	not known_principal
}

deny contains sprintf("unknown agent %s", [input.agent]) if {
	agent_action
	non_empty_string(input.agent)
	not known_agent
}

# An approver need not be allowed to run the agent (see review.rego).
deny contains msg if {
	agent_action
	input.action != "approval.answer"
	known_principal
	known_agent
	count(run_roles) == 0
	msg := sprintf(
		"principal %s in tenant %s has roles [%s]; none of them may run %s",
		[input.principal, input.tenant, concat(", ", principal_roles), input.agent]
	)
}
