# Which tools an agent may call, with which arguments, how often per run, and which need a human.
#
# Its findings are the sets `tool_call_denials`, `tool_call_grants` and `tool_call_approvals`, which
# authz.rego adds to the decision of a tool call only.
package warden.authz

import rego.v1

tool_call if input.action == "tool.call"

tool_name := input.tool.name if non_empty_string(input.tool.name)

known_tool if is_object(data.warden.tools[tool_name])

tool_allowed if tool_name in data.warden.agents[input.agent].tools

allowed if {
	tool_call
	may_run_agent
	tool_allowed
	arguments_allowed
	under_tool_call_cap
	definition_approved
}

tool_call_denials contains "tool.call needs tool.name as a non-empty string" if {
	not tool_name
}

tool_call_denials contains sprintf("unknown tool %s", [tool_name]) if {
	tool_name
	not known_tool
}

tool_call_denials contains sprintf("tool %s is not allowed for agent %s", [tool_name, input.agent]) if {
	known_tool
	known_agent
	not tool_allowed
}

tool_call_grants contains sprintf("tool %s is allowed for agent %s", [tool_name, input.agent]) if {
	tool_allowed
}

# --- Argument constraints ---------------------------------------------------------------------

# A tool with `allowed_domains` may only be given a `url` argument whose host is one of them or a
# subdomain of one.
domain_restricted if is_array(data.warden.tools[tool_name].allowed_domains)

arguments_allowed if not domain_restricted

arguments_allowed if host_allowed

# The url's host, lower-cased, without port or trailing dot. The authority must be a plain host
# name (and optional port): userinfo ("a@b"), backslashes, percent-encoding or spaces make it
# undefined, so urls that different parsers read differently are refused rather than guessed at.
# It is checked to be ASCII before it is lowered: lower() of other letters differs between
# engines (OPA lowers U+0130 to an ASCII "i", so "İnfo.example.com" would become an allowed
# host there), and no host name needs them (internationalised names travel as xn--).
url_host := host if {
	url := input.tool.arguments.url
	is_string(url)
	parts := regex.find_all_string_submatch_n(`^[hH][tT][tT][pP][sS]?://([^/?#]*)`, url, 1)
	authority := parts[0][1]
	regex.match(`^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?(:[0-9]{1,5})?$`, authority)
	host := trim_suffix(split(lower(authority), ":")[0], ".")
}

host_allowed if {
	domain_restricted
	some domain in data.warden.tools[tool_name].allowed_domains
	host_in_domain(url_host, lower(domain))
}

host_in_domain(host, domain) if host == domain

host_in_domain(host, domain) if endswith(host, concat("", [".", domain]))

tool_call_denials contains sprintf("tool %s needs a url argument that is an http(s) url with a plain host name", [tool_name]) if {
	domain_restricted
	not url_host
}

tool_call_denials contains msg if {
	domain_restricted
	is_string(url_host)
	not host_allowed
	domains := concat(", ", data.warden.tools[tool_name].allowed_domains)
	msg := sprintf("host %s is not in %s's allowed domains [%s]", [url_host, tool_name, domains])
}

tool_call_grants contains sprintf("host %s is in %s's allowed domains", [url_host, tool_name]) if {
	host_allowed
}

# --- Secret arguments -------------------------------------------------------------------------

# Arguments that policy data marks secret reach the gate only as the runner's keyed hash
# (`hmac-sha256:<64 hex digits>`). One in clear is already on the record: deny, and say so.
tool_call_denials contains sprintf("argument %s of tool %s is secret and arrived in clear", [name, tool_name]) if {
	# Over the arguments given (not a lookup of each marked name, which may be undefined: regorus's
	# compiled VM then takes `not concealed(value)` as true, where OPA and its interpreter do not).
	# Arguments that are no object hold no names (regorus's interpreter fails on `some .. in` them).
	is_object(input.tool.arguments)
	some name, value in input.tool.arguments
	name in object.get(data.warden.tools, [tool_name, "secret_arguments"], [])
	not concealed(value)
}

concealed(value) if {
	is_string(value)
	regex.match(`^hmac-sha256:[0-9a-f]{64}$`, value)
}

# --- Pinned definitions (tools from MCP servers) ----------------------------------------------

