# Who may answer a tool call that awaits approval (action "approval.answer").
#
# The gate asks this when a principal approves or rejects a call. "allow" means the answer
# counts: the principal holds a role that may approve the tool and did not ask for the run
# (four eyes). "deny" means it does not count; the call still waits for someone who may answer.
# Whether the call then runs is the answer's (approve or reject), not this decision's.
#
# Its findings are the sets `answer_denials` and `answer_grants`, which authz.rego adds to the
# decision of an approval answer only.
package warden.authz

import rego.v1

approval_answer if input.action == "approval.answer"

approval_tool := input.tool.name if non_empty_string(input.tool.name)

# The roles that may approve the tool: its own `approver_roles`, else the default in `approvals`.
# (Never `object.get(data.warden, ...)`: `data.warden` holds this package's rules too, and reading
# it whole from a rule is a cycle.)
default default_approver_roles := []

default_approver_roles := data.warden.approvals.approver_roles

approver_roles := object.get(data.warden.tools, [approval_tool, "approver_roles"], default_approver_roles)

approving_roles contains role if {
	some role in principal_roles
	role in approver_roles
}

may_approve if count(approving_roles) > 0

# The principal who asked for the run is the one whose request is being approved.
own_request if input.principal == input.approval.requested_by

has_requester if non_empty_string(input.approval.requested_by)

not_own_request if {
	has_requester
	not own_request
}

allowed if {
	approval_answer
	approval_tool
	may_approve
	not_own_request
}

answer_denials contains "approval.answer needs tool.name as a non-empty string" if {
	not approval_tool
}

answer_denials contains "approval.answer needs approval.requested_by as a non-empty string" if {
	not has_requester
}

answer_denials contains sprintf("%s asked for this run and may not answer its own request (four eyes)", [input.principal]) if {
	own_request
}

answer_denials contains msg if {
	approval_tool
	known_principal
	not may_approve
	msg := sprintf(
		"principal %s in tenant %s has roles [%s]; none of them may approve %s (roles that may: [%s])",
		[input.principal, input.tenant, concat(", ", principal_roles), approval_tool, concat(", ", approver_roles)]
	)
}

answer_grants contains msg if {
	some role in approving_roles
	msg := sprintf("principal %s may approve %s as %s", [input.principal, approval_tool, role])
}

answer_grants contains sprintf("%s is not the principal who asked for the run (%s)", [input.principal, input.approval.requested_by]) if {
	not_own_request
}
