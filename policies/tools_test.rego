# Unit tests for tool calls (tools.rego): allowlists, url domains, the per-run cap, approvals.
package warden.authz_test

import rego.v1

test_allowed_tool_call_lists_every_grant if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "math.add", {"a": 1, "b": 2}, 1)
	decision == {
		"effect": "allow",
		"reasons": [
			"principal alice in tenant acme has roles [operator]; operator may run demo",
			"tool call 2 of at most 10 for run R1",
			"tool math.add is allowed for agent demo",
		],
	}
}

test_tool_outside_the_agents_allowlist_is_denied if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "clock.sleep", {"seconds": 1}, 0)
	decision == {"effect": "deny", "reasons": ["tool clock.sleep is not allowed for agent demo"]}
}

test_slow_agent_may_only_sleep if {
	sleep := data.warden.authz.decision with input as tool_call("alice", "slow", "clock.sleep", {"seconds": 1}, 0)
	sleep.effect == "allow"
	echo := data.warden.authz.decision with input as tool_call("alice", "slow", "text.echo", {"text": "hi"}, 0)
	echo == {"effect": "deny", "reasons": ["tool text.echo is not allowed for agent slow"]}
}

test_unknown_tool_is_denied if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "shell.exec", {}, 0)
	decision == {"effect": "deny", "reasons": ["unknown tool shell.exec"]}
}

test_tool_call_without_a_tool_name_is_denied if {
	request := object.union(tool_call("alice", "demo", "math.add", {}, 0), {"tool": null})
	decision := data.warden.authz.decision with input as request
	decision == {"effect": "deny", "reasons": ["tool.call needs tool.name as a non-empty string"]}
}

test_url_on_an_allowed_domain_is_allowed if {
	decision := data.warden.authz.decision with input as fetch("https://example.com/x")
	decision.effect == "allow"
	"host example.com is in web.fetch's allowed domains" in decision.reasons
}

test_url_on_a_subdomain_of_an_allowed_domain_is_allowed if {
	decision := data.warden.authz.decision with input as fetch("https://www.example.com/x")
	decision.effect == "allow"
	"host www.example.com is in web.fetch's allowed domains" in decision.reasons
}

test_host_is_compared_without_case_port_or_trailing_dot if {
	decision := data.warden.authz.decision with input as fetch("HTTPS://Docs.Python.ORG.:443/3/?q=1")
	decision.effect == "allow"
	"host docs.python.org is in web.fetch's allowed domains" in decision.reasons
}

test_host_outside_the_allowed_domains_is_denied if {
	decision := data.warden.authz.decision with input as fetch("https://evil.com/x")
	decision == {
		"effect": "deny",
		"reasons": ["host evil.com is not in web.fetch's allowed domains [example.com, docs.python.org]"],
	}
}

test_lookalike_hosts_are_denied if {
	every url in ["https://example.com.evil.net/", "https://notexample.com/", "https://example.co/"] {
		decision := data.warden.authz.decision with input as fetch(url)
		decision.effect == "deny"
	}
}

test_urls_that_parsers_disagree_on_are_denied if {
	every url in [
		"https://example.com@evil.com/",
		"https://evil.com\\@example.com/",
		"https://evil.com%2fexample.com/",
		"https://exa mple.com/",
		" https://example.com/",
	] {
		decision := data.warden.authz.decision with input as fetch(url)
		decision == {
			"effect": "deny",
			"reasons": ["tool web.fetch needs a url argument that is an http(s) url with a plain host name"],
		}
	}
}

test_non_http_or_missing_url_is_denied if {
	ftp := data.warden.authz.decision with input as fetch("ftp://example.com/x")
	ftp.effect == "deny"
	missing := data.warden.authz.decision with input as tool_call("alice", "researcher", "web.fetch", {}, 0)
	missing.effect == "deny"
	not_a_string := data.warden.authz.decision with input as fetch(["https://example.com/"])
	not_a_string.effect == "deny"
}

test_tool_calls_up_to_the_default_cap_are_allowed if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "math.add", {}, 9)
	decision.effect == "allow"
	"tool call 10 of at most 10 for run R1" in decision.reasons
}