# A tool from an MCP server comes with the digest of its definition (name, description, input
# schema) as the server describes it now. A server can change what it says a tool does at any
# time, which steers the model (an MCP "rug pull"), so the definition an operator approved is
# pinned in the data (`tools.<name>.digest`); any other definition blocks the tool until the
# new one is approved by pinning its digest.
offered_digest := input.tool.digest if is_string(input.tool.digest)

pinned_digest := data.warden.tools[tool_name].digest if is_string(data.warden.tools[tool_name].digest)

has_offered_digest if offered_digest

has_pinned_digest if pinned_digest

definition_approved if {
	not has_offered_digest
	not has_pinned_digest
}

definition_approved if offered_digest == pinned_digest

tool_call_denials contains sprintf("tool %s comes from a tool server and no definition of it is approved (pin its digest %s)", [tool_name, offered_digest]) if {
	known_tool
	has_offered_digest
	not has_pinned_digest
}

tool_call_denials contains sprintf("the definition of tool %s changed since it was approved (now %s, approved %s): blocked until the new one is approved", [tool_name, offered_digest, pinned_digest]) if {
	has_offered_digest
	has_pinned_digest
	offered_digest != pinned_digest
}

tool_call_denials contains sprintf("tool %s has a pinned definition but its server did not describe it (is the server there?)", [tool_name]) if {
	has_pinned_digest
	not has_offered_digest
}

tool_call_grants contains sprintf("tool %s is as approved (%s)", [tool_name, pinned_digest]) if {
	offered_digest == pinned_digest
}

# --- Tool calls per run ---------------------------------------------------------------------

# The agent's own cap, else the default for every run.
tool_call_cap := object.get(data.warden.agents, [input.agent, "max_tool_calls"], data.warden.limits.max_tool_calls_per_run)

# Calls the run has already made; the call being decided would be number tool_calls_made + 1.
tool_calls_made := input.run.usage.tool_calls if whole_count(input.run.usage.tool_calls)

has_tool_calls_made if is_number(tool_calls_made)

has_tool_call_cap if is_number(tool_call_cap)

under_tool_call_cap if tool_calls_made < tool_call_cap

default run_id := "(unknown)"

run_id := input.run.id if non_empty_string(input.run.id)

tool_call_denials contains "tool.call needs run.usage.tool_calls as a whole number below 2^53" if {
	not has_tool_calls_made
}

tool_call_denials contains msg if {
	is_number(tool_calls_made)
	is_number(tool_call_cap)
	has_agent # printed with %s below: OPA prints a number there as "%!s(float64=1.5)", regorus as "1.5"
	not under_tool_call_cap
	msg := sprintf(
		"run %v has already made %v tool calls; agent %s may make at most %v per run",
		[run_id, tool_calls_made, input.agent, tool_call_cap]
	)
}

tool_call_denials contains sprintf("no tool-call cap is configured for agent %s", [input.agent]) if {
	has_agent
	not has_tool_call_cap
}

tool_call_grants contains sprintf("tool call %v of at most %v for run %v", [tool_calls_made + 1, tool_call_cap, run_id]) if {
	under_tool_call_cap
}

# --- Human approval ---------------------------------------------------------------------------

tool_call_approvals contains sprintf("tool %s requires human approval", [tool_name]) if {
	data.warden.tools[tool_name].requires_approval == true
}

# --- What the run did before (run.history) -----------------------------------------------------

# The run has read content no one vouches for: an earlier call that ran (outcome "ok") of a tool
# whose output is marked untrusted (a fetched web page can carry instructions for the model).
read_untrusted contains call.tool if {
	calls := object.get(input, ["run", "history", "tool_calls"], [])
	is_array(calls)
	some call in calls
	call.outcome == "ok"
	object.get(data.warden.tools, [call.tool, "untrusted_output"], false) == true
}

# Once it has, a tool that sends data out needs a human: what it sends may be what the untrusted
# content asked the model to send.
tool_call_approvals contains msg if {
	object.get(data.warden.tools, [tool_name, "sends_data_out"], false) == true
	count(read_untrusted) > 0
	msg := sprintf(
		"tool %s sends data out, and this run has read untrusted content (%s)",
		[tool_name, concat(", ", sort(read_untrusted))]
	)
}
