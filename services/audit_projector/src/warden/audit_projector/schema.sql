-- The audit projector's tables. The projector is the only writer; every table here can be dropped
-- and rebuilt by replaying the JetStream streams from sequence 1 (`warden audit replay`).
-- Rows carry no wall-clock "now": a replay must produce the same rows as the live projection.

CREATE TABLE IF NOT EXISTS projector_positions (
    stream   text PRIMARY KEY,
    last_seq bigint NOT NULL DEFAULT 0
);

-- Every message of every audited stream, as stored: valid envelopes in columns, anything else raw.
CREATE TABLE IF NOT EXISTS events (
    stream          text        NOT NULL,
    stream_seq      bigint      NOT NULL,
    nats_subject    text        NOT NULL,
    stored_at       timestamptz NOT NULL,  -- JetStream's timestamp for the message
    tenant          text        NOT NULL,  -- from the subject, so even garbage is attributed
    event_id        text,
    type            text,
    source          text,
    entity_id       text,                  -- the run (or other entity) it is about
    time            timestamptz,
    actor           text,
    correlation_id  text,
    causation_id    text,
    trace_id        text,
    schema_version  integer,
    idempotency_key text,
    payload         jsonb,                 -- the envelope's data, for a valid envelope
    raw             bytea,                 -- the original bytes, for anything that is not one
    invalid_reason  text,
    PRIMARY KEY (stream, stream_seq)
);
-- Tables made before the envelope's `subject` was renamed `entity_id` have the old column name.
DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM information_schema.columns
        WHERE table_schema = current_schema() AND table_name = 'events' AND column_name = 'subject'
    ) THEN
        ALTER TABLE events RENAME COLUMN subject TO entity_id;
    END IF;
END $$;
-- The hash chain (warden.audit_chain): one chain per stream and tenant, in stream order. A row's
-- chain_hash covers its content and the chain_hash before it; `warden audit verify` recomputes it.
-- Rows stored before the chain existed have neither (the verifier counts them as unchained).
ALTER TABLE events ADD COLUMN IF NOT EXISTS chain_index bigint;
ALTER TABLE events ADD COLUMN IF NOT EXISTS chain_hash  bytea;
-- Where each chain ends, found again when the projector starts.
CREATE INDEX IF NOT EXISTS events_by_chain ON events (stream, tenant, chain_index);
CREATE INDEX IF NOT EXISTS events_by_entity ON events (tenant, entity_id, stream_seq);
CREATE INDEX IF NOT EXISTS events_by_event_id ON events (event_id);
CREATE INDEX IF NOT EXISTS events_by_trace ON events (trace_id);

CREATE OR REPLACE FUNCTION warden_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only (% refused)', TG_OP;
END $$;
CREATE OR REPLACE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION warden_events_append_only();
-- The projector's role has no UPDATE, DELETE or TRUNCATE right on the table at all; the triggers
-- also stop its owner (who could grant them) from erasing history by accident.
CREATE OR REPLACE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION warden_events_append_only();

-- One row per run. Every column is merged so the result does not depend on the order in which the
-- commands and events streams are projected: status only moves up its rank, set-once columns keep
-- their first value, counters add.
CREATE TABLE IF NOT EXISTS runs (
    tenant          text        NOT NULL,
    run_id          text        NOT NULL,
    status          text        NOT NULL,
    status_rank     smallint    NOT NULL,
    agent           text,
    submitted_by    text,
    priority        smallint,
    input           jsonb,
    submitted_at    timestamptz,
    decided_at      timestamptz,
    decision_id     text,
    decision_effect text,
    decision_reasons jsonb,
    policy_revision text,
    queued_at       timestamptz,
    dispatched_at   timestamptz,
    started_at      timestamptz,
    finished_at     timestamptz,
    steps           integer     NOT NULL DEFAULT 0,
    tool_calls      integer     NOT NULL DEFAULT 0,
    output          jsonb,
    error           text,
    correlation_id  text,
    trace_id        text,
    PRIMARY KEY (tenant, run_id)
);

