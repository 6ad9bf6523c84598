-- Several appends in one round trip, for a batch whose writer holds a guess
-- at every stream's state (its cache, or new streams): the batch form of
-- kes_append_current. Takes the type's append lock, checks that each
-- stream is at its guessed version and that no retry key is used, then
-- writes every event at the log's next positions (in the order given) and
-- every table row, all in the call's own transaction. Returns the first
-- position written, or -1 when any check failed and nothing was written
-- (the writer then decides the batch on its general path).
--
-- Per append (one element each): p_ids, p_versions (the guessed version),
-- p_keys (the retry key or NULL), and the table row after the append:
-- p_states, p_state_versions, p_updated_at. Per event (one element each,
-- appends one after the other): e_ids .. e_keys, with the version, the
-- command's last version and the retry key on the command's last event
-- worked out by the writer. The ids of one call are distinct.
CREATE FUNCTION kes_append_batch(
    p_type           TEXT,
    p_ids            TEXT[],
    p_versions       BIGINT[],
    p_keys           TEXT[],
    p_states         JSONB[],
    p_state_versions BIGINT[],
    p_updated_at     TIMESTAMPTZ[],
    e_ids            TEXT[],
    e_versions       BIGINT[],
    e_ends           BIGINT[],
    e_event_ids      UUID[],
    e_types          TEXT[],
    e_revisions      BIGINT[],
    e_payloads       TEXT[],
    e_metadata       JSONB[],
    e_recorded_at    TIMESTAMPTZ[],
    e_keys           TEXT[]
) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    next_position BIGINT;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('kes_events/' || current_schema() || '/' || p_type, 0));
    IF EXISTS (
        SELECT 1 FROM unnest(p_ids, p_versions) AS a(id, version)
        WHERE COALESCE((SELECT e.version FROM kes_events AS e
                        WHERE e.aggregate_type = p_type AND e.aggregate_id = a.id
                        ORDER BY e.version DESC LIMIT 1), 0) <> a.version
    ) THEN
        RETURN -1;
    END IF;
    IF EXISTS (
        SELECT 1 FROM unnest(p_ids, p_keys) AS a(id, key)
        WHERE a.key IS NOT NULL AND EXISTS (SELECT 1 FROM kes_events AS e
            WHERE e.aggregate_type = p_type AND e.aggregate_id = a.id AND e.idempotency_key = a.key)
    ) THEN
        RETURN -1;
    END IF;
    SELECT e.position + 1 INTO next_position FROM kes_events AS e
        WHERE e.aggregate_type = p_type ORDER BY e.position DESC LIMIT 1;
    next_position := COALESCE(next_position, 0);
    INSERT INTO kes_events (aggregate_type, position, aggregate_id, version, command_end, event_id, event_type,
                            revision, payload, metadata, recorded_at, idempotency_key)
        SELECT p_type, next_position + t.i - 1, t.id, t.version, t.command_end, t.event_id, t.event_type,
               t.revision, t.payload, t.metadata, t.recorded_at, t.key
        FROM unnest(e_ids, e_versions, e_ends, e_event_ids, e_types, e_revisions, e_payloads, e_metadata,
                    e_recorded_at, e_keys) WITH ORDINALITY
            AS t(id, version, command_end, event_id, event_type, revision, payload, metadata, recorded_at, key, i);
    INSERT INTO kes_aggregates (aggregate_type, aggregate_id, version, state, updated_at)
        SELECT p_type, s.id, s.version, s.state, s.updated_at
        FROM unnest(p_ids, p_state_versions, p_states, p_updated_at) AS s(id, version, state, updated_at)
        ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET
            version = excluded.version, state = excluded.state, updated_at = excluded.updated_at;
    RETURN next_position;
END
$$;
