-- Plans the append functions can keep however the log grows.
--
-- A session keeps the plans of a function's statements once it has run
-- them a few times. Made while kes_events was empty or never analysed,
-- they could read every event of the type on each later call, under the
-- type's append lock, until the table was analysed again (with autovacuum
-- off: never). Two causes, two changes:
--
-- * A plan made on a table analysed while (nearly) empty scans it: a scan
--   of no pages costs less than any index lookup. Every statement of both
--   functions is answered by an index, so they now run with sequential and
--   bitmap scans off, which leaves the planner the index paths whatever it
--   believes about the table's size. (Planning every call against the
--   table as it is, plan_cache_mode = force_custom_plan, was measured: it
--   cost the batch path 15 to 20 % of its throughput, and without
--   statistics it still chose the join below.)
-- * Without statistics the planner takes `aggregate_type = $1` for a
--   selective test, although every event of the log has that type, and
--   may join the batch's retry keys to all of them. kes_append_batch now
--   checks each key with its own lookup (a sub-select per key, which
--   PostgreSQL does not turn into a join), as it already checks each
--   stream's version.
ALTER FUNCTION kes_append_current(TEXT, TEXT, BIGINT, TEXT, UUID[], TEXT[], BIGINT[], TEXT[], JSONB, TIMESTAMPTZ, JSONB)
    SET enable_seqscan = off SET enable_bitmapscan = off;

-- kes_append_batch as 0004 made it (see there for its contract), but for
-- the retry keys' check and the planner settings.
CREATE OR REPLACE FUNCTION kes_append_batch(
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
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
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
        WHERE a.key IS NOT NULL AND (SELECT true FROM kes_events AS e
            WHERE e.aggregate_type = p_type AND e.aggregate_id = a.id AND e.idempotency_key = a.key LIMIT 1)
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
