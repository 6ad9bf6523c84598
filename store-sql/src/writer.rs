//! The writer of a [`SqlStore`]: appends queue up, one task per store
//! takes everything queued as one batch and writes it in one transaction.

use std::collections::VecDeque;
use std::time::Instant;

use kes_core::{Aggregate, Appended, EventStore, ExpectedVersion, Position, StoreError};
use kes_sql::Dialect;
use kes_sql::{Arg, Pool, Statement, Tx};
use tokio::sync::oneshot;

use crate::batch::{Decider, EventRow, PrepareRow, Request, Settled, StateRow};
use crate::error::{db, is_unique_violation};
use crate::sql::{self};
use crate::store::{SqlStore, version_param};

/// Binds the columns of the event rows `rows` (of `requests`) in the order
/// of `sql::insert_events`.
pub(crate) fn bind_events<'a, A: Aggregate>(
    statement: &mut Statement<'a>,
    requests: &'a [Request<A>],
    rows: &[EventRow],
) {
    for row in rows {
        let request = &requests[row.request];
        let event = &request.encoded[row.index];
        for arg in [
            Arg::Text(Some(A::NAME)),
            Arg::Int(Some(version_param(row.position))),
            Arg::Text(Some(request.id.as_str())),
            Arg::Int(Some(version_param(row.version))),
            Arg::Int(Some(version_param(row.end))),
            Arg::Uuid(event.event_id),
            Arg::Text(Some(event.event_type)),
            Arg::Int(Some(i64::from(event.revision))),
            Arg::Text(Some(event.payload.as_str())),
            Arg::Json(&request.metadata),
            Arg::Time(request.recorded_at),
            Arg::Text(if row.version == row.end { request.key.as_deref() } else { None }),
        ] {
            statement.push(arg);
        }
    }
}

/// Binds the columns of the table rows `rows` in the order of
/// `sql::upsert_states`.
pub(crate) fn bind_states<'a, A: Aggregate>(statement: &mut Statement<'a>, rows: &[StateRow<'a>]) {
    for row in rows {
        for arg in [
            Arg::Text(Some(A::NAME)),
            Arg::Text(Some(row.id)),
            Arg::Int(Some(version_param(row.version))),
            Arg::Json(row.state),
            Arg::Time(row.updated_at),
        ] {
            statement.push(arg);
        }
    }
}

/// Why the transaction of a batch wrote nothing, or may have.
pub(crate) enum Failure {
    /// An insert hit a unique key: a writer outside this store's locking
    /// got there first. Nothing was written.
    Raced,
    /// A statement before `COMMIT` failed. Nothing was written.
    Database(StoreError),
    /// `COMMIT` failed: whether the batch was written is unknown.
    Commit(StoreError),
}

pub(crate) fn failure(e: sqlx::Error) -> Failure {
    Failure::Database(db(e))
}

/// Most appends decided in one transaction, and most events written by one
/// (a batch holds at least one append, however large).
pub(crate) const MAX_BATCH_APPENDS: usize = 256;
pub(crate) const MAX_BATCH_EVENTS: usize = 4 * sql::EVENTS_PER_INSERT;

/// Most table rows written per statement.
pub(crate) const STATES_PER_UPSERT: usize = 1000;

/// An append waiting for its batch, and where its answer goes.
pub(crate) struct Queued<A: Aggregate> {
    pub(crate) request: Request<A>,
    pub(crate) reply: oneshot::Sender<Result<Appended, StoreError>>,
}

/// The appends waiting to be written, and whether a writer task is running
/// (at most one per store: it takes everything queued as one batch, writes
/// it, and looks again).
pub(crate) struct Queue<A: Aggregate> {
    pub(crate) pending: VecDeque<Queued<A>>,
    pub(crate) writing: bool,
}

/// Ends the writer's turn if its task stops early (a panic in aggregate
/// code, or the runtime shutting down): the batch in hand is answered as
/// unknown when its reply channels drop, and a new writer takes over what
/// is still queued.
pub(crate) struct WriterWatch<'a, A: Aggregate> {
    pub(crate) store: &'a SqlStore<A>,
    pub(crate) done: bool,
}

impl<A: Aggregate> Drop for WriterWatch<'_, A> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut queue = self.store.inner.queue();
        queue.writing = false;
        if queue.pending.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            queue.writing = true;
            drop(queue);
            runtime.spawn(self.store.clone().write_queued());
        }
    }
}

