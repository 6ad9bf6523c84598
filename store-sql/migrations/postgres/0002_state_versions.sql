-- The state version (`Aggregate::STATE_VERSION`) each aggregate type's rows
-- in `kes_aggregates` were built by. A store that opens with another one
-- drops that type's rows and rebuilds them from the log. A type without a
-- row here was written before versions were recorded: version 1.
CREATE TABLE kes_state_versions (
    aggregate_type TEXT    NOT NULL PRIMARY KEY,
    state_version  BIGINT  NOT NULL
);