test_tool_call_at_the_default_cap_is_denied if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "math.add", {}, 10)
	decision == {
		"effect": "deny",
		"reasons": ["run R1 has already made 10 tool calls; agent demo may make at most 10 per run"],
	}
}

test_agent_cap_overrides_the_default if {
	allowed := data.warden.authz.decision with input as tool_call("alice", "researcher", "math.add", {}, 19)
	allowed.effect == "allow"
	denied := data.warden.authz.decision with input as tool_call("alice", "researcher", "math.add", {}, 20)
	denied.effect == "deny"
}

test_default_cap_comes_from_data if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "math.add", {}, 1)
		with data.warden.limits.max_tool_calls_per_run as 1
	decision.effect == "deny"
}

test_tool_call_without_usage_is_denied if {
	# object.union merges objects recursively, so the run is replaced, not merged.
	request := object.union(object.remove(tool_call("alice", "demo", "math.add", {}, 0), ["run"]), {"run": {"id": "R1"}})
	decision := data.warden.authz.decision with input as request
	decision == {"effect": "deny", "reasons": ["tool.call needs run.usage.tool_calls as a whole number below 2^53"]}
}

test_tool_call_without_a_configured_cap_is_denied if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "math.add", {}, 0)
		with data.warden.limits as {}
	decision == {"effect": "deny", "reasons": ["no tool-call cap is configured for agent demo"]}
}

test_refund_requires_approval if {
	decision := data.warden.authz.decision with input as tool_call("carol", "refunds", "payments.refund", {"amount": 5}, 0)
	decision.effect == "require_approval"
	decision.reasons[0] == "tool payments.refund requires human approval"
	"tool payments.refund is allowed for agent refunds" in decision.reasons
}

test_approval_tools_still_need_the_allowlist if {
	decision := data.warden.authz.decision with input as tool_call("alice", "researcher", "payments.refund", {"amount": 5}, 0)
	decision == {"effect": "deny", "reasons": ["tool payments.refund is not allowed for agent researcher"]}
}

# --- Secret arguments -------------------------------------------------------------------------

concealed_token := "hmac-sha256:5f0c1d8a9e2b4c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d"

test_a_concealed_secret_argument_is_allowed if {
	arguments := {"url": "https://example.com/", "authorization": concealed_token}
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "web.fetch", arguments, 0)
	decision.effect == "allow"
}

test_a_secret_argument_in_clear_is_denied if {
	arguments := {"url": "https://example.com/", "authorization": "Bearer s3cr3t"}
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "web.fetch", arguments, 0)
	decision == {"effect": "deny", "reasons": ["argument authorization of tool web.fetch is secret and arrived in clear"]}
}

test_a_secret_argument_that_only_looks_concealed_is_denied if {
	arguments := {"url": "https://example.com/", "authorization": "hmac-sha256:not-a-digest"}
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "web.fetch", arguments, 0)
	decision.effect == "deny"
}

# --- Pinned definitions -----------------------------------------------------------------------

pinned_tools := {"notes.add_note": {"digest": "sha256:approved"}}

add_note(digest) := object.union(tool_call("alice", "demo", "notes.add_note", {"text": "hi"}, 0), {"tool": {"digest": digest}})

test_a_tool_whose_definition_is_as_approved_is_allowed if {
	decision := data.warden.authz.decision with input as add_note("sha256:approved")
		with data.warden.tools as pinned_tools
		with data.warden.agents.demo.tools as ["notes.add_note"]
	decision.effect == "allow"
	"tool notes.add_note is as approved (sha256:approved)" in decision.reasons
}

test_a_changed_definition_blocks_the_tool if {
	decision := data.warden.authz.decision with input as add_note("sha256:changed")
		with data.warden.tools as pinned_tools
		with data.warden.agents.demo.tools as ["notes.add_note"]
	decision == {"effect": "deny", "reasons": ["the definition of tool notes.add_note changed since it was approved (now sha256:changed, approved sha256:approved): blocked until the new one is approved"]}
}

test_a_tool_server_tool_with_no_approved_definition_is_denied if {
	decision := data.warden.authz.decision with input as add_note("sha256:approved")
		with data.warden.tools as {"notes.add_note": {}}
		with data.warden.agents.demo.tools as ["notes.add_note"]
	decision.effect == "deny"
	decision.reasons == ["tool notes.add_note comes from a tool server and no definition of it is approved (pin its digest sha256:approved)"]
}