impl<A: Aggregate> SqlStore<A> {
    /// The writer: takes everything queued as one batch, writes it, and
    /// looks again, until the queue is empty. Appends that arrive while a
    /// batch is in its transaction wait for the next one; a lone append
    /// starts a writer at once and waits for no timer.
    pub(crate) async fn write_queued(self) {
        let mut watch = WriterWatch { store: &self, done: false };
        while let Some(batch) = self.next_batch() {
            self.write_batch(batch).await;
        }
        watch.done = true;
    }

    /// The next batch: queued appends in arrival order, up to the limits.
    /// `None` (and the writer ends) when nothing is queued.
    pub(crate) fn next_batch(&self) -> Option<Vec<Queued<A>>> {
        let mut queue = self.inner.queue();
        let mut batch = Vec::new();
        let mut events = 0;
        while let Some(next) = queue.pending.front() {
            let size = next.request.events.len();
            if !batch.is_empty() && (batch.len() >= MAX_BATCH_APPENDS || events + size > MAX_BATCH_EVENTS) {
                break;
            }
            events += size;
            batch.extend(queue.pending.pop_front());
        }
        if batch.is_empty() {
            queue.writing = false;
            return None;
        }
        Some(batch)
    }

    /// Writes one batch in one transaction and answers each append. When
    /// the transaction fails before its commit, no append of it was
    /// written, and each is tried again on its own, so that one bad append
    /// (or one that raced a foreign writer) fails alone.
    pub(crate) async fn write_batch(&self, batch: Vec<Queued<A>>) {
        let (requests, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|q| (q.request, q.reply)).unzip();
        if requests.len() > 1
            && let Some(outcome) = self.append_batch_current(&requests).await
        {
            match outcome {
                Ok(appended) => {
                    for (reply, appended) in replies.into_iter().zip(appended) {
                        let _ = reply.send(Ok(appended));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
            return;
        }
        if requests.len() > 1 {
            match self.commit(&requests).await {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(outcome);
                    }
                    return;
                }
                Err(Failure::Commit(e)) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                    return;
                }
                Err(Failure::Raced) => {
                    tracing::debug!(aggregate = A::NAME, appends = requests.len(), "batch raced; appending one by one");
                }
                Err(Failure::Database(e)) => {
                    tracing::debug!(aggregate = A::NAME, appends = requests.len(), error = %e,
                        "batch failed; appending one by one");
                }
            }
        }
        let mut down: Option<StoreError> = None;
        for (request, reply) in requests.iter().zip(replies) {
            let outcome = match &down {
                // The database failed this append alone too: the rest of the
                // batch would only wait for the same failure.
                Some(e) => Err(e.clone()),
                None => {
                    let (outcome, database_down) = self.append_alone(request).await;
                    if database_down {
                        down = outcome.clone().err();
                    }
                    outcome
                }
            };
            let _ = reply.send(outcome);
        }
    }

    /// One append in a transaction of its own, with the answer to a race
    /// against a foreign writer; `true` when the database failed it
    /// transiently.
    pub(crate) async fn append_alone(&self, request: &Request<A>) -> (Result<Appended, StoreError>, bool) {
        if let Some(outcome) = self.append_current(request).await {
            let down = outcome.as_ref().is_err_and(StoreError::is_transient);
            return (outcome, down);
        }
        match self.commit(std::slice::from_ref(request)).await {
            Ok(outcomes) => {
                let outcome = outcomes.into_iter().next().unwrap_or_else(|| {
                    Err(StoreError::Backend(format!("{} {}: the append was not decided", A::NAME, request.id)))
                });
                (outcome, false)
            }
            Err(Failure::Raced) => {
                self.inner.cache.evict(&request.id);
                (self.after_race(request).await, false)
            }
            Err(Failure::Database(e) | Failure::Commit(e)) => {
                let down = e.is_transient();
                (Err(e), down)
            }
        }
    }

