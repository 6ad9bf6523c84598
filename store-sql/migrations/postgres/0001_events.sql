-- The event log of every aggregate type, and the table of latest states.
-- Each aggregate type is one log: `position` numbers its events 0, 1, 2…
-- without gaps, in commit order (appends of one type are serialised by a
-- transaction-level advisory lock, so a reader never sees a later position
-- before an earlier one).
CREATE TABLE kes_events (
    aggregate_type  TEXT        NOT NULL,
    position        BIGINT      NOT NULL,
    aggregate_id    TEXT        NOT NULL,
    version         BIGINT      NOT NULL,
    -- Version of the last event of the same append: marks command boundaries.
    command_end     BIGINT      NOT NULL,
    event_id        UUID        NOT NULL,
    event_type      TEXT        NOT NULL,
    revision        BIGINT      NOT NULL,
    -- The codec's bytes as written; JSONB would reorder them.
    payload         TEXT        NOT NULL,
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL,
    -- Set on the last event of a command that carried a retry key.
    idempotency_key TEXT,
    PRIMARY KEY (aggregate_type, position),
    UNIQUE (aggregate_type, aggregate_id, version)
);

CREATE UNIQUE INDEX kes_events_idempotency
    ON kes_events (aggregate_type, aggregate_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE kes_aggregates (
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    state          JSONB       NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
