-- The event log of every aggregate type, and the table of latest states.
-- Each aggregate type is one log: `position` numbers its events 0, 1, 2…
-- without gaps, in commit order (appends of one type are serialised).
CREATE TABLE kes_events (
    aggregate_type  TEXT    NOT NULL,
    position        INTEGER NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    -- Version of the last event of the same append: marks command boundaries.
    command_end     INTEGER NOT NULL,
    event_id        BLOB    NOT NULL,
    event_type      TEXT    NOT NULL,
    revision        INTEGER NOT NULL,
    payload         TEXT    NOT NULL,
    metadata        TEXT    NOT NULL,
    recorded_at     TEXT    NOT NULL,
    -- Set on the last event of a command that carried a retry key.
    idempotency_key TEXT,
    PRIMARY KEY (aggregate_type, position),
    UNIQUE (aggregate_type, aggregate_id, version)
);

CREATE UNIQUE INDEX kes_events_idempotency
    ON kes_events (aggregate_type, aggregate_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE kes_aggregates (
    aggregate_type TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    state          TEXT    NOT NULL,
    updated_at     TEXT    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