    /// PostgreSQL: one append in one round trip (`kes_append_current`, see
    /// the migration) when this store holds a guess at the stream's state —
    /// its cached entry, or the empty state of a stream it is asked to
    /// create. The call takes the append lock, checks that the stream is
    /// still at the guessed version and that the retry key is unused, and
    /// writes the events and the table row in its own transaction.
    ///
    /// `None` when the fast path does not apply or its check failed: nothing
    /// was written, and [`Self::commit`] decides the append from what the
    /// database holds (conflicts, retries, a stale cache). An error that
    /// leaves the outcome unknown (the connection dropped while the call
    /// ran) is the answer, as a failed `COMMIT` is on the general path.
    pub(crate) async fn append_current(&self, request: &Request<A>) -> Option<Result<Appended, StoreError>> {
        let Pool::Postgres(pool) = &self.inner.pools.writer else { return None };
        let cache = &self.inner.cache;
        let (version, next) = self.guess(request)?;
        let json = serde_json::to_value(&next).ok()?;
        let count = request.events.len() as u64;
        let known_at = cache.now();
        let called = sqlx::query_scalar::<_, i64>(sql::APPEND_CURRENT)
            .bind(A::NAME)
            .bind(request.id.as_str())
            .bind(version_param(version))
            .bind(request.key.as_deref())
            .bind(request.encoded.iter().map(|e| e.event_id).collect::<Vec<_>>())
            .bind(request.encoded.iter().map(|e| e.event_type).collect::<Vec<_>>())
            .bind(request.encoded.iter().map(|e| i64::from(e.revision)).collect::<Vec<_>>())
            .bind(request.encoded.iter().map(|e| e.payload.as_str()).collect::<Vec<_>>())
            .bind(sqlx::types::Json(&request.metadata))
            .bind(request.recorded_at)
            .bind(sqlx::types::Json(&json))
            .fetch_one(pool)
            .await;
        let first = match called {
            Ok(first) => u64::try_from(first).ok(),
            // The server refused the call (a unique key, a missing function):
            // its transaction rolled back, nothing was written.
            Err(sqlx::Error::Database(e)) => {
                tracing::debug!(aggregate = A::NAME, error = %e, "one-round-trip append refused; deciding it in full");
                None
            }
            Err(e) => return Some(Err(db(e))),
        };
        let Some(first) = first else {
            cache.evict(&request.id);
            return None;
        };
        let end = version + count;
        let settled = Settled { id: request.id.as_str(), appended: Some((end, next)), conflicted: false };
        self.settle(vec![settled], known_at);
        Some(Ok(Appended { version: end, position: Position::new(0, first + count - 1), deduplicated: false }))
    }

    /// The version and the state after it that a one-call append of
    /// `request` assumes: the cached state (or the empty state of a stream
    /// the caller expects not to exist yet) with the request's events
    /// applied. `None` when there is no guess, no event, or the expected
    /// version refuses the guess.
    fn guess(&self, request: &Request<A>) -> Option<(u64, A)> {
        let (version, state) = match self.inner.cache.latest(&request.id) {
            Some(found) => found,
            None if matches!(request.expected, ExpectedVersion::NoStream | ExpectedVersion::Exact(0)) => {
                (0, A::default())
            }
            None => return None,
        };
        if request.events.is_empty() || !request.expected.admits(version) {
            return None;
        }
        let mut next = state;
        for event in &request.events {
            next.apply(event);
        }
        Some((version, next))
    }

