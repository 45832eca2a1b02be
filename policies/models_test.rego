# Unit tests for model calls (models.rego): the tenant's models, priced models only, token and cost caps.
package warden.authz_test

import rego.v1

model_call(tenant, principal, model, input_tokens, output_tokens, cost_usd) := {
	"action": "model.call",
	"tenant": tenant,
	"principal": principal,
	"agent": "assistant",
	"tool": null,
	"model": {"name": model, "max_output_tokens": 512},
	"run": {"id": "R1", "usage": {
		"steps": 0, "tool_calls": 0, "model_calls": 0,
		"input_tokens": input_tokens, "output_tokens": output_tokens, "cost_usd": cost_usd,
	}},
}

test_a_model_the_tenant_may_use_is_allowed if {
	decision := data.warden.authz.decision with input as model_call("acme", "alice", "gpt-4o-mini", 100, 50, 0.001)
	decision == {
		"effect": "allow",
		"reasons": [
			"principal alice in tenant acme has roles [operator]; operator may run assistant",
			"run R1 is under its caps: 150 of 20000 tokens, 0.001 of 0.05 USD",
			"tenant acme may use model gpt-4o-mini",
		],
	}
}

test_a_model_the_tenant_may_not_use_is_denied if {
	decision := data.warden.authz.decision with input as model_call("globex", "gina", "gpt-4o-mini", 0, 0, 0)
	decision == {"effect": "deny", "reasons": ["tenant globex may not use model gpt-4o-mini"]}
}

test_a_model_without_a_price_is_denied if {
	decision := data.warden.authz.decision with input as model_call("acme", "alice", "gpt-5-unpriced", 0, 0, 0)
	decision == {"effect": "deny", "reasons": ["unknown model gpt-5-unpriced: the policy data has no price for it"]}
}

test_the_token_cap_stops_the_next_model_call if {
	under := data.warden.authz.decision with input as model_call("acme", "alice", "warden-test-model", 15000, 4999, 0)
	under.effect == "allow"
	at := data.warden.authz.decision with input as model_call("acme", "alice", "warden-test-model", 15000, 5000, 0)
	at == {"effect": "deny", "reasons": ["run R1 has used 20000 tokens; agent assistant may use at most 20000 per run"]}
}

test_the_cost_cap_stops_the_next_model_call if {
	decision := data.warden.authz.decision with input as model_call("acme", "alice", "warden-test-model", 10, 10, 0.05)
	decision == {"effect": "deny", "reasons": ["run R1 has cost 0.05 USD; agent assistant may spend at most 0.05 USD per run"]}
}

test_a_viewer_may_not_call_the_model_of_an_agent_they_may_not_run if {
	decision := data.warden.authz.decision with input as model_call("acme", "bob", "warden-test-model", 0, 0, 0)
	decision.effect == "deny"
	decision.reasons == ["principal bob in tenant acme has roles [viewer]; none of them may run assistant"]
}

test_a_model_call_without_a_model_name_is_denied if {
	request := object.union(model_call("acme", "alice", "x", 0, 0, 0), {"model": {"name": ""}})
	decision := data.warden.authz.decision with input as request
	decision.effect == "deny"
	"model.call needs model.name as a non-empty string" in decision.reasons
}

test_a_model_call_without_usage_is_denied if {
	request := json.patch(model_call("acme", "alice", "warden-test-model", 0, 0, 0), [{"op": "remove", "path": "/run/usage"}])
	decision := data.warden.authz.decision with input as request
	decision.effect == "deny"
	"model.call needs run.usage with input_tokens and output_tokens as whole numbers (their sum below 2^53) and cost_usd as a number of at most 10^9" in decision.reasons
}

test_token_counts_past_2_to_the_53_are_refused if {
	decision := data.warden.authz.decision with input as model_call("acme", "alice", "gpt-4o-mini", 9007199254740991, 2, 0)
	decision.effect == "deny"
	"model.call needs run.usage with input_tokens and output_tokens as whole numbers (their sum below 2^53) and cost_usd as a number of at most 10^9" in decision.reasons
}

# Costs print rounded to micro-USD, so both engines print 1e-07 (and every other cost) alike.
test_costs_are_printed_in_micro_usd if {
	decision := data.warden.authz.decision with input as model_call("acme", "alice", "gpt-4o-mini", 1, 2, 0.0000001)
	"run R1 is under its caps: 3 of 20000 tokens, 0 of 0.05 USD" in decision.reasons
	over := data.warden.authz.decision with input as model_call("acme", "alice", "gpt-4o-mini", 1, 2, 0.1234567)
	"run R1 has cost 0.123457 USD; agent assistant may spend at most 0.05 USD per run" in over.reasons
}
