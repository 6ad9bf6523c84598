-- One append in one round trip, for the common case where the writer
-- already holds the aggregate's state at the stream's current version (its
-- cache, or a new stream): takes the type's append lock, checks that the
-- stream is at `p_version` and that the retry key is unused, then writes
-- the events at the log's next positions and the table row, all in the
-- call's own transaction. Returns the first position written, or -1 when a
-- check failed and nothing was written (the writer then decides the append
-- on its general path, which reads the stream). The lock key is the one the
-- general path takes, so both paths serialise on it.
CREATE FUNCTION kes_append_current(
    p_type        TEXT,
    p_id          TEXT,
    p_version     BIGINT,
    p_key         TEXT,
    p_event_ids   UUID[],
    p_types       TEXT[],
    p_revisions   BIGINT[],
    p_payloads    TEXT[],
    p_metadata    JSONB,
    p_recorded_at TIMESTAMPTZ,
    p_state       JSONB
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    current_version BIGINT;
    next_position   BIGINT;
    n               BIGINT := cardinality(p_event_ids);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('kes_events/' || current_schema() || '/' || p_type, 0));
    SELECT e.version INTO current_version FROM kes_events AS e
        WHERE e.aggregate_type = p_type AND e.aggregate_id = p_id ORDER BY e.version DESC LIMIT 1;
    IF COALESCE(current_version, 0) <> p_version THEN
        RETURN -1;
    END IF;
    IF p_key IS NOT NULL AND EXISTS (SELECT 1 FROM kes_events AS e
        WHERE e.aggregate_type = p_type AND e.aggregate_id = p_id AND e.idempotency_key = p_key) THEN
        RETURN -1;
    END IF;
    SELECT e.position + 1 INTO next_position FROM kes_events AS e
        WHERE e.aggregate_type = p_type ORDER BY e.position DESC LIMIT 1;
    next_position := COALESCE(next_position, 0);
    INSERT INTO kes_events (aggregate_type, position, aggregate_id, version, command_end, event_id, event_type,
                            revision, payload, metadata, recorded_at, idempotency_key)
        SELECT p_type, next_position + t.i - 1, p_id, p_version + t.i, p_version + n, t.event_id, t.event_type,
               t.revision, t.payload, p_metadata, p_recorded_at, CASE WHEN t.i = n THEN p_key END
        FROM unnest(p_event_ids, p_types, p_revisions, p_payloads) WITH ORDINALITY
            AS t(event_id, event_type, revision, payload, i);
    INSERT INTO kes_aggregates (aggregate_type, aggregate_id, version, state, updated_at)
        VALUES (p_type, p_id, p_version + n, p_state, p_recorded_at)
        ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET
            version = excluded.version, state = excluded.state, updated_at = excluded.updated_at;
    RETURN next_position;
END
$$;