    /// PostgreSQL: a batch of appends in one round trip
    /// (`kes_append_batch`, see the migration), when this store holds a
    /// guess at every stream's state, as [`Self::append_current`] does for
    /// one. The lock is then held for the call alone instead of for the
    /// four round trips of [`Self::commit`], which is what bounds the
    /// appends a second under many clients.
    ///
    /// `None` when the fast path does not apply (a stream without a guess,
    /// one stream twice, a guess its expected version refuses) or a check
    /// in the call failed: nothing was written, and the batch is decided on
    /// the general path. An error that leaves the outcome unknown is every
    /// append's answer.
    pub(crate) async fn append_batch_current(
        &self,
        requests: &[Request<A>],
    ) -> Option<Result<Vec<Appended>, StoreError>> {
        let Pool::Postgres(pool) = &self.inner.pools.writer else { return None };
        let cache = &self.inner.cache;
        let mut seen = std::collections::HashSet::with_capacity(requests.len());
        let mut guesses = Vec::with_capacity(requests.len());
        for request in requests {
            if !seen.insert(request.id.as_str()) {
                return None;
            }
            guesses.push(self.guess(request)?);
        }
        let states = guesses
            .iter()
            .map(|(_, next)| serde_json::to_value(next).map(sqlx::types::Json))
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        let events: usize = requests.iter().map(|r| r.encoded.len()).sum();
        let mut e_ids = Vec::with_capacity(events);
        let mut e_versions = Vec::with_capacity(events);
        let mut e_ends = Vec::with_capacity(events);
        let mut e_keys = Vec::with_capacity(events);
        for (request, (version, _)) in requests.iter().zip(&guesses) {
            let end = version + request.encoded.len() as u64;
            for n in 1..=request.encoded.len() as u64 {
                e_ids.push(request.id.as_str());
                e_versions.push(version_param(version + n));
                e_ends.push(version_param(end));
                e_keys.push(if version + n == end { request.key.as_deref() } else { None });
            }
        }
        let encoded = || requests.iter().flat_map(|r| r.encoded.iter().map(move |e| (r, e)));
        let known_at = cache.now();
        let called = sqlx::query_scalar::<_, i64>(sql::APPEND_BATCH)
            .bind(A::NAME)
            .bind(requests.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
            .bind(guesses.iter().map(|(v, _)| version_param(*v)).collect::<Vec<_>>())
            .bind(requests.iter().map(|r| r.key.as_deref()).collect::<Vec<_>>())
            .bind(states)
            .bind(
                requests
                    .iter()
                    .zip(&guesses)
                    .map(|(r, (v, _))| version_param(v + r.encoded.len() as u64))
                    .collect::<Vec<_>>(),
            )
            .bind(requests.iter().map(|r| r.recorded_at).collect::<Vec<_>>())
            .bind(e_ids)
            .bind(e_versions)
            .bind(e_ends)
            .bind(encoded().map(|(_, e)| e.event_id).collect::<Vec<_>>())
            .bind(encoded().map(|(_, e)| e.event_type).collect::<Vec<_>>())
            .bind(encoded().map(|(_, e)| i64::from(e.revision)).collect::<Vec<_>>())
            .bind(encoded().map(|(_, e)| e.payload.as_str()).collect::<Vec<_>>())
            .bind(encoded().map(|(r, _)| sqlx::types::Json(&r.metadata)).collect::<Vec<_>>())
            .bind(encoded().map(|(r, _)| r.recorded_at).collect::<Vec<_>>())
            .bind(e_keys)
            .fetch_one(pool)
            .await;
        let first = match called {
            Ok(first) => u64::try_from(first).ok(),
            Err(sqlx::Error::Database(e)) => {
                tracing::debug!(aggregate = A::NAME, appends = requests.len(), error = %e,
                    "one-round-trip batch refused; deciding it in full");
                None
            }
            Err(e) => return Some(Err(db(e))),
        };
        let Some(first) = first else {
            for request in requests {
                cache.evict(&request.id);
            }
            return None;
        };
        let mut answers = Vec::with_capacity(requests.len());
        let mut settled = Vec::with_capacity(requests.len());
        let mut written = 0;
        for (request, (version, next)) in requests.iter().zip(guesses) {
            let count = request.encoded.len() as u64;
            written += count;
            let end = version + count;
            answers.push(Appended {
                version: end,
                position: Position::new(0, first + written - 1),
                deduplicated: false,
            });
            settled.push(Settled { id: request.id.as_str(), appended: Some((end, next)), conflicted: false });
        }
        self.settle(settled, known_at);
        Some(Ok(answers))
    }

    /// The answer to an append whose insert hit a unique key. The
    /// transaction was rolled back when it was dropped. Only a writer
    /// outside this store's locking gets here (e.g. an older version of
    /// it); answer as if we had waited for it.
    pub(crate) async fn after_race(&self, request: &Request<A>) -> Result<Appended, StoreError> {
        let id = request.id.as_str();
        if let Some(key) = &request.key
            && let Some(first) = self.recall(id, key).await?
        {
            return Ok(first);
        }
        let actual = self.stream_version(id).await?;
        if request.expected.admits(actual) {
            // The stream was fine; the race was for the log position.
            // Trying again will find the next one.
            return Err(StoreError::Unavailable(format!(
                "{} {id}: a concurrent append took the same log position; retry",
                A::NAME
            )));
        }
        Err(StoreError::Conflict {
            aggregate: A::NAME.to_owned(),
            id: id.to_owned(),
            expected: request.expected,
            actual,
        })
    }

    /// Decides and writes `requests` in one transaction: one query reads
    /// what they need, one insert per thousand events writes the log, one
    /// upsert the table rows (on PostgreSQL both in one statement), then
    /// `COMMIT`. Returns each request's answer.
    pub(crate) async fn commit(&self, requests: &[Request<A>]) -> Result<Vec<Result<Appended, StoreError>>, Failure> {
        let prepare = sql::append_prepare(requests.len());
        let cache = &self.inner.cache;
        let lock = sql::pg_append_lock(A::NAME);
        let mut tx = self.inner.pools.writer.begin_write(Some(&lock)).await.map_err(failure)?;
        let mut statement = Statement::with_capacity(prepare.as_str(), 1 + 2 * requests.len()).text(A::NAME);
        for request in requests {
            statement = statement.text(request.id.as_str()).opt_text(request.key.as_deref());
        }
        let rows = tx.fetch_all(&statement).await.map_err(failure)?;
        let rows = rows.iter().map(PrepareRow::read).collect::<Result<Vec<_>, _>>().map_err(failure)?;
        let mut decider = Decider::new(requests, rows).map_err(Failure::Database)?;
        while let Some(id) = decider.run(cache) {
            let statement = Statement::new(sql::read_stream()).text(A::NAME).text(id);
            let rows = tx.fetch_all(&statement).await.map_err(failure)?;
            let state = rows
                .iter()
                .map(|r| sql::envelope_from_row(r, A::NAME))
                .collect::<Result<Vec<_>, _>>()
                .and_then(|stored| self.replay(stored))
                .map(|(state, _)| state);
            decider.replayed(id, state);
        }
        if decider.event_rows().is_empty() {
            // Conflicts and retries only: nothing to write.
            let _ = tx.rollback().await;
            let (outcomes, settled) = decider.finish();
            self.settle(settled, cache.now());
            return Ok(outcomes);
        }
        self.write_rows(&mut tx, requests, decider.event_rows(), &decider.state_rows()).await?;
        // The states are current until the lock is released, which the
        // commit does: an entry may be trusted from here on.
        let known_at = cache.now();
        tx.commit().await.map_err(|e| Failure::Commit(db(e)))?;
        let (outcomes, settled) = decider.finish();
        self.settle(settled, known_at);
        Ok(outcomes)
    }

    /// Inserts a batch's events and upserts its table rows. PostgreSQL
    /// writes both in one statement when they fit in one; SQLite has no
    /// `INSERT` inside `WITH`.
    pub(crate) async fn write_rows(
        &self,
        tx: &mut Tx,
        requests: &[Request<A>],
        events: &[EventRow],
        states: &[StateRow<'_>],
    ) -> Result<(), Failure> {
        let raced = |e: sqlx::Error| if is_unique_violation(&e) { Failure::Raced } else { failure(e) };
        let together = self.inner.dialect == Dialect::Postgres
            && events.len() <= sql::EVENTS_PER_INSERT
            && states.len() <= STATES_PER_UPSERT;
        if together {
            let text = sql::insert_events_and_states(events.len(), states.len());
            let mut statement = Statement::with_capacity(text, events.len() * sql::INSERT_COLUMNS + states.len() * 5);
            bind_events(&mut statement, requests, events);
            bind_states::<A>(&mut statement, states);
            tx.execute(&statement).await.map_err(raced)?;
            return Ok(());
        }
        for chunk in events.chunks(sql::EVENTS_PER_INSERT) {
            let mut statement =
                Statement::with_capacity(sql::insert_events(chunk.len()), chunk.len() * sql::INSERT_COLUMNS);
            bind_events(&mut statement, requests, chunk);
            tx.execute(&statement).await.map_err(raced)?;
        }
        for chunk in states.chunks(STATES_PER_UPSERT) {
            let mut statement = Statement::with_capacity(sql::upsert_states(chunk.len()), chunk.len() * 5);
            bind_states::<A>(&mut statement, chunk);
            tx.execute(&statement).await.map_err(failure)?;
        }
        Ok(())
    }

    /// Brings the state cache in line with what a batch decided, and wakes
    /// this process's subscribers when it wrote.
    pub(crate) fn settle(&self, settled: Vec<Settled<'_, A>>, known_at: Instant) {
        let cache = &self.inner.cache;
        let mut wrote = false;
        for settled in settled {
            if settled.conflicted {
                cache.evict(settled.id);
            }
            if let Some((version, state)) = settled.appended {
                cache.put(settled.id, version, state, known_at);
                wrote = true;
            }
        }
        if wrote {
            self.inner.appended.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}
