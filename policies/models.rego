# Model calls of `llm` agents: which models a tenant may use, and caps on a run's tokens and cost.
#
# Its findings are the sets `model_call_denials` and `model_call_grants`, which authz.rego adds to
# the decision of a model call only.
package warden.authz

import rego.v1

model_call if input.action == "model.call"

model_name := input.model.name if non_empty_string(input.model.name)

# A model is known when the data prices it: a call whose cost cannot be counted is not made.
known_model if is_object(data.warden.models[model_name])

tenant_models := object.get(data.warden.tenants, [input.tenant, "models"], [])

model_allowed_for_tenant if model_name in tenant_models

run_usage := object.get(input, ["run", "usage"], {})

tokens_used := total if {
	whole_count(run_usage.input_tokens)
	whole_count(run_usage.output_tokens)
	total := run_usage.input_tokens + run_usage.output_tokens
	abs(total) <= max_safe_integer
}

cost_used := run_usage.cost_usd if usd_amount(run_usage.cost_usd)

# The agent's own caps, else the defaults for every run.
token_cap := object.get(data.warden.agents, [input.agent, "max_tokens_per_run"], data.warden.limits.max_tokens_per_run)

cost_cap := object.get(data.warden.agents, [input.agent, "max_cost_usd_per_run"], data.warden.limits.max_cost_usd_per_run)

under_token_cap if tokens_used < token_cap

under_cost_cap if cost_used < cost_cap

allowed if {
	model_call
	may_run_agent
	known_model
	model_allowed_for_tenant
	under_token_cap
	under_cost_cap
}

model_call_denials contains "model.call needs model.name as a non-empty string" if {
	not model_name
}

model_call_denials contains sprintf("unknown model %s: the policy data has no price for it", [model_name]) if {
	model_name
	not known_model
}

model_call_denials contains sprintf("tenant %s may not use model %s", [input.tenant, model_name]) if {
	known_model
	known_tenant
	not model_allowed_for_tenant
}

model_call_denials contains "model.call needs run.usage with input_tokens and output_tokens as whole numbers (their sum below 2^53) and cost_usd as a number of at most 10^9" if {
	not usage_counted
}

usage_counted if {
	is_number(tokens_used)
	is_number(cost_used)
}

model_call_denials contains msg if {
	is_number(tokens_used)
	has_agent # printed with %s: see tools.rego
	not under_token_cap
	msg := sprintf("run %v has used %v tokens; agent %s may use at most %v per run", [run_id, tokens_used, input.agent, token_cap])
}

model_call_denials contains msg if {
	is_number(cost_used)
	has_agent
	not under_cost_cap
	msg := sprintf(
		"run %v has cost %v USD; agent %s may spend at most %v USD per run",
		[run_id, usd(cost_used), input.agent, usd(cost_cap)]
	)
}

model_call_grants contains sprintf("tenant %s may use model %s", [input.tenant, model_name]) if {
	model_allowed_for_tenant
	known_model
}

model_call_grants contains sprintf("run %v is under its caps: %v of %v tokens, %v of %v USD", [run_id, tokens_used, token_cap, usd(cost_used), usd(cost_cap)]) if {
	under_token_cap
	under_cost_cap
}