-- Usage, added by each model turn (tables made before usage was projected get the columns here).
ALTER TABLE runs ADD COLUMN IF NOT EXISTS model_calls   integer NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS input_tokens  bigint  NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS output_tokens bigint  NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS cost_nanousd  bigint  NOT NULL DEFAULT 0;  -- billionths of a USD

-- Usage summed per agent and per tenant: views over `runs`, so they are as current as it is.
CREATE OR REPLACE VIEW usage_by_agent AS
    SELECT tenant, agent, count(*) AS runs, sum(model_calls) AS model_calls, sum(tool_calls) AS tool_calls,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cost_nanousd)::numeric / 1000000000 AS cost_usd
    FROM runs WHERE agent IS NOT NULL GROUP BY tenant, agent;
CREATE OR REPLACE VIEW usage_by_tenant AS
    SELECT tenant, count(*) AS runs, sum(model_calls) AS model_calls, sum(tool_calls) AS tool_calls,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cost_nanousd)::numeric / 1000000000 AS cost_usd
    FROM runs GROUP BY tenant;

CREATE TABLE IF NOT EXISTS rejected_commands (
    tenant             text        NOT NULL,
    command_stream_seq bigint      NOT NULL,
    command_subject    text        NOT NULL,
    command_type       text,
    command_id         text,
    idempotency_key    text,
    code               text        NOT NULL,
    reason             text        NOT NULL,
    size_bytes         integer     NOT NULL,
    rejected_at        timestamptz NOT NULL,
    rejection_event_id text        NOT NULL,
    PRIMARY KEY (tenant, command_stream_seq)
);

-- Sequences missing from an audited stream (deleted or purged) where the projector, or a replay,
-- expected the next message. The projection moved past them; this is where the hole is written down.
CREATE TABLE IF NOT EXISTS stream_gaps (
    stream    text   NOT NULL,
    first_seq bigint NOT NULL,
    last_seq  bigint NOT NULL,
    PRIMARY KEY (stream, first_seq)
);

-- Messages a consumer gave up on: delivered as often as it allows, or terminated by it (from the
-- `message.dead_lettered` events, see warden.dead_letters), and messages the projector itself
-- could not store in any form, not even raw (consumer `audit_projector`, no event: they are still
-- in JetStream, and the projection moved past them so that one message cannot stop it). One row
-- per message and consumer; the projector only ever inserts.
CREATE TABLE IF NOT EXISTS dead_letters (
    stream      text        NOT NULL,
    stream_seq  bigint      NOT NULL,
    consumer    text        NOT NULL,
    reason      text        NOT NULL,
    deliveries  bigint,
    recorded_at timestamptz,            -- when the consumer gave up (the server's advisory time)
    subject     text,                   -- the NATS subject the message was stored on
    raw         bytea,                  -- the message's bytes, when they could be read
    raw_note    text,                   -- why `raw` is empty, when it is
    event_id    text,                   -- the message.dead_lettered event this row comes from
    PRIMARY KEY (stream, stream_seq, consumer)
);
-- Tables made before consumers' dead letters were recorded held only the projector's own.
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS consumer text NOT NULL DEFAULT 'audit_projector';
ALTER TABLE dead_letters ALTER COLUMN consumer DROP DEFAULT;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS deliveries  bigint;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS recorded_at timestamptz;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS subject     text;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS raw         bytea;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS raw_note    text;
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS event_id    text;
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
        WHERE i.indrelid = 'dead_letters'::regclass AND i.indisprimary AND a.attname = 'consumer'
    ) THEN
        -- One message may be given up on by several consumers: each is its own dead letter.
        ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_pkey, ADD PRIMARY KEY (stream, stream_seq, consumer);
    END IF;
END $$;

-- Fencing for the single active projector: each activation bumps the epoch, and every batch checks
-- it, so a projector that lost its lock (a network blip) cannot keep writing beside its successor.
CREATE TABLE IF NOT EXISTS projector_lease (
    id    smallint PRIMARY KEY CHECK (id = 1),
    epoch bigint   NOT NULL
);
INSERT INTO projector_lease VALUES (1, 0) ON CONFLICT DO NOTHING;

