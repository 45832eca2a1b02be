# Who may change the installation's policy (action "policy.change"): load a candidate bundle as
# the shadow, promote it or withdraw it, roll back.
#
# The policy decides every decision, so changing it is the most powerful thing anyone can do:
# only a principal of the installation's own tenant `_warden` whose role says
# `"policy_change": true` (the starter data: the principal `operator`, the stack's own CLI) may.
# A role of a customer's tenant never grants it, whatever it says.
#
# Its findings are the sets `policy_change_denials` and `policy_change_grants`, which authz.rego
# adds to the decision of a policy change only.
package warden.authz

import rego.v1

policy_tenant := "_warden"

policy_roles contains role if {
	policy_action
	input.tenant == policy_tenant
	some role in principal_roles
	object.get(data.warden.roles, [role, "policy_change"], false) == true
}

may_change_policy if count(policy_roles) > 0

allowed if {
	policy_action
	may_change_policy
}

policy_change_denials contains sprintf("policy is changed in the installation's tenant %s only, not in %s", [policy_tenant, input.tenant]) if {
	non_empty_string(input.tenant)
	input.tenant != policy_tenant
}

policy_change_denials contains msg if {
	input.tenant == policy_tenant
	known_principal
	not may_change_policy
	msg := sprintf(
		"principal %s in tenant %s has roles [%s]; none of them may change policy",
		[input.principal, input.tenant, concat(", ", principal_roles)]
	)
}

# The change is named first, so that no engine builds a reason from an undefined value.
policy_change_grants contains msg if {
	change := input.policy.change
	is_string(change)
	some role in policy_roles
	msg := sprintf("principal %s in tenant %s may %s policy as %s", [input.principal, input.tenant, change, role])
}