test_a_pinned_tool_asked_for_without_its_definition_is_denied if {
	request := tool_call("alice", "demo", "notes.add_note", {"text": "hi"}, 0)
	decision := data.warden.authz.decision with input as request
		with data.warden.tools as pinned_tools
		with data.warden.agents.demo.tools as ["notes.add_note"]
	decision.reasons == ["tool notes.add_note has a pinned definition but its server did not describe it (is the server there?)"]
}

# --- Run history: untrusted content, then sending data out -----------------------------------

post_after(history) := object.union(
	tool_call("alice", "reporter", "http.post", {"url": "https://example.com/reports", "body": "x"}, 1),
	{"run": {"history": {"tool_calls": history}}},
)

test_sending_data_out_after_reading_untrusted_content_needs_approval if {
	decision := data.warden.authz.decision with input as post_after([{"tool": "web.fetch", "outcome": "ok", "host": "example.com"}])
	decision.effect == "require_approval"
	decision.reasons[0] == "tool http.post sends data out, and this run has read untrusted content (web.fetch)"
}

test_sending_data_out_with_nothing_untrusted_read_is_allowed if {
	decision := data.warden.authz.decision with input as post_after([{"tool": "text.echo", "outcome": "ok", "host": null}])
	decision.effect == "allow"
}

test_a_refused_or_failed_fetch_read_nothing if {
	history := [
		{"tool": "web.fetch", "outcome": "refused", "host": "evil.example.net"},
		{"tool": "web.fetch", "outcome": "error", "host": "example.com"},
	]
	decision := data.warden.authz.decision with input as post_after(history)
	decision.effect == "allow"
}

test_a_request_without_history_is_judged_on_the_call_alone if {
	decision := data.warden.authz.decision with input as tool_call("alice", "reporter", "http.post", {"url": "https://example.com/r", "body": "x"}, 0)
	decision.effect == "allow"
}

test_a_post_off_its_allowed_domains_is_denied_whatever_the_history if {
	request := object.union(post_after([]), {"tool": {"arguments": {"url": "https://evil.example.net/", "body": "x"}}})
	decision := data.warden.authz.decision with input as request
	decision.effect == "deny"
}

# lower() of non-ASCII letters differs between engines (OPA lowers U+0130 to an ASCII "i"), so a
# host is checked to be ASCII before it is lowered: this one is refused on both, not allowed on OPA.
test_a_host_with_non_ascii_letters_is_refused if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "web.fetch", {"url": "https://\u0130nfo.example.com/"}, 0)
	decision == {"effect": "deny", "reasons": ["tool web.fetch needs a url argument that is an http(s) url with a plain host name"]}
}

test_an_upper_case_scheme_and_host_are_allowed if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "web.fetch", {"url": "HTTPS://WWW.EXAMPLE.COM/"}, 0)
	"host www.example.com is in web.fetch's allowed domains" in decision.reasons
	decision.effect == "allow"
}

# Past 2^53 regorus and OPA add and print numbers differently: such a count is refused, not judged.
test_a_tool_call_count_past_2_to_the_53_is_refused if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "math.add", {}, 9007199254740993)
	decision == {"effect": "deny", "reasons": ["tool.call needs run.usage.tool_calls as a whole number below 2^53"]}
}

test_a_fractional_tool_call_count_is_refused if {
	decision := data.warden.authz.decision with input as tool_call("alice", "demo", "math.add", {}, 2.5)
	decision == {"effect": "deny", "reasons": ["tool.call needs run.usage.tool_calls as a whole number below 2^53"]}
}

# With no tool name there is no "unknown tool ..." reason (regorus's VM once gave "<undefined>").
test_a_tool_call_with_arguments_but_no_name_has_one_reason if {
	request := object.union(tool_call("alice", "demo", "math.add", {}, 0), {"tool": {"name": "", "arguments": {}}})
	decision := data.warden.authz.decision with input as request
	decision == {"effect": "deny", "reasons": ["tool.call needs tool.name as a non-empty string"]}
}