-- Every decision the policy gate made, on runs and on tool calls.
CREATE TABLE IF NOT EXISTS decisions (
    tenant          text        NOT NULL,
    decision_id     text        NOT NULL,
    run_id          text        NOT NULL,
    request_type    text        NOT NULL,
    request_id      text        NOT NULL,
    request_seq     bigint      NOT NULL,
    tool_call_id    text,
    effect          text        NOT NULL,
    reasons         jsonb       NOT NULL,
    policy_revision text        NOT NULL,
    evaluation_ms   double precision NOT NULL,
    decided_at      timestamptz NOT NULL,
    trace_id        text,
    PRIMARY KEY (tenant, decision_id)
);
CREATE INDEX IF NOT EXISTS decisions_by_run ON decisions (tenant, run_id);
-- The policy input each decision was made on (DecisionMade.input), to evaluate it again under
-- another bundle; null for decisions recorded before inputs were kept.
ALTER TABLE decisions ADD COLUMN IF NOT EXISTS input jsonb;

-- One row per tool call: what was asked (commands stream), and what came of it (events stream).
CREATE TABLE IF NOT EXISTS tool_calls (
    tenant          text        NOT NULL,
    tool_call_id    text        NOT NULL,
    run_id          text        NOT NULL,
    step            integer     NOT NULL,
    tool            text        NOT NULL,
    arguments       jsonb,
    requested_by    text,
    requested_at    timestamptz,
    decision_id     text,
    outcome         text,
    result          jsonb,
    error           text,
    completed_at    timestamptz,
    trace_id        text,
    PRIMARY KEY (tenant, tool_call_id)
);
CREATE INDEX IF NOT EXISTS tool_calls_by_run ON tool_calls (tenant, run_id, step);

-- Approval requests and what became of them, read from the event log and the decisions: the
-- request (what, by whom, until when), the first answer that counted (a decision on the call
-- from an approval.answered command, with who gave it), and whether the call has run since.
-- Status: approved, rejected, expired (no answer in time), closed (the call ended without an
-- answer, e.g. its run failed) or pending.
CREATE INDEX IF NOT EXISTS events_by_type ON events (type, tenant);
CREATE OR REPLACE VIEW approvals AS
    SELECT request.tenant,
           request.payload->>'approval_id' AS approval_id,
           request.entity_id AS run_id,
           request.payload->>'tool_call_id' AS tool_call_id,
           request.payload->>'tool' AS tool,
           request.payload->'arguments' AS arguments,
           request.payload->>'requested_by' AS requested_by,
           request.payload->'approver_roles' AS approver_roles,
           request.payload->>'policy_revision' AS policy_revision,
           request.stream_seq AS request_seq,
           request.stored_at AS requested_at,
           (request.payload->>'expires_at')::timestamptz AS expires_at,
           answer.decision_id AS answer_decision_id,
           answer.effect AS answer_effect,
           answer.decided_at AS answered_at,
           answer_command.actor AS answered_by,
           answer_command.payload->>'reason' AS answer_reason,
           tool_calls.outcome AS call_outcome,
           CASE
               WHEN answer.effect = 'allow' THEN 'approved'
               WHEN answer.effect = 'deny' THEN 'rejected'
               WHEN (request.payload->>'expires_at')::timestamptz <= now() THEN 'expired'
               WHEN tool_calls.outcome IS NOT NULL THEN 'closed'
               WHEN runs.finished_at IS NOT NULL THEN 'closed'
               ELSE 'pending'
           END AS status
    FROM events AS request
    LEFT JOIN LATERAL (
        SELECT decisions.* FROM decisions
        WHERE decisions.tenant = request.tenant
          AND decisions.run_id = request.entity_id
          AND decisions.tool_call_id = request.payload->>'tool_call_id'
          AND decisions.request_type = 'approval.answered'
          AND decisions.effect IN ('allow', 'deny')
        ORDER BY decisions.decided_at
        LIMIT 1
    ) AS answer ON true
    LEFT JOIN events AS answer_command
        ON answer_command.event_id = answer.request_id AND answer_command.type = 'approval.answered'
    LEFT JOIN tool_calls
        ON tool_calls.tenant = request.tenant AND tool_calls.tool_call_id = request.payload->>'tool_call_id'
    LEFT JOIN runs ON runs.tenant = request.tenant AND runs.run_id = request.entity_id
    WHERE request.type = 'approval.requested';
