//! The table of latest states of a [`SqlStore`]: rows repaired by replay,
//! and the whole table rebuilt when its state version is not the
//! aggregate's.

use std::collections::HashMap;
use std::time::Instant;

use kes_core::{Aggregate, StoreError};
use kes_sql::{Arg, Statement};
use serde_json::Value;

use crate::error::{SqlStoreError, db};
use crate::sql::{self};
use crate::store::{SqlStore, now, version_param};
use crate::writer::STATES_PER_UPSERT;

impl<A: Aggregate> SqlStore<A> {
    /// Writes a table row rebuilt by replay. Best effort: the answer of
    /// `load` is right either way, only the next `load` is slower.
    pub(crate) async fn repair_state(&self, id: &str, state: &A, version: u64) {
        let Ok(json) = self.state_json(id, state) else { return };
        let now = now();
        let statement = Statement::new(sql::REPAIR_STATE)
            .text(A::NAME)
            .text(id)
            .int(version_param(version))
            .arg(Arg::Json(&json))
            .arg(Arg::Time(now));
        let result = self.inner.pools.writer.execute(&statement).await;
        if let Err(e) = result {
            tracing::warn!(aggregate = A::NAME, id, error = %e, "could not write the rebuilt table row");
        }
    }

    /// At open: when the table rows of this aggregate type were built by
    /// another [`Aggregate::STATE_VERSION`], drops them and records ours in
    /// one transaction holding the log for writing (no append of this
    /// store's kind can slip a row of the old meaning in between), then
    /// rebuilds them from the log. Returns the version they were built by
    /// when it rebuilt them.
    ///
    /// Correctness rests on the drop: a missing row is rebuilt from the log
    /// by `load` and by an append anyway. The rebuild that follows only
    /// spares those first reads; if it fails (a corrupt event, an outage)
    /// it is logged and the rows it did not write are rebuilt one by one
    /// when used.
    pub(crate) async fn check_state_version(&self) -> Result<Option<u32>, SqlStoreError> {
        let outdated = self.drop_outdated_states().await.map_err(SqlStoreError::StateVersion)?;
        let Some(built_by) = outdated else { return Ok(None) };
        let built_by = u32::try_from(built_by).unwrap_or(u32::MAX);
        let started = Instant::now();
        match self.rebuild_table().await {
            Ok(rows) => tracing::info!(
                aggregate = A::NAME,
                from = built_by,
                to = A::STATE_VERSION,
                rows,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "the table of latest states was built by another state version: rebuilt from the log"
            ),
            Err(e) => tracing::warn!(
                aggregate = A::NAME,
                from = built_by,
                to = A::STATE_VERSION,
                error = %e,
                "the table of latest states was built by another state version and was dropped; rebuilding it \
                 failed, so each row is rebuilt from the log when it is next used"
            ),
        }
        Ok(Some(built_by))
    }

    /// The first half of [`SqlStore::check_state_version`]: drops the
    /// table rows when they were built by another state version and
    /// records ours, in one transaction holding the log for writing.
    pub(crate) async fn drop_outdated_states(&self) -> Result<Option<i64>, StoreError> {
        let ours = i64::from(A::STATE_VERSION);
        let lock = sql::pg_append_lock(A::NAME);
        let mut tx = self.inner.pools.writer.begin_write(Some(&lock)).await.map_err(db)?;
        let recorded: Option<i64> =
            tx.fetch_scalar(&Statement::new(sql::RECORDED_STATE_VERSION).text(A::NAME)).await.map_err(db)?;
        let any: Option<i64> = tx.fetch_scalar(&Statement::new(sql::ANY_STATE).text(A::NAME)).await.map_err(db)?;
        // Rows written before versions were recorded: version 1.
        let built_by = recorded.unwrap_or(1);
        let outdated = (any.is_some() && built_by != ours).then_some(built_by);
        if outdated.is_some() {
            tx.execute(&Statement::new(sql::DROP_STATES).text(A::NAME)).await.map_err(db)?;
        }
        if recorded != Some(ours) {
            tx.execute(&Statement::new(sql::RECORD_STATE_VERSION).text(A::NAME).int(ours)).await.map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(outdated)
    }

    /// Folds the whole log of this aggregate type and writes every row,
    /// keeping rows that appends moved on meanwhile. Returns the number of
    /// rows.
    pub(crate) async fn rebuild_table(&self) -> Result<usize, StoreError> {
        let mut states: HashMap<String, (A, u64)> = HashMap::new();
        let mut next = 0;
        loop {
            let page = self.page(next).await;
            let done = page.appends.is_empty();
            for envelope in page.appends.into_iter().flatten() {
                let (state, version) = states.entry(envelope.aggregate_id).or_default();
                state.apply(&envelope.payload);
                *version = envelope.version;
            }
            if let Some(e) = page.failure {
                return Err(e);
            }
            if done {
                break;
            }
            next = page.next;
        }
        let rows: Vec<(String, u64, Value)> = states
            .into_iter()
            .map(|(id, (state, version))| {
                let json = self.state_json(&id, &state)?;
                Ok((id, version, json))
            })
            .collect::<Result<_, StoreError>>()?;
        let now = now();
        for chunk in rows.chunks(STATES_PER_UPSERT) {
            let mut statement = Statement::with_capacity(sql::repair_states(chunk.len()), chunk.len() * 5);
            for (id, version, json) in chunk {
                for arg in [
                    Arg::Text(Some(A::NAME)),
                    Arg::Text(Some(id.as_str())),
                    Arg::Int(Some(version_param(*version))),
                    Arg::Json(json),
                    Arg::Time(now),
                ] {
                    statement.push(arg);
                }
            }
            self.inner.pools.writer.execute(&statement).await.map_err(db)?;
        }
        Ok(rows.len())
    }
}
