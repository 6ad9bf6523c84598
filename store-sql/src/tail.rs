//! Reading the log of a [`SqlStore`] in order, whole commands at a time:
//! pages for subscriptions and table rebuilds, and the subscription's
//! state.

use std::collections::VecDeque;
use std::time::Duration;

use kes_core::{Aggregate, Envelope, Logged, StoreError};
use kes_sql::Statement;
use tokio::sync::watch;

use crate::error::db;
use crate::sql::{self, StoredEvent};
use crate::store::{SqlStore, version_param};

impl<A: Aggregate> SqlStore<A> {
    /// Reads up to one page of the log from position `next`, cut at command
    /// boundaries. A failure comes after the appends that preceded it.
    // Kept in one piece: Reads a page and cuts it at a command boundary; both halves need the rows and the page
    // under construction.
    pub(crate) async fn page(&self, next: u64) -> Page<A::Event> {
        let from = i64::try_from(next).unwrap_or(i64::MAX);
        let statement = Statement::new(sql::read_log()).text(A::NAME).int(from).int(self.inner.page_size);
        let rows = self.inner.pools.reader.fetch_all(&statement).await.map(|rows| {
            rows.iter().map(|r| sql::envelope_from_row(r, A::NAME)).collect::<Vec<Result<StoredEvent, StoreError>>>()
        });
        let mut page = Page { appends: Vec::new(), next, failure: None };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                page.failure = Some(db(e));
                return page;
            }
        };
        let mut groups: Vec<Vec<StoredEvent>> = Vec::new();
        for row in rows {
            let event = match row {
                Ok(event) => event,
                Err(e) => {
                    page.failure = Some(e);
                    break;
                }
            };
            match groups.last_mut() {
                Some(group) if continues(group, &event) => group.push(event),
                _ => groups.push(vec![event]),
            }
        }
        if groups.last().is_some_and(|g| !complete(g)) {
            if groups.len() > 1 || page.failure.is_some() {
                // The page (or the readable part of it) ended inside a
                // command: leave that command for the next read.
                groups.pop();
            } else if let Some(group) = groups.last_mut() {
                // One command larger than a page: fetch the rest of it.
                match self.command_rest(group).await {
                    Ok(rest) => group.extend(rest),
                    Err(e) => {
                        page.failure = Some(e);
                        groups.pop();
                    }
                }
            }
        }
        for mut group in groups {
            if let Some(last) = group.last().filter(|_| !complete(&group)) {
                page.failure = Some(StoreError::Corrupt {
                    aggregate: A::NAME.to_owned(),
                    id: last.raw.aggregate_id.clone(),
                    version: last.raw.version,
                    reason: format!("the command ending at version {} is incomplete in the log", last.command_end),
                });
                break;
            }
            group.sort_by_key(|e| e.raw.version);
            let after = group.iter().map(|e| e.raw.position.offset + 1).max().unwrap_or(page.next);
            match group.into_iter().map(|e| self.decode(e)).collect::<Result<Vec<_>, _>>() {
                Ok(append) => {
                    page.appends.push(append);
                    page.next = page.next.max(after);
                }
                Err(e) => {
                    page.failure = Some(e);
                    break;
                }
            }
        }
        page
    }

    pub(crate) async fn command_rest(&self, group: &[StoredEvent]) -> Result<Vec<StoredEvent>, StoreError> {
        let Some(last) = group.last() else { return Ok(Vec::new()) };
        let statement = Statement::new(sql::read_command_rest())
            .text(A::NAME)
            .text(&last.raw.aggregate_id)
            .int(version_param(last.raw.version))
            .int(version_param(last.command_end));
        let rows = self.inner.pools.reader.fetch_all(&statement).await.map_err(db)?;
        rows.iter().map(|r| sql::envelope_from_row(r, A::NAME)).collect()
    }
}

/// Whether `event` belongs to the same command as the open `group`.
pub(crate) fn continues(group: &[StoredEvent], event: &StoredEvent) -> bool {
    group.last().is_some_and(|last| {
        !last.ends_command()
            && last.raw.aggregate_id == event.raw.aggregate_id
            && last.command_end == event.command_end
            && last.raw.version + 1 == event.raw.version
    })
}

/// Whether the group ends with the last event of its command.
pub(crate) fn complete(group: &[StoredEvent]) -> bool {
    group.last().is_some_and(StoredEvent::ends_command)
}

/// What one read of the log found.
pub(crate) struct Page<E> {
    /// Whole appends, in log order.
    pub(crate) appends: Vec<Vec<Envelope<E>>>,
    /// The position after the last of them.
    pub(crate) next: u64,
    /// What stopped the read before the end of the page, if anything.
    pub(crate) failure: Option<StoreError>,
}

/// The state of one subscription.
pub(crate) struct Tail<A: Aggregate> {
    pub(crate) store: SqlStore<A>,
    /// The position of the next event to deliver.
    pub(crate) next: u64,
    /// Appends read but not delivered yet.
    pub(crate) ready: VecDeque<Vec<Envelope<A::Event>>>,
    /// A failure to deliver once `ready` is empty.
    pub(crate) failure: Option<StoreError>,
    pub(crate) wake: watch::Receiver<u64>,
    /// The last read failed transiently: wait before the next one.
    pub(crate) backoff: bool,
    /// A permanent failure was delivered; the stream ends.
    pub(crate) done: bool,
}

impl<A: Aggregate> Tail<A> {
    pub(crate) async fn next_item(mut self) -> Option<(Result<Logged<A::Event>, StoreError>, Self)> {
        loop {
            if let Some(record) = self.ready.pop_front().and_then(Logged::of) {
                return Some((Ok(record), self));
            }
            if let Some(e) = self.failure.take() {
                // A transient failure is reported and retried; anything
                // else (a corrupt event) ends the stream, since skipping an
                // event would silently lose it.
                self.backoff = e.is_transient();
                self.done = !self.backoff;
                return Some((Err(e), self));
            }
            if self.done {
                return None;
            }
            if std::mem::take(&mut self.backoff) {
                tokio::time::sleep(self.store.inner.poll_interval.max(Duration::from_millis(200))).await;
            }
            // Marks the current append count as seen *before* reading, so
            // that an append committed after the read wakes the wait below.
            self.wake.borrow_and_update();
            let page = self.store.page(self.next).await;
            let found = !page.appends.is_empty() || page.failure.is_some();
            self.ready.extend(page.appends);
            self.next = page.next;
            self.failure = page.failure;
            if !found {
                let poll = self.store.inner.poll_interval;
                tokio::select! {
                    _ = self.wake.changed() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
    }
}
