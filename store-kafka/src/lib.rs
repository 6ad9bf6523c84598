//! # kes-store-kafka
//!
//! The KES event store on Kafka, as the seed built it with Kafka Streams:
//! the events of each aggregate type live forever in one topic, the latest
//! state of each aggregate in a compacted topic, and a table of those states
//! is held in memory (GlobalKTable style) so that reads by id never replay.
//!
//! [`KafkaStore`] implements [`kes_core::EventStore`] with rdkafka
//! (librdkafka) and runs the core conformance suite against a real broker.
//!
//! ## Layout
//!
//! Per aggregate type (`A::NAME`), created explicitly with their configs
//! (never by auto-creation), with [`KafkaStoreConfig::partitions`] partitions:
//!
//! | topic | config | key | value |
//! |---|---|---|---|
//! | `{prefix}.{aggregate}.events` | `cleanup.policy=delete`, `retention.ms` = 1000 years, `retention.bytes=-1` | aggregate id | one JSON document per command: all its events ([`record`]) |
//! | `{prefix}.{aggregate}.table` | `cleanup.policy=compact` | aggregate id | state, version, record offsets, recent idempotency keys, catch-up mark |
//!
//! At start the store reads both topics' configuration back and refuses
//! ([`KafkaStoreError::UnsafeTopic`], naming the setting) an events topic
//! that could delete or compact events — including `retention.ms=-1`, which
//! Apache Kafka reads as "forever" but Tansu 0.6.0 reads as "delete
//! everything" — and a table topic that is not compact-only.
//!
//! An aggregate lives in partition `murmur2(id) % partitions` (Kafka's
//! default partitioner, so every client agrees), in order. Its commands are
//! appended one record each, so 1..n events of one command commit
//! atomically and share one [`kes_core::Position`] (partition, offset).
//!
//! ## Consistency: several instances, and the log decides
//!
//! Any number of service instances may use the same topics (a rolling
//! deploy runs two; scaling out runs more). Commands may reach any of them.
//!
//! - **Every instance follows every partition.** A follower task applies
//!   each events record, in log order, to the instance's in-memory table,
//!   so a write made through one instance is readable through every other
//!   after the follow lag (one fetch: at most
//!   [`KafkaStoreConfig::follow_wait`], 20 ms unless set, on brokers that
//!   hold a fetch for its whole wait). A read that names a position
//!   ([`kes_core::EventStore::wait_for_position`], the HTTP adapter's
//!   `KES-Position`) waits, bounded, until this instance applied it.
//! - **The validity rule.** Kafka has no conditional append, so two
//!   instances can append a record for the same version. Each record names
//!   the event it was decided on (`previous_event_id`); every reader —
//!   start-up recovery, the follower, `read`, `subscribe` — counts a
//!   record only if it continues its aggregate's stream exactly where the
//!   valid records before it left it (next version, same previous event).
//!   Other records are *void*: skipped by every reader, counted
//!   ([`FollowerStats::void_records`], `kes_store_void_records`) and logged
//!   once. All readers therefore agree on every stream.
//! - **Acknowledged means valid.** `append` sends the record, then waits
//!   for the verdict on it from the same in-order applier: at once when
//!   every record below it is applied already (the fast path, the common
//!   case), otherwise when the follower reaches it. A void record answers
//!   [`kes_core::StoreError::Conflict`]; the command bus then decides again
//!   on the fresh state (no `If-Match`) or reports the conflict (412).
//!   The record is recognised by its first event id, so a delivery the
//!   broker acknowledged without an offset (a resent batch) and a resend
//!   that landed earlier are both answered with the right position.
//! - **Idempotency across instances.** Every valid record's idempotency key
//!   is remembered by every instance (the last
//!   [`KafkaStoreConfig::idempotency_keys_per_aggregate`], and all those younger
//!   than [`KafkaStoreConfig::idempotency_window`], up to 1,024 per aggregate),
//!   so a retry reaching another instance is answered once; the command bus
//!   recalls the key again after any conflict. A reaction's command
//!   (its key a `kes_core::ReactionKey`) is also recognised for good: each
//!   row keeps, per reaction sequence (reaction, source log partition), the
//!   furthest command of the sequence it holds, and a reaction sends a
//!   sequence's commands for one aggregate in order, so a replay from any
//!   old checkpoint appends nothing (answered with that furthest command's
//!   version and position).
//! - **Gaps and unreadable records.** A record that skips versions tells a
//!   reader that its picture of the stream is incomplete: the stream is
//!   rebuilt from the events topic before the record is judged. A valid
//!   record whose events this version cannot decode (a newer deploy added
//!   an event type) *halts* its partition: nothing past it is applied, the
//!   partition's aggregates answer `Unavailable` (503), `kes_store_partition_halted`
//!   is 1, and it resumes when a version that can read it starts.
//! - **Table records have one writer per partition**: the instances form a
//!   consumer group, and an instance writes the table records of the
//!   partitions it is assigned, in numbered tenures fenced by epoch markers
//!   (see `ownership`). Correctness never depends on who owns what: only
//!   the table records (a start-up shortcut) do.
//! - **Acknowledged means durable.** The producer is idempotent with
//!   `acks=all`; a command is answered only after the broker acknowledged
//!   its record and the record was judged valid. Table records are written
//!   later, after [`KafkaStoreConfig::table_write_delay`] (250 ms by default),
//!   one per aggregate at a time, carrying every command that arrived
//!   meanwhile.
//! - **Bounded failure.** Every broker round trip is bounded by
//!   [`KafkaStoreConfig::request_timeout`]: a down broker gives
//!   [`kes_core::StoreError::Unavailable`] within about twice that, never a
//!   hang. A send whose outcome is unknown answers `Unavailable`; if the
//!   record landed after all, the follower judges it like any other, and a
//!   retry with the same idempotency key is answered from it.
//! - **What it costs.** Every instance holds every aggregate of the type in
//!   memory and reads every record of the events topic; appends through
//!   several instances to one aggregate at once conflict and are decided
//!   again (correct, but slower than routing an aggregate's commands to one
//!   instance, which KES does not do for you).
//!
//! ## The table and recovery
//!
//! At start the table is read from the table topic, then caught up from the
//! events topic, so a crash between the events write and the table write
//! loses nothing. Each table record carries `reflected_below`: every events
//! record of its partition below that offset had its table record
//! acknowledged before this one was written. The catch-up starts, per
//! partition, at the highest mark of a trusted record and applies what the
//! table lacks by the validity rule (records a row already reflects are
//! skipped). A record written by an owner whose tenure had ended (placed
//! after a newer epoch marker) is not trusted: its aggregate is rebuilt
//! from the events topic. The partition's owner writes the rows the
//! catch-up moved when its tenure starts. A table record that cannot be
//! read, a null tombstone written by someone else, or a state that no longer
//! fits the aggregate's model (the model changed) makes the store drop the
//! table and rebuild it from the whole events topic: the table is disposable.
//!
//! **Deleted aggregates.** When [`kes_core::Aggregate::is_deleted`] holds
//! after a command, the table record says `"deleted": true` and keeps the
//! version and state. KES does not write Kafka null tombstones: compaction
//! would drop the key, and with it the version that keeps a deleted id from
//! being created again at version 1. Readers of the table topic treat
//! `deleted: true` (also in the `kes.deleted` header) as the tombstone.
//! `load` returns the deleted state with its version, as every store does;
//! the command bus and the HTTP adapter answer "not found".
//!
//! ## Costs and retention
//!
//! - `load`, `recall` and the version check answer from memory: the table
//!   holds every aggregate's state (size it like a GlobalKTable). It keeps
//!   each state as the compact JSON the aggregate serialises to (a typed
//!   state with strings and sets takes several times those bytes), typed
//!   again by every `load` and `append`; a held state that does not
//!   deserialise gives [`kes_core::StoreError::Corrupt`]. Per aggregate
//!   that is the JSON, the id and about 140 bytes of bookkeeping (version,
//!   offsets, map slot); idempotency keys, the offsets of further records
//!   and cached histories cost only the aggregates that have them.
//! - `recall`: each aggregate remembers its last
//!   [`KafkaStoreConfig::idempotency_keys_per_aggregate`] keys (default 32),
//!   persisted in its table record, so they survive restarts; older keys are
//!   forgotten whatever their age. Reaction marks (one per reaction
//!   sequence that reached the aggregate, about 60 bytes each) are kept
//!   for good, in the table record too.
//! - `read(id)` and `read_page(id, after, limit)`: the table keeps each
//!   aggregate's record offsets, and a read cache
//!   ([`KafkaStoreConfig::read_cache_bytes`], 64 MiB by default) keeps the
//!   records of aggregates written or caught up since start, evicting whole
//!   histories oldest first. A cached history costs no broker round trip.
//!   Otherwise only the records that can hold the page are fetched (when
//!   each record holds one event, exactly the page's), reading through
//!   stretches of up to 2,048 foreign records and seeking over longer ones;
//!   bounded reads ask for `fetch.wait.max.ms=5`, since some brokers (Tansu)
//!   hold every fetch answer for the whole wait. A row whose offsets are
//!   unknown (written by an old version) scans the partition from its first
//!   record to its last. The cost still grows with the foreign records
//!   between the aggregate's own, and on Tansu each fetch also costs in
//!   proportion to what the partition holds after it (its fetch query
//!   sizes a window over the rest of the partition), so a service that
//!   serves audit histories should serve them from a history view
//!   (`kes_core::HistoryProjection`), as the projects example does on
//!   Kafka: one indexed query per page, whatever the log holds.
//! - `subscribe(checkpoint)` delivers every events record from the
//!   checkpoint's next offsets on (owned by the caller, never by
//!   consumer-group commits); one item per record, per-partition order,
//!   endless, each once the follower judged it. At the head of the log the
//!   records come from each partition's tail in memory, which the follower
//!   and the appends fill (the last 4,096 records of each partition, at
//!   most 8 MiB of values per store): the broker serves each record once
//!   to the follower, however many projections, reactions and change feeds
//!   subscribe, and a subscriber sees a record as soon as the table applied
//!   it. A partition whose next record lies below its tail (an old
//!   checkpoint, a rebuild, a subscriber that fell behind) is read from the
//!   broker by a consumer of the subscription's own until it reaches the
//!   tail.
//! - Every reader (start-up scans, the follower, reads, subscriptions, the
//!   keys topic) is assigned a concrete offset, 0 for the start of a
//!   partition, never `Offset::Beginning`: a new librdkafka consumer looks
//!   a logical offset up only once it knows the partition's leader, half a
//!   second later, and a store's open used to pay that on every scan. Where
//!   retention removed the oldest records, the read at 0 is out of range and
//!   `auto.offset.reset = earliest` moves it to the first record left.
//! - Reads that end at the partitions' high watermarks (the start-up scan
//!   of the table topic, the catch-up from the events topic, the owners'
//!   claim scans) fetch up to 8 MiB per request, as nothing lies past what
//!   they want; every other reader fetches up to 1 MiB, so that a read of a
//!   few records in the middle of a partition does not make a broker that
//!   assembles whole responses (Tansu) gather megabytes it then drops.
//! - The table topic is read in full once per start, by the start-up load.
//!   Claiming a tenure reads it before and after writing its markers, but
//!   each of those reads goes on from where the reading before it stopped
//!   (the load's, then the last claim's), so a claim reads what the topic
//!   gained since: the markers and table records written meanwhile
//!   ([`FollowerStats::table_records_scanned`] counts them all).
//! - A start waits for few round trips in a row. A restart that finds both
//!   topics asks for their metadata and configuration side by side and
//!   creates nothing (the admin client never lets a metadata request create
//!   a topic with the broker's defaults). The start-up reader of the table
//!   topic connects and fetches while the topic's heads are asked for, and
//!   the events topic's heads are asked while the table topic is read; they
//!   are asked again when a table record read meanwhile (written by a
//!   running instance) reflects events past them.
//! - The events producer sends without lingering and keeps at most
//!   [`PRODUCER_IN_FLIGHT`] requests in flight per broker (five would be
//!   librdkafka's bound with idempotence): under load the appends that wait
//!   share the next request, so the broker serves fewer, larger requests.
//!   Both can be set through [`KafkaStoreConfig::client`].
//! - `head` asks for the high watermarks.
//!
//! ## Example
//!
//! Needs a broker (start one with `scripts/kafka-broker.sh start 19092 /tmp/kes-kafka`):
//!
//! ```no_run
//! # use kes_core::doc_fixtures::Counter;
//! use kes_core::{CommandBus, ExpectedVersion, Metadata};
//! use kes_store_kafka::{KafkaStoreConfig, KafkaStore};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = KafkaStore::<Counter>::open(KafkaStoreConfig::from_url("kafka://127.0.0.1:19092?prefix=demo")?).await?;
//! let bus = CommandBus::new(store);
//! let done = bus.execute("c-1", 5, ExpectedVersion::Any, Metadata::default()).await?;
//! println!("counter c-1 at version {} is {}", done.version, done.state.value);
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | everything; librdkafka is compiled from source by `rdkafka-sys` (needs a C compiler and `make`) |
//!
//! ## Test broker
//!
//! `scripts/kafka-broker.sh` installs and runs Tansu 0.6.0 with its SQLite
//! engine; tests read the broker from `KES_TEST_KAFKA_BROKERS` (skipped
//! without it, failed when `CI` is set). What Tansu 0.6.0 does that shaped
//! this crate (measured):
//!
//! - it serves each record with a query over every stored header of the
//!   broker, so reads slow down as headers accumulate: KES writes few
//!   headers and reads only the records it needs;
//! - its SQLite engine panics (and stops serving) on a produce with a
//!   producer epoch it did not issue, which is what librdkafka's idempotent
//!   producer uses after a message timed out: the store replaces its
//!   producer after a timed-out send;
//! - it deletes every record of a topic with `retention.ms=-1`.
//!
//! ## Reading the source
//!
//! | module | what it owns |
//! |---|---|
//! | `store` | [`KafkaStore`], the state its clones share, the [`kes_core::EventStore`] methods (each delegates) |
//! | `append` | one command's record: decided on the table, sent, answered on the log's verdict |
//! | `validity` | the validity rule every reader applies |
//! | `follower` | the in-order applier of each partition (start-up, follower task, fast path), gaps, halts |
//! | `ownership` | the consumer group choosing each partition's table-record writer; epoch markers and fencing |
//! | `reads` | watermarks, bounded reads, a stream's pages, subscriptions (trailing the follower) |
//! | `tail` | each partition's last applied records, which subscriptions at the head take |
//! | `recovery` | the start-up load (fenced) and catch-up |
//! | `table` | the in-memory table: a row taken out to change, per-partition progress, the read cache |
//! | `rows` | the table's rows, packed into one allocation each and found by id |
//! | `table_writer` | table records (delayed, one per aggregate at a time, retried) and `flush` |
//! | `topics` | creating the topics, refusing unsafe configurations, partition counts |
//! | `client` | librdkafka settings, the producer and the consumers |
//! | `keys` | [`KafkaKeyStore`]: the keys of personal data in the compacted topic `{prefix}.keys` |
//! | [`record`] | the JSON documents on both topics |

mod append;
mod client;
mod config;
mod error;
mod follower;
mod keys;
mod ownership;
mod reads;
pub mod record;
mod recovery;
mod rows;
mod store;
mod table;
mod table_writer;
mod tail;
mod topics;
mod validity;

pub use client::PRODUCER_IN_FLIGHT;
pub use config::{DEFAULT_FOLLOW_WAIT, KafkaStoreConfig, THOUSAND_YEARS_MS};
pub use error::KafkaStoreError;
pub use follower::{FollowerStats, HaltedPartition};
pub use keys::KafkaKeyStore;
pub use store::KafkaStore;
