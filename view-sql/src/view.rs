//! [`SqlView`]: the tables, the write path and the query path.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use kes_core::{
    Checkpoint, FieldType, FieldValue, Lease, ListItem, ListQuery, ListView, Page, Position, QueryError, Row,
    RowChange, StoredState, ViewCopy, ViewError, ViewSchema, ViewStore,
};
use kes_core::{Cursor, SchemaError, ViewProgress};
use kes_sql::{DbRow, Pool, Statement, Tx};
use sqlx::Row as _;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqlitePoolOptions;

use crate::copy;
use crate::error::SqlViewError;
use crate::sql::{self, Arg, Dialect, Sql};

/// Where the examples keep their list views when no URL is given.
pub const DEFAULT_URL: &str = "sqlite://data/views.db";

/// The table holding every view copy's checkpoint.
const CHECKPOINTS: &str = "kes_view_checkpoints";

/// The table holding every view's lease: who writes it, until when (by the
/// database clock, seconds since the epoch) and the fence of its takeover.
const LEASES: &str = "kes_view_leases";

/// PostgreSQL's `idle_in_transaction_session_timeout` on the view's pool
/// unless set: below the runner's default lease (5 s), so that a stalled
/// writer's transaction (holding the lease row) ends before a standby
/// would wait long on it.
const DEFAULT_IDLE_IN_TRANSACTION: Duration = Duration::from_secs(2);
/// How long a list query (page and total) may run on PostgreSQL by default.
const DEFAULT_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bound values per statement: below SQLite's 32766 and
/// PostgreSQL's 65535.
const MAX_ARGS: usize = 30_000;

/// Most rows per multi-row statement; larger ones stop paying off.
const MAX_ROWS_PER_STATEMENT: usize = 1_000;

/// Most rows per PostgreSQL array upsert (one bound array per column, so
/// the limit on bound values does not apply).
const MAX_ROWS_PER_ARRAY_STATEMENT: usize = 10_000;

/// Serialises schema setup across processes sharing one PostgreSQL
/// database: concurrent `CREATE … IF NOT EXISTS` can otherwise collide.
const SETUP_LOCK: i64 = 0x6b65_735f_7669_6577;

/// Run after `BEGIN` by the transactions that fill or prepare a shadow copy
/// on PostgreSQL: they need not wait for the WAL flush (`begin_write` sends
/// it to PostgreSQL only).
const ASYNC_COMMIT: &str = "SET LOCAL synchronous_commit = off";

/// One column of a PostgreSQL upsert, bound as an array.
#[derive(Debug)]
enum PgArray {
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
}

impl PgArray {
    fn new(ty: FieldType, capacity: usize) -> Self {
        match ty {
            FieldType::Text | FieldType::Keyword => Self::Text(Vec::with_capacity(capacity)),
            FieldType::Integer | FieldType::Timestamp => Self::Int(Vec::with_capacity(capacity)),
            FieldType::Float => Self::Float(Vec::with_capacity(capacity)),
            FieldType::Bool => Self::Bool(Vec::with_capacity(capacity)),
        }
    }

    /// Appends `value` (a row was checked against the schema, so its type
    /// is the column's; anything else is stored as NULL).
    fn push(&mut self, value: Option<&FieldValue>) {
        match (self, value) {
            (Self::Text(v), Some(FieldValue::Text(t))) => v.push(Some(t.clone())),
            (Self::Int(v), Some(FieldValue::Integer(i))) => v.push(Some(*i)),
            (Self::Int(v), Some(t @ FieldValue::Timestamp(_))) => v.push(t.as_micros()),
            (Self::Float(v), Some(FieldValue::Float(f))) => v.push(Some(*f)),
            (Self::Bool(v), Some(FieldValue::Bool(b))) => v.push(Some(*b)),
            (Self::Text(v), _) => v.push(None),
            (Self::Int(v), _) => v.push(None),
            (Self::Float(v), _) => v.push(None),
            (Self::Bool(v), _) => v.push(None),
        }
    }
}

/// The statements that write a batch of rows.
enum Upserts {
    /// PostgreSQL: one `INSERT … SELECT FROM UNNEST(…)` per column type
    /// set, its values bound as arrays.
    Arrays(Vec<PgUpsert>),
    /// SQLite: multi-row `INSERT … VALUES`.
    Rows(Vec<Sql>),
}

/// A PostgreSQL `INSERT … SELECT FROM UNNEST(…)` and its arrays.
#[derive(Debug)]
struct PgUpsert {
    text: String,
    arrays: Vec<PgArray>,
}

impl PgUpsert {
    fn query(&self) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        let mut query = sqlx::query::<sqlx::Postgres>(&self.text);
        for array in &self.arrays {
            query = match array {
                PgArray::Text(v) => query.bind(v),
                PgArray::Int(v) => query.bind(v),
                PgArray::Float(v) => query.bind(v),
                PgArray::Bool(v) => query.bind(v),
            };
        }
        query
    }
}

/// Where a [`SqlView`] lives and how it runs. `SqlViewConfig::from_url(url)`
/// gives the defaults; a URL alone converts into one
/// (`SqlView::open("sqlite::memory:", schema)`).
#[derive(Clone)]
pub struct SqlViewConfig {
    url: String,
    /// PostgreSQL only: the schema (namespace) holding the view's tables,
    /// created when missing; `None` keeps the connection's search path.
    /// Lets several applications or tests share one database.
    schema: Option<String>,
    /// Most connections in the read pool (default 5). SQLite writes always
    /// go through one connection of their own: SQLite has one writer.
    max_connections: Option<u32>,
    /// PostgreSQL only: `idle_in_transaction_session_timeout` of the
    /// view's connections (default 2 s). Keep it below the runners'
    /// [`kes_core::RunnerConfig::lease_ttl`]: a writer stalled inside a
    /// transaction holds the lease row, and this is how long a standby
    /// may wait on it.
    idle_in_transaction_timeout: Option<Duration>,
    /// PostgreSQL only: the `statement_timeout` of each list query, its
    /// page and its total (default 10 s). A query the indexes cannot serve
    /// (a full-text `q` over a large view, say) is cancelled there and
    /// answered as unavailable, instead of scanning for as long as it takes.
    list_timeout: Option<Duration>,
}

impl std::fmt::Debug for SqlViewConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlViewConfig")
            .field("url", &kes_sql::redact(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("idle_in_transaction_timeout", &self.idle_in_transaction_timeout)
            .field("list_timeout", &self.list_timeout)
            .finish()
    }
}

kes_sql::config_from_url!(SqlViewConfig);

impl SqlViewConfig {
    /// The default settings for the database at `url` (`postgres://…` or
    /// `sqlite:PATH`). The URL is checked when the view opens.
    pub fn from_url(url: &str) -> Self {
        Self {
            url: url.trim().to_owned(),
            schema: None,
            max_connections: None,
            idle_in_transaction_timeout: None,
            list_timeout: None,
        }
    }

    /// Puts the view's tables into PostgreSQL schema `name`.
    pub fn schema(mut self, name: impl Into<String>) -> Self {
        self.schema = Some(name.into());
        self
    }

    /// Sets the size of the read pool.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Sets PostgreSQL's `idle_in_transaction_session_timeout` (below the
    /// lease time of the runners writing the view).
    pub fn idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_in_transaction_timeout = Some(timeout);
        self
    }

    /// Sets how long a list query may run on PostgreSQL.
    pub fn list_timeout(mut self, timeout: Duration) -> Self {
        self.list_timeout = Some(timeout);
        self
    }
}

/// A list view in PostgreSQL or SQLite: a table per view copy (live, and a
/// shadow while rebuilding) with one typed column per schema field, indexes
/// on `(field, id)` for filterable and sortable fields, and the checkpoint
/// of each copy in `kes_view_checkpoints`, written in the same transaction
/// as the rows.
///
/// It implements [`ListView`] (queries) and [`ViewStore`] (what
/// [`kes_core::ViewProjection`] writes through).
#[derive(Debug)]
pub struct SqlView {
    schema: ViewSchema,
    dialect: Dialect,
    read: Pool,
    write: Pool,
    live: String,
    shadow: String,
    /// `SET LOCAL statement_timeout` of a PostgreSQL list transaction.
    list_timeout: String,
}

/// The number a counting statement (`SELECT COUNT(*) …`) answers.
async fn count(tx: &mut Tx, sql: &Sql) -> Result<i64, sqlx::Error> {
    tx.fetch_scalar::<i64>(&sql.statement()).await?.ok_or(sqlx::Error::RowNotFound)
}

/// A stored checkpoint and schema version, if the statement found one.
async fn stored_checkpoint(tx: &mut Tx, sql: &Sql) -> Result<Option<(String, i64)>, sqlx::Error> {
    match tx.fetch_optional(&sql.statement()).await? {
        Some(r) => Ok(Some((r.get(0)?, r.get(1)?))),
        None => Ok(None),
    }
}

/// Runs the fence check of `lease` in `tx`: the view's lease row still
/// names it, or the write is refused as fenced.
async fn check_fence(view: &SqlView, tx: &mut Tx, fence: &Sql, lease: &Lease) -> Result<(), SqlViewError> {
    if tx.execute(&fence.statement()).await? == 0 {
        return Err(view.fenced_error(lease));
    }
    Ok(())
}

/// Reads one page row: `id`, `_version`, then the schema's fields.
fn item(row: &DbRow, schema: &ViewSchema) -> Result<ListItem, SqlViewError> {
    let id: String = row.get(0)?;
    let corrupt = |reason: String| SqlViewError::Corrupt { id: id.clone(), reason };
    let version: i64 = row.get(1).map_err(|e| corrupt(e.to_string()))?;
    let version = u64::try_from(version).map_err(|_| corrupt(format!("negative version {version}")))?;
    let mut values = Row::new();
    for (i, field) in schema.fields.iter().enumerate() {
        let at = i + 2;
        let value = match field.ty {
            FieldType::Text | FieldType::Keyword => row.get::<Option<String>>(at).map(|v| v.map(FieldValue::Text)),
            FieldType::Integer => row.get::<Option<i64>>(at).map(|v| v.map(FieldValue::Integer)),
            FieldType::Float => row.get::<Option<f64>>(at).map(|v| v.map(FieldValue::Float)),
            FieldType::Bool => row.get::<Option<bool>>(at).map(|v| v.map(FieldValue::Bool)),
            FieldType::Timestamp => match row.get::<Option<i64>>(at) {
                Ok(Some(micros)) => match Utc.timestamp_micros(micros).single() {
                    Some(t) => Ok(Some(FieldValue::Timestamp(t))),
                    None => return Err(corrupt(format!("{}: timestamp {micros} out of range", field.name))),
                },
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            },
        }
        .map_err(|e| corrupt(format!("{}: {e}", field.name)))?;
        if let Some(value) = value {
            values.insert(field.name.clone(), value);
        }
    }
    Ok(ListItem { id, version, row: values })
}

/// The condition of an upsert's update on `table`: a row never moves back
/// to an older version. A projector that lags behind another on the same
/// view (two processes, a rolling deploy) writes the versions it folds as
/// they were and cannot undo a newer row; an equal version is written
/// again (a replay after a crash writes what was there).
fn never_older(table: &str) -> String {
    format!("{table}._version <= excluded._version")
}

fn copy_name(copy: ViewCopy) -> &'static str {
    match copy {
        ViewCopy::Live => "live",
        ViewCopy::Shadow => "shadow",
    }
}

fn progress_of(view: &str, stored: Option<(String, i64)>) -> Result<Option<ViewProgress>, SqlViewError> {
    let Some((text, version)) = stored else { return Ok(None) };
    let corrupt = |reason: String| SqlViewError::Corrupt { id: format!("checkpoint of view {view}"), reason };
    let checkpoint = Checkpoint::from_json(&text).map_err(|e| corrupt(e.to_string()))?;
    let schema_version = u32::try_from(version).map_err(|_| corrupt(format!("schema version {version}")))?;
    Ok(Some(ViewProgress { checkpoint, schema_version }))
}

impl SqlView {
    /// Opens (creating when missing) the view of `schema` in the database
    /// `config` names — or at a URL: `postgres://…` or `sqlite://path` (the
    /// file and its directory are created; [`DEFAULT_URL`] is what the
    /// examples use).
    // Kept in one piece: Setup in the order it must happen (connect, schema, tables, version check, rebuild
    // decision): each step uses what the previous made.
    pub async fn open(config: impl Into<SqlViewConfig>, schema: ViewSchema) -> Result<Self, SqlViewError> {
        let options = config.into();
        let url = options.url.as_str();
        schema.validate()?;
        let max = options.max_connections.unwrap_or(5).max(1);
        let (dialect, read, write) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut connect = PgConnectOptions::from_str(url)?;
            if let Some(name) = &options.schema {
                if !kes_core::is_plain_name(name) {
                    return Err(SqlViewError::BadSchemaName(name.clone()));
                }
                connect = connect.options([("search_path", name.as_str())]);
            }
            let idle = options.idle_in_transaction_timeout.unwrap_or(DEFAULT_IDLE_IN_TRANSACTION);
            connect = connect.options([("idle_in_transaction_session_timeout", idle.as_millis().max(1).to_string())]);
            let pool = kes_sql::pg_pool_options()
                .max_connections(max)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(connect)
                .await?;
            (Dialect::Postgres, Pool::Postgres(pool.clone()), Pool::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let target = kes_sql::sqlite_options(url, kes_sql::Durability::Rebuildable).map_err(|e| match e {
                kes_sql::SqliteSetupError::Url(e) => SqlViewError::Database(e),
                kes_sql::SqliteSetupError::Folder { path, source } => {
                    SqlViewError::Directory { path: path.display().to_string(), source }
                }
            })?;
            let connect = target.options;
            if target.in_memory {
                // One connection keeps an in-memory database alive and whole.
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with(connect)
                    .await?;
                (Dialect::Sqlite, Pool::Sqlite(pool.clone()), Pool::Sqlite(pool))
            } else {
                let write = SqlitePoolOptions::new().max_connections(1).connect_with(connect.clone()).await?;
                let read = SqlitePoolOptions::new().max_connections(max).connect_with(connect).await?;
                (Dialect::Sqlite, Pool::Sqlite(read), Pool::Sqlite(write))
            }
        } else {
            let scheme = url.split(':').next().unwrap_or_default();
            return Err(SqlViewError::BadUrl(format!("{scheme}: (expected postgres:// or sqlite:)")));
        };
        let view = Self {
            live: format!("view_{}", schema.name),
            shadow: format!("shadow_{}", schema.name),
            list_timeout: format!(
                "SET LOCAL statement_timeout = {}",
                options.list_timeout.unwrap_or(DEFAULT_LIST_TIMEOUT).as_millis().max(1)
            ),
            schema,
            dialect,
            read,
            write,
        };
        view.setup(options.schema.as_deref()).await?;
        Ok(view)
    }

    /// The dialect of the database behind the view.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The name of the table serving queries (`view_{name}`).
    pub fn table(&self) -> &str {
        &self.live
    }

    fn table_of(&self, copy: ViewCopy) -> &str {
        match copy {
            ViewCopy::Live => &self.live,
            ViewCopy::Shadow => &self.shadow,
        }
    }

    fn text_type(&self) -> &'static str {
        sql::column_type(self.dialect, FieldType::Text)
    }

    /// The statement creating an empty copy named `table`, without its
    /// secondary indexes (`create_indexes`).
    fn create_table(&self, table: &str) -> String {
        let mut columns = format!(
            "id {} PRIMARY KEY, _version BIGINT NOT NULL, _state TEXT NOT NULL, _live BOOLEAN NOT NULL",
            self.text_type()
        );
        for f in &self.schema.fields {
            columns.push_str(&format!(", {} {}", sql::column(f), sql::column_type(self.dialect, f.ty)));
        }
        for f in self.schema.fields.iter().filter(|f| f.searchable) {
            columns.push_str(&format!(", {} {}", sql::search_column(f), self.text_type()));
        }
        format!("CREATE TABLE {table} ({columns})")
    }

    /// The statements creating the `(field, id)` indexes of the filterable
    /// and sortable fields on copy `table`, each `IF NOT EXISTS` and named
    /// `ix_{token}_{n}_{view}`. Index names are unique per schema in
    /// PostgreSQL and per database in SQLite, and survive a rename: the
    /// token keeps a copy's names clear of another copy's
    /// ([`fresh_token`], or the shadow table's OID). The view's name comes
    /// last, where PostgreSQL's limit of 63 bytes would cut it.
    fn create_indexes(&self, table: &str, token: &str) -> Vec<String> {
        self.schema
            .fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.filterable || f.sortable)
            .map(|(n, f)| {
                format!(
                    "CREATE INDEX IF NOT EXISTS \"ix_{token}_{n}_{}\" ON {table} ({}, id)",
                    self.schema.name,
                    sql::column(f)
                )
            })
            .collect()
    }

    /// Counts the secondary indexes of `table` (the primary key left out).
    fn count_indexes_sql(&self, table: &str) -> Sql {
        let mut sql = Sql::new(match self.dialect {
            Dialect::Postgres => {
                "SELECT COUNT(*) FROM pg_index i WHERE i.indrelid = to_regclass($1) AND NOT i.indisprimary"
            }
            // The primary key's automatic index has no SQL text.
            Dialect::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL"
            }
        });
        sql.args.push(Arg::Text(Some(table.to_owned())));
        sql
    }

    async fn setup(&self, schema: Option<&str>) -> Result<(), SqlViewError> {
        let exists = self.exists_sql(&self.live);
        let columns = match self.dialect {
            Dialect::Postgres => Sql::new(
                "SELECT column_name::text FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = $1",
            ),
            Dialect::Sqlite => Sql::new("SELECT name FROM pragma_table_info($1)"),
        };
        let mut columns = columns;
        columns.args.push(Arg::Text(Some(self.live.clone())));
        let checkpoints = format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINTS} (view_name TEXT NOT NULL, view_copy TEXT NOT NULL, \
             checkpoint TEXT NOT NULL, schema_version BIGINT NOT NULL, PRIMARY KEY (view_name, view_copy))"
        );
        let leases = format!(
            "CREATE TABLE IF NOT EXISTS {LEASES} (view_name TEXT NOT NULL PRIMARY KEY, lease_owner TEXT, \
             lease_until DOUBLE PRECISION NOT NULL, fence BIGINT NOT NULL)"
        );
        let mut tx = self.write.begin_write(None).await?;
        if self.dialect == Dialect::Postgres {
            tx.execute(&Statement::new("SELECT pg_advisory_xact_lock($1)").int(SETUP_LOCK)).await?;
        }
        if let (Some(name), Dialect::Postgres) = (schema, self.dialect) {
            tx.execute(&Statement::new(format!("CREATE SCHEMA IF NOT EXISTS \"{name}\""))).await?;
        }
        tx.execute(&Statement::new(checkpoints)).await?;
        tx.execute(&Statement::new(leases)).await?;
        if count(&mut tx, &exists).await? == 0 {
            let mut statements = vec![self.create_table(&self.live)];
            statements.extend(self.create_indexes(&self.live, &fresh_token()));
            for statement in statements {
                tx.execute(&Statement::new(statement)).await?;
            }
        } else {
            // A copy built from an older schema keeps answering until the
            // rebuild swaps a new one in: give it the new columns.
            let have: Vec<String> =
                tx.fetch_all(&columns.statement()).await?.iter().map(|r| r.get(0)).collect::<Result<_, _>>()?;
            let mut wanted: Vec<(String, &'static str)> =
                self.schema.fields.iter().map(|f| (f.name.clone(), sql::column_type(self.dialect, f.ty))).collect();
            wanted.extend(
                self.schema
                    .fields
                    .iter()
                    .filter(|f| f.searchable)
                    .map(|f| (format!("_lc_{}", f.name), self.text_type())),
            );
            for (name, ty) in wanted.into_iter().filter(|(n, _)| !have.contains(n)) {
                tx.execute(&Statement::new(format!("ALTER TABLE {} ADD COLUMN \"{name}\" {ty}", self.live))).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    fn exists_sql(&self, table: &str) -> Sql {
        let mut sql = Sql::new(match self.dialect {
            Dialect::Postgres => {
                "SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = $1"
            }
            Dialect::Sqlite => "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
        });
        sql.args.push(Arg::Text(Some(table.to_owned())));
        sql
    }

    /// PostgreSQL text cannot hold NUL; refuse such values up front rather
    /// than let the database fail the statement.
    fn check_text(&self, text: &str) -> bool {
        self.dialect != Dialect::Postgres || !text.contains('\0')
    }

    /// A copy's columns in the order its writes bind them: the id, the
    /// version, the state, the live flag, the fields, then the searchable
    /// fields' lower-cased copies.
    fn columns(&self) -> Vec<String> {
        let fields = &self.schema.fields;
        let mut columns = vec!["id".to_owned(), "_version".into(), "_state".into(), "_live".into()];
        columns.extend(fields.iter().map(sql::column));
        columns.extend(fields.iter().filter(|f| f.searchable).map(sql::search_column));
        columns
    }

    fn upserts(&self, table: &str, changes: &[&RowChange]) -> Result<Vec<Sql>, SqlViewError> {
        let fields = &self.schema.fields;
        let searchable: Vec<_> = fields.iter().filter(|f| f.searchable).collect();
        let columns = self.columns();
        let head = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
        let tail = format!(
            " ON CONFLICT (id) DO UPDATE SET {} WHERE {}",
            columns[1..].iter().map(|c| format!("{c} = excluded.{c}")).collect::<Vec<_>>().join(", "),
            never_older(table)
        );
        let per_statement = (MAX_ARGS / columns.len()).clamp(1, MAX_ROWS_PER_STATEMENT);
        let mut statements = Vec::new();
        for chunk in changes.chunks(per_statement) {
            let mut sql = Sql::new(head.clone());
            for (n, change) in chunk.iter().enumerate() {
                let version = i64::try_from(change.version)
                    .map_err(|_| SqlViewError::Corrupt { id: change.id.clone(), reason: "version too large".into() })?;
                let state = change.state.get().to_owned();
                sql.push(if n == 0 { "(" } else { ", (" });
                sql.arg(Arg::Text(Some(change.id.clone())))
                    .push(", ")
                    .arg(Arg::Int(Some(version)))
                    .push(", ")
                    .arg(Arg::Text(Some(state)))
                    .push(", ")
                    .arg(Arg::Bool(Some(change.row.is_some())));
                for f in fields {
                    let value = change.row.as_ref().and_then(|r| r.get(&f.name));
                    sql.push(", ").arg(value.map_or_else(|| Arg::null(f.ty), Arg::of));
                }
                for f in &searchable {
                    sql.push(", ").arg(Arg::Text(sql::search_value(change.row.as_ref(), f)));
                }
                sql.push(")");
            }
            sql.push(&tail);
            statements.push(sql);
        }
        Ok(statements)
    }

    /// PostgreSQL upserts of `changes`: each column bound as one array and
    /// expanded by `UNNEST`, so that the statement text (prepared once per
    /// connection) and its planning cost do not grow with the rows.
    fn pg_upserts(&self, table: &str, changes: &[&RowChange]) -> Result<Vec<PgUpsert>, SqlViewError> {
        let fields = &self.schema.fields;
        let searchable: Vec<_> = fields.iter().filter(|f| f.searchable).collect();
        let columns = self.columns();
        let mut types = vec!["text[]", "bigint[]", "text[]", "boolean[]"];
        types.extend(fields.iter().map(|f| match f.ty {
            FieldType::Text | FieldType::Keyword => "text[]",
            FieldType::Integer | FieldType::Timestamp => "bigint[]",
            FieldType::Float => "float8[]",
            FieldType::Bool => "boolean[]",
        }));
        types.extend(searchable.iter().map(|_| "text[]"));
        let arrays: Vec<String> = types.iter().enumerate().map(|(i, ty)| format!("${}::{ty}", i + 1)).collect();
        let text = format!(
            "INSERT INTO {table} ({}) SELECT * FROM UNNEST({}) ON CONFLICT (id) DO UPDATE SET {} WHERE {}",
            columns.join(", "),
            arrays.join(", "),
            columns[1..].iter().map(|c| format!("{c} = excluded.{c}")).collect::<Vec<_>>().join(", "),
            never_older(table)
        );
        let mut statements = Vec::new();
        for chunk in changes.chunks(MAX_ROWS_PER_ARRAY_STATEMENT) {
            let mut ids = Vec::with_capacity(chunk.len());
            let mut versions = Vec::with_capacity(chunk.len());
            let mut states = Vec::with_capacity(chunk.len());
            let mut live = Vec::with_capacity(chunk.len());
            let mut values: Vec<PgArray> = fields.iter().map(|f| PgArray::new(f.ty, chunk.len())).collect();
            let mut lowered: Vec<Vec<Option<String>>> =
                searchable.iter().map(|_| Vec::with_capacity(chunk.len())).collect();
            for change in chunk {
                let version = i64::try_from(change.version)
                    .map_err(|_| SqlViewError::Corrupt { id: change.id.clone(), reason: "version too large".into() })?;
                let state = change.state.get().to_owned();
                ids.push(Some(change.id.clone()));
                versions.push(Some(version));
                states.push(Some(state));
                live.push(Some(change.row.is_some()));
                for (f, array) in fields.iter().zip(&mut values) {
                    array.push(change.row.as_ref().and_then(|r| r.get(&f.name)));
                }
                for (f, array) in searchable.iter().zip(&mut lowered) {
                    array.push(sql::search_value(change.row.as_ref(), f));
                }
            }
            let mut arrays =
                vec![PgArray::Text(ids), PgArray::Int(versions), PgArray::Text(states), PgArray::Bool(live)];
            arrays.extend(values);
            arrays.extend(lowered.into_iter().map(PgArray::Text));
            statements.push(PgUpsert { text: text.clone(), arrays });
        }
        Ok(statements)
    }

    fn checkpoint_sql(&self, copy: ViewCopy, checkpoint: &Checkpoint) -> Sql {
        let mut sql = Sql::new(format!(
            "INSERT INTO {CHECKPOINTS} (view_name, view_copy, checkpoint, schema_version) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (view_name, view_copy) DO UPDATE SET checkpoint = excluded.checkpoint, \
             schema_version = excluded.schema_version"
        ));
        sql.args = vec![
            Arg::Text(Some(self.schema.name.clone())),
            Arg::Text(Some(copy_name(copy).into())),
            Arg::Text(Some(checkpoint.to_json())),
            Arg::Int(Some(i64::from(self.schema.version))),
        ];
        sql
    }

    fn checks(&self, changes: &[RowChange]) -> Result<(), SqlViewError> {
        let nul = |what: String| SchemaError {
            view: self.schema.name.clone(),
            reason: format!("{what} holds a NUL character, which PostgreSQL text cannot store"),
        };
        for change in changes {
            if !self.check_text(&change.id) {
                return Err(nul(format!("id {:?}", change.id)).into());
            }
            if let Some(row) = &change.row {
                self.schema.check_row(row)?;
                for (name, value) in row {
                    if matches!(value, FieldValue::Text(t) if !self.check_text(t)) {
                        return Err(nul(format!("field {name} of {}", change.id)).into());
                    }
                }
            }
        }
        Ok(())
    }

    /// The database clock, in seconds since the epoch.
    fn now_sql(&self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => "EXTRACT(EPOCH FROM clock_timestamp())::float8",
            Dialect::Sqlite => "((julianday('now') - 2440587.5) * 86400.0)",
        }
    }

    /// A bound duration in seconds.
    fn seconds_arg(&self, n: usize) -> String {
        match self.dialect {
            Dialect::Postgres => format!("${n}::float8"),
            Dialect::Sqlite => format!("${n}"),
        }
    }

    fn fence_value(lease: &Lease) -> Result<i64, SqlViewError> {
        i64::try_from(lease.fence).map_err(|_| SqlViewError::Fenced(format!("fence {} out of range", lease.fence)))
    }

    /// The fence: the first statement of every fenced write transaction.
    /// It updates (and so locks, until the commit) the view's lease row if
    /// and only if `lease` is still the current one; 0 rows → refused.
    fn fence_sql(&self, lease: &Lease) -> Result<Sql, SqlViewError> {
        let mut sql = Sql::new(format!(
            "UPDATE {LEASES} SET fence = fence WHERE view_name = $1 AND lease_owner = $2 AND fence = $3"
        ));
        sql.args = vec![
            Arg::Text(Some(self.schema.name.clone())),
            Arg::Text(Some(lease.owner.clone())),
            Arg::Int(Some(Self::fence_value(lease)?)),
        ];
        Ok(sql)
    }

    fn fenced_error(&self, lease: &Lease) -> SqlViewError {
        SqlViewError::Fenced(format!(
            "view {}: the lease of {} (fence {}) is no longer current",
            self.schema.name, lease.owner, lease.fence
        ))
    }

    /// The stored checkpoint of `copy` and the schema version it was built
    /// with, read in the write transaction.
    fn stored_checkpoint_sql(&self, copy: ViewCopy) -> Sql {
        let mut sql = Sql::new(format!(
            "SELECT checkpoint, schema_version FROM {CHECKPOINTS} WHERE view_name = $1 AND view_copy = $2"
        ));
        sql.args = vec![Arg::Text(Some(self.schema.name.clone())), Arg::Text(Some(copy_name(copy).into()))];
        sql
    }

    /// Refuses to move a checkpoint back (`stored` is what the copy has),
    /// and to write into a copy built with another schema version (an
    /// older writer left over from a rolling deploy, or a newer one that
    /// has not rebuilt yet).
    fn check_forward(&self, stored: Option<(String, i64)>, next: &Checkpoint) -> Result<(), SqlViewError> {
        let Some(stored) = progress_of(&self.schema.name, stored)? else { return Ok(()) };
        if stored.schema_version != self.schema.version {
            return Err(SqlViewError::Fenced(format!(
                "view {}: the copy was built with schema version {}, this writer has version {}",
                self.schema.name, stored.schema_version, self.schema.version
            )));
        }
        if next.covers_all(&stored.checkpoint) {
            Ok(())
        } else {
            Err(SqlViewError::Fenced(format!(
                "view {}: checkpoint {} would move back from {}",
                self.schema.name,
                next.to_json(),
                stored.checkpoint.to_json()
            )))
        }
    }

    /// Refuses a swap whose new copy (`shadow`, its stored checkpoint and
    /// version) has not reached the live one on every partition.
    fn check_swap(&self, live: Option<(String, i64)>, shadow: Option<(String, i64)>) -> Result<(), SqlViewError> {
        let checkpoint =
            |stored| progress_of(&self.schema.name, stored).map(|p| p.map(|p| p.checkpoint).unwrap_or_default());
        let (live, shadow) = (checkpoint(live)?, checkpoint(shadow)?);
        if shadow.covers_all(&live) {
            Ok(())
        } else {
            Err(SqlViewError::Fenced(format!(
                "view {}: the new copy ({}) is behind the live one ({}); not swapped",
                self.schema.name,
                shadow.to_json(),
                live.to_json()
            )))
        }
    }

    /// Takes the view's lease for `owner` when it is free, expired (by the
    /// database clock) or `owner`'s already; every take bumps the fence.
    async fn take_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, SqlViewError> {
        let now = self.now_sql();
        let mut sql = Sql::new(format!(
            "INSERT INTO {LEASES} (view_name, lease_owner, lease_until, fence) VALUES ($1, $2, {now} + {ttl}, 1) \
             ON CONFLICT (view_name) DO UPDATE SET lease_owner = excluded.lease_owner, \
             lease_until = excluded.lease_until, fence = {LEASES}.fence + 1 \
             WHERE {LEASES}.lease_owner IS NULL OR {LEASES}.lease_owner = excluded.lease_owner \
             OR {LEASES}.lease_until < {now} RETURNING fence",
            ttl = self.seconds_arg(3)
        ));
        sql.args = vec![
            Arg::Text(Some(self.schema.name.clone())),
            Arg::Text(Some(owner.to_owned())),
            Arg::Float(Some(ttl.as_secs_f64())),
        ];
        let fence: Option<i64> = self.write.fetch_scalar(&sql.statement()).await?;
        Ok(fence.map(|f| Lease { owner: owner.to_owned(), fence: u64::try_from(f).unwrap_or(0) }))
    }

    /// Extends `lease` by `ttl` from now (database clock) if it is still
    /// the current one.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, SqlViewError> {
        let mut sql = Sql::new(format!(
            "UPDATE {LEASES} SET lease_until = {} + {} WHERE view_name = $1 AND lease_owner = $2 AND fence = $3",
            self.now_sql(),
            self.seconds_arg(4)
        ));
        sql.args = vec![
            Arg::Text(Some(self.schema.name.clone())),
            Arg::Text(Some(lease.owner.clone())),
            Arg::Int(Some(Self::fence_value(lease)?)),
            Arg::Float(Some(ttl.as_secs_f64())),
        ];
        let rows = self.write.execute(&sql.statement()).await?;
        Ok(rows == 1)
    }

    /// Frees `lease` if it is still the current one.
    async fn release(&self, lease: &Lease) -> Result<(), SqlViewError> {
        let mut sql = Sql::new(format!(
            "UPDATE {LEASES} SET lease_owner = NULL, lease_until = 0 \
             WHERE view_name = $1 AND lease_owner = $2 AND fence = $3"
        ));
        sql.args = vec![
            Arg::Text(Some(self.schema.name.clone())),
            Arg::Text(Some(lease.owner.clone())),
            Arg::Int(Some(Self::fence_value(lease)?)),
        ];
        self.write.execute(&sql.statement()).await?;
        Ok(())
    }

    /// A rebuild's batch ([`ViewStore::write_shadow_fenced`]): on
    /// PostgreSQL the rows new to the shadow go in by `COPY`. Should the
    /// shadow hold one of them after all, its primary key fails the
    /// `COPY`, the transaction is rolled back, and the whole batch is
    /// written again as upserts.
    async fn write_shadow(
        &self,
        new: Vec<RowChange>,
        known: Vec<RowChange>,
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), SqlViewError> {
        if self.dialect == Dialect::Postgres && !new.is_empty() {
            match self.write_copy(ViewCopy::Shadow, &known, &new, checkpoint, Some(lease)).await {
                Err(e) if e.is_unique_violation() => {
                    tracing::debug!(view = %self.schema.name, "a row new to the shadow copy was there: upserting the batch");
                }
                written => return written,
            }
        }
        let mut changes = new;
        changes.extend(known);
        self.write_copy(ViewCopy::Shadow, &changes, &[], checkpoint, Some(lease)).await
    }

    /// Writes `changes` (upserts) and `new` (rows `copy` does not hold,
    /// copied in; PostgreSQL only) with `checkpoint`, in one transaction.
    async fn write_copy(
        &self,
        copy: ViewCopy,
        changes: &[RowChange],
        new: &[RowChange],
        checkpoint: &Checkpoint,
        lease: Option<&Lease>,
    ) -> Result<(), SqlViewError> {
        self.checks(changes)?;
        self.checks(new)?;
        let fence = lease.map(|l| self.fence_sql(l)).transpose()?;
        let stored = self.stored_checkpoint_sql(copy);
        let last = newest_per_id(changes);
        let table = self.table_of(copy);
        let next = checkpoint;
        let checkpoint = self.checkpoint_sql(copy, checkpoint);
        let exists = self.exists_sql(table);
        let upserts = match self.dialect {
            Dialect::Postgres => Upserts::Arrays(self.pg_upserts(table, &last)?),
            Dialect::Sqlite => Upserts::Rows(self.upserts(table, &last)?),
        };
        let copied = match (self.dialect, new) {
            (_, []) => None,
            (Dialect::Postgres, new) => Some(copy::copy_rows(table, &self.columns(), &self.schema, new)?),
            (Dialect::Sqlite, _) => {
                return Err(SqlViewError::Database(sqlx::Error::Protocol("COPY is PostgreSQL's".into())));
            }
        };
        // A shadow is dropped by the next `begin_rebuild` whatever a crash
        // left of it, so its batches need not wait for the WAL flush; the
        // swap's synchronous commit flushes them all before the copy goes
        // live. Still atomic: a crash loses whole batches, rows and
        // checkpoint together.
        let settings = (copy == ViewCopy::Shadow).then_some(ASYNC_COMMIT);
        let mut tx = self.write.begin_write(settings).await?;
        if let (Some(fence), Some(lease)) = (&fence, lease) {
            check_fence(self, &mut tx, fence, lease).await?;
            let found = stored_checkpoint(&mut tx, &stored).await?;
            self.check_forward(found, next)?;
        }
        if copy == ViewCopy::Shadow {
            // A PostgreSQL upsert or copy into a missing shadow fails as
            // such; with nothing to write, or on SQLite, look first.
            let has_arrays = matches!(&upserts, Upserts::Arrays(a) if !a.is_empty());
            if !has_arrays && copied.is_none() && count(&mut tx, &exists).await? == 0 {
                return Err(SqlViewError::NoRebuild(self.schema.name.clone()));
            }
        }
        if let Some(copied) = copied {
            self.run_copy(copy, copied, &mut tx).await?;
        }
        self.run_upserts(copy, &upserts, &mut tx).await?;
        tx.execute(&checkpoint.statement()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Runs a batch's `COPY` in `tx`; into a shadow that is gone, that is
    /// [`SqlViewError::NoRebuild`].
    async fn run_copy(&self, copy: ViewCopy, copied: copy::CopyRows, tx: &mut Tx) -> Result<(), SqlViewError> {
        let Tx::Postgres(pg) = tx else {
            return Err(SqlViewError::Database(sqlx::Error::Protocol("COPY is PostgreSQL's".into())));
        };
        let sent = async {
            let mut sink = pg.copy_in_raw(&copied.statement).await?;
            sink.send(copied.data).await?;
            sink.finish().await
        };
        match sent.await {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = SqlViewError::from(e);
                Err(if copy == ViewCopy::Shadow && e.is_missing_table() {
                    SqlViewError::NoRebuild(self.schema.name.clone())
                } else {
                    e
                })
            }
        }
    }

    /// Runs a batch's upserts in `tx`; into a shadow that is gone, that is
    /// [`SqlViewError::NoRebuild`].
    async fn run_upserts(&self, copy: ViewCopy, upserts: &Upserts, tx: &mut Tx) -> Result<(), SqlViewError> {
        match (upserts, &mut *tx) {
            (Upserts::Arrays(statements), Tx::Postgres(pg)) => {
                for statement in statements {
                    if let Err(e) = statement.query().execute(&mut **pg).await {
                        let e = SqlViewError::from(e);
                        return Err(if copy == ViewCopy::Shadow && e.is_missing_table() {
                            SqlViewError::NoRebuild(self.schema.name.clone())
                        } else {
                            e
                        });
                    }
                }
            }
            (Upserts::Rows(statements), _) => {
                for statement in statements {
                    tx.execute(&statement.statement()).await?;
                }
            }
            (Upserts::Arrays(_), Tx::Sqlite(_)) => {
                return Err(SqlViewError::Database(sqlx::Error::Protocol("array upserts are PostgreSQL's".into())));
            }
        }
        Ok(())
    }

    async fn read_states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, SqlViewError> {
        let table = self.table_of(copy);
        let mut out = HashMap::with_capacity(ids.len());
        let missing = |e: sqlx::Error| {
            let e = SqlViewError::from(e);
            if copy == ViewCopy::Shadow && e.is_missing_table() {
                SqlViewError::NoRebuild(self.schema.name.clone())
            } else {
                e
            }
        };
        if let Pool::Postgres(pool) = &self.read {
            // One array parameter: the same statement text for any number of
            // ids. Not a prepared statement: its plan would be cached while
            // a rebuild table is nearly empty (a sequential scan) and kept
            // while the table grows, making every lookup a full scan.
            let sql = format!("SELECT id, _version, _state FROM {table} WHERE id = ANY($1::text[])");
            for chunk in ids.chunks(MAX_ROWS_PER_ARRAY_STATEMENT) {
                let rows = sqlx::query(&sql).bind(chunk).persistent(false).fetch_all(pool).await.map_err(missing)?;
                for row in rows {
                    let (id, version, state): (String, i64, String) =
                        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                    Self::insert_state(&mut out, id, version, &state)?;
                }
            }
            return Ok(out);
        }
        for chunk in ids.chunks(MAX_ROWS_PER_STATEMENT) {
            let mut sql = Sql::new(format!("SELECT id, _version, _state FROM {table} WHERE id IN ("));
            for (i, id) in chunk.iter().enumerate() {
                if i > 0 {
                    sql.push(", ");
                }
                sql.arg(Arg::Text(Some(id.clone())));
            }
            sql.push(")");
            let rows = self.read.fetch_all(&sql.statement()).await.map_err(missing)?;
            let rows = rows
                .iter()
                .map(|r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?, r.get::<String>(2)?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            for (id, version, state) in rows {
                Self::insert_state(&mut out, id, version, &state)?;
            }
        }
        Ok(out)
    }

    /// Reads one stored state into `out`.
    fn insert_state(
        out: &mut HashMap<String, StoredState>,
        id: String,
        version: i64,
        state: &str,
    ) -> Result<(), SqlViewError> {
        let corrupt = |reason: String| SqlViewError::Corrupt { id: id.clone(), reason };
        let version = u64::try_from(version).map_err(|_| corrupt(format!("negative version {version}")))?;
        let state = serde_json::from_str(state).map_err(|e| corrupt(format!("stored state: {e}")))?;
        out.insert(id, StoredState { version, state });
        Ok(())
    }

    async fn read_progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, SqlViewError> {
        let mut sql = Sql::new(format!(
            "SELECT checkpoint, schema_version FROM {CHECKPOINTS} WHERE view_name = $1 AND view_copy = $2"
        ));
        sql.args = vec![Arg::Text(Some(self.schema.name.clone())), Arg::Text(Some(copy_name(copy).into()))];
        let stored = match self.read.fetch_optional(&sql.statement()).await? {
            Some(r) => Some((r.get::<String>(0)?, r.get::<i64>(1)?)),
            None => None,
        };
        progress_of(&self.schema.name, stored)
    }

    /// Refuses text values PostgreSQL could not even compare.
    fn check_query(&self, query: &kes_core::ValidQuery) -> Result<(), QueryError> {
        for f in &query.filters {
            for v in &f.values {
                if matches!(v, FieldValue::Text(t) if !self.check_text(t)) {
                    return Err(QueryError::BadValue {
                        field: f.field.name.clone(),
                        ty: f.field.ty,
                        value: "a value with a NUL character".into(),
                    });
                }
            }
        }
        if query.q.as_deref().is_some_and(|q| !self.check_text(q)) {
            return Err(QueryError::BadSearch("NUL characters are not allowed".into()));
        }
        Ok(())
    }

    async fn list_once(&self, page: &Sql, count_sql: &Sql) -> Result<(Vec<ListItem>, u64), SqlViewError> {
        // One snapshot for the page and its total.
        let mut tx = self.read.begin_snapshot().await?;
        if self.dialect == Dialect::Postgres {
            // A query no index serves is cut off, not left to scan.
            tx.execute(&Statement::new(self.list_timeout.as_str())).await?;
        }
        let rows = tx.fetch_all(&page.statement()).await?;
        let total = count(&mut tx, count_sql).await?;
        tx.commit().await?;
        let items = rows.iter().map(|r| item(r, &self.schema)).collect::<Result<Vec<_>, _>>()?;
        Ok((items, u64::try_from(total).unwrap_or(0)))
    }

    async fn list_page(&self, query: &ListQuery) -> Result<Page, SqlViewError> {
        let query = query.validate(&self.schema)?;
        self.check_query(&query)?;
        let offset = match &query.after {
            Some(Cursor::Offset(n)) => *n,
            _ => 0,
        };
        let page = sql::page(self.dialect, &self.live, &self.schema, &query, offset);
        let count = sql::count(self.dialect, &self.live, &self.schema, &query);
        // A swap drops the old table; a statement that resolved its name
        // just before may find it gone. Once more resolves the new one.
        let (mut items, total) = match self.list_once(&page, &count).await {
            Err(e) if e.is_missing_table() => self.list_once(&page, &count).await?,
            other => other?,
        };
        let more = items.len() > query.page_size as usize;
        items.truncate(query.page_size as usize);
        let next = match items.last() {
            Some(_) if more && query.relevance => Some(query.cursor_at_offset(offset + items.len() as u64)),
            Some(last) if more => Some(query.cursor_after(&last.id, &last.row)),
            _ => None,
        };
        Ok(Page { items, next, total })
    }

    /// The database's plan for the page statement of `query`: PostgreSQL
    /// `EXPLAIN`, SQLite `EXPLAIN QUERY PLAN`, one line per plan node.
    pub async fn explain(&self, query: &ListQuery) -> Result<String, SqlViewError> {
        let query = query.validate(&self.schema)?;
        self.check_query(&query)?;
        let offset = match &query.after {
            Some(Cursor::Offset(n)) => *n,
            _ => 0,
        };
        let mut sql = sql::page(self.dialect, &self.live, &self.schema, &query, offset);
        match self.dialect {
            Dialect::Postgres => sql.text.insert_str(0, "EXPLAIN "),
            Dialect::Sqlite => sql.text.insert_str(0, "EXPLAIN QUERY PLAN "),
        }
        let at = if self.dialect == Dialect::Postgres { 0 } else { 3 };
        let lines: Vec<String> =
            self.read.fetch_all(&sql.statement()).await?.iter().map(|r| r.get(at)).collect::<Result<_, _>>()?;
        Ok(lines.join("\n"))
    }

    /// Waits until the live copy has applied the record at `position`
    /// (read-your-writes); `false` when `timeout` passed first.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> Result<bool, SqlViewError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            let done = self.read_progress(ViewCopy::Live).await?.is_some_and(|p| p.checkpoint.covers(position));
            if done {
                return Ok(true);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    async fn begin_shadow(&self, lease: Option<&Lease>) -> Result<(), SqlViewError> {
        let fence = lease.map(|l| self.fence_sql(l)).transpose()?;
        let mut statements = vec![format!("DROP TABLE IF EXISTS {}", self.shadow)];
        // The secondary indexes come at the swap, once the copy is filled.
        statements.push(self.create_table(&self.shadow));
        let mut forget = Sql::new(format!("DELETE FROM {CHECKPOINTS} WHERE view_name = $1 AND view_copy = 'shadow'"));
        forget.args.push(Arg::Text(Some(self.schema.name.clone())));
        // Like the batches that follow, a fresh shadow need not wait for the
        // WAL flush: they come after it in the WAL, so a crash never keeps a
        // batch and loses the start of its copy.
        let mut tx = self.write.begin_write(Some(ASYNC_COMMIT)).await?;
        if let (Some(fence), Some(lease)) = (&fence, lease) {
            check_fence(self, &mut tx, fence, lease).await?;
        }
        for statement in statements {
            tx.execute(&Statement::new(statement)).await?;
        }
        tx.execute(&forget.statement()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Builds the shadow copy's secondary indexes (and, on PostgreSQL, its
    /// planner statistics) unless it has them: one pass over the filled
    /// table, done before the swap pauses the live copy's writer.
    /// `ANALYZE` of the columns that lists filter and sort on: the id, the
    /// live flag, and the filterable or sortable fields. The state, the
    /// fields only shown and the search text are left out: they are most
    /// of the table's bytes, and no index serves them (a search is a
    /// substring match). Autovacuum's own analyze covers them later.
    fn analyze_sql(&self, table: &str) -> String {
        let mut columns = vec!["id".to_owned(), "_live".to_owned()];
        for field in self.schema.fields.iter().filter(|f| f.filterable || f.sortable) {
            let column = sql::column(field);
            if !columns.contains(&column) {
                columns.push(column);
            }
        }
        format!("ANALYZE {table} ({})", columns.join(", "))
    }

    async fn index_shadow(&self) -> Result<(), SqlViewError> {
        if self.dialect == Dialect::Postgres {
            return self.index_pg_shadow().await;
        }
        let exists = self.exists_sql(&self.shadow);
        let count_indexes = self.count_indexes_sql(&self.shadow);
        let create_indexes = self.create_indexes(&self.shadow, &fresh_token());
        let mut tx = self.write.begin_write(None).await?;
        if count(&mut tx, &exists).await? == 0 {
            return Err(SqlViewError::NoRebuild(self.schema.name.clone()));
        }
        if count(&mut tx, &count_indexes).await? == 0 {
            for statement in create_indexes {
                tx.execute(&Statement::new(statement)).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// [`SqlView::index_shadow`] on PostgreSQL: the indexes are built two
    /// at a time, each half in a transaction of its own connection, then
    /// the statistics are gathered. An index build is a scan and a sort on
    /// one core, and a rebuild's table is mostly too small for PostgreSQL's
    /// own parallel builds (two workers by default). The indexes are named after the
    /// shadow table's OID and made `IF NOT EXISTS`, so a call cut short
    /// between the transactions is completed by the next one, and another
    /// shadow's names never clash. Like the shadow's batches, the
    /// transactions do not wait for the WAL flush; the swap's does.
    async fn index_pg_shadow(&self) -> Result<(), SqlViewError> {
        let mut oid = Sql::new(
            "SELECT COALESCE((SELECT c.oid::bigint FROM pg_class c WHERE c.relname = $1 \
             AND c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'), 0)",
        );
        oid.args.push(Arg::Text(Some(self.shadow.clone())));
        let mut tx = self.write.begin_write(None).await?;
        let oid = count(&mut tx, &oid).await?;
        tx.commit().await?;
        if oid == 0 {
            return Err(SqlViewError::NoRebuild(self.schema.name.clone()));
        }
        let statements = self.create_indexes(&self.shadow, &oid.to_string());
        let build = async |share: usize| -> Result<(), SqlViewError> {
            let mine: Vec<&String> = statements.iter().skip(share).step_by(2).collect();
            if mine.is_empty() {
                return Ok(());
            }
            let mut tx = self.write.begin_write(Some(ASYNC_COMMIT)).await?;
            for statement in mine {
                tx.execute(&Statement::new(statement.as_str())).await?;
            }
            tx.commit().await?;
            Ok(())
        };
        tokio::try_join!(build(0), build(1))?;
        let mut tx = self.write.begin_write(Some(ASYNC_COMMIT)).await?;
        tx.execute(&Statement::new(self.analyze_sql(&self.shadow))).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn swap_copies(&self, lease: Option<&Lease>) -> Result<(), SqlViewError> {
        let fence = lease.map(|l| self.fence_sql(l)).transpose()?;
        let exists = self.exists_sql(&self.shadow);
        let name = Arg::Text(Some(self.schema.name.clone()));
        let mut drop_live = Sql::new(format!("DELETE FROM {CHECKPOINTS} WHERE view_name = $1 AND view_copy = 'live'"));
        drop_live.args.push(name.clone());
        let mut promote = Sql::new(format!(
            "UPDATE {CHECKPOINTS} SET view_copy = 'live' WHERE view_name = $1 AND view_copy = 'shadow'"
        ));
        promote.args.push(name);
        let count_indexes = self.count_indexes_sql(&self.shadow);
        let create_indexes = self.create_indexes(&self.shadow, &fresh_token());
        let live_checkpoint = self.stored_checkpoint_sql(ViewCopy::Live);
        let shadow_checkpoint = self.stored_checkpoint_sql(ViewCopy::Shadow);
        let ddl = [
            format!("DROP TABLE IF EXISTS {}", self.live),
            format!("ALTER TABLE {} RENAME TO {}", self.shadow, self.live),
        ];
        // Both dialects run DDL inside transactions: readers see the old
        // copy or the new one, never neither.
        let mut tx = self.write.begin_write(None).await?;
        if let (Some(fence), Some(lease)) = (&fence, lease) {
            check_fence(self, &mut tx, fence, lease).await?;
        }
        if count(&mut tx, &exists).await? == 0 {
            return Err(SqlViewError::NoRebuild(self.schema.name.clone()));
        }
        if lease.is_some() {
            // The new copy must have every record the live one has, on
            // every partition: a swap never moves the view back.
            let live = stored_checkpoint(&mut tx, &live_checkpoint).await?;
            let shadow = stored_checkpoint(&mut tx, &shadow_checkpoint).await?;
            self.check_swap(live, shadow)?;
        }
        // A shadow is filled without its secondary indexes: one pass over
        // the full table builds each of them for less than keeping it up to
        // date row by row.
        if count(&mut tx, &count_indexes).await? == 0 {
            // `prepare_swap` did not run: do its work here.
            for statement in create_indexes {
                tx.execute(&Statement::new(statement)).await?;
            }
            if self.dialect == Dialect::Postgres {
                // Fresh planner statistics, or the first queries on the new
                // copy may be planned as if it were empty.
                tx.execute(&Statement::new(self.analyze_sql(&self.shadow))).await?;
            }
        }
        for statement in ddl {
            tx.execute(&Statement::new(statement)).await?;
        }
        tx.execute(&drop_live.statement()).await?;
        tx.execute(&promote.statement()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Closes the connection pools; later calls fail as unavailable.
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

#[async_trait]
impl ListView for SqlView {
    fn schema(&self) -> &ViewSchema {
        &self.schema
    }

    async fn list(&self, query: &ListQuery) -> Result<Page, ViewError> {
        Ok(self.list_page(query).await?)
    }

    async fn position(&self) -> Result<Checkpoint, ViewError> {
        self.live_checkpoint().await
    }
}

#[async_trait]
impl ViewStore for SqlView {
    async fn progress(&self, copy: ViewCopy) -> Result<Option<ViewProgress>, ViewError> {
        Ok(self.read_progress(copy).await?)
    }

    async fn states(&self, copy: ViewCopy, ids: &[String]) -> Result<HashMap<String, StoredState>, ViewError> {
        Ok(self.read_states(copy, ids).await?)
    }

    async fn write(&self, copy: ViewCopy, changes: &[RowChange], checkpoint: &Checkpoint) -> Result<(), ViewError> {
        Ok(self.write_copy(copy, changes, &[], checkpoint, None).await?)
    }

    async fn write_fenced(
        &self,
        copy: ViewCopy,
        changes: &[RowChange],
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        Ok(self.write_copy(copy, changes, &[], checkpoint, Some(lease)).await?)
    }

    async fn write_shadow_fenced(
        &self,
        new: Vec<RowChange>,
        known: Vec<RowChange>,
        checkpoint: &Checkpoint,
        lease: &Lease,
    ) -> Result<(), ViewError> {
        Ok(self.write_shadow(new, known, checkpoint, lease).await?)
    }

    async fn acquire_lease(&self, owner: &str, ttl: Duration) -> Result<Option<Lease>, ViewError> {
        Ok(self.take_lease(owner, ttl).await?)
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<bool, ViewError> {
        Ok(self.renew(lease, ttl).await?)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), ViewError> {
        Ok(self.release(lease).await?)
    }

    async fn swap_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        Ok(self.swap_copies(Some(lease)).await?)
    }

    async fn begin_rebuild(&self) -> Result<(), ViewError> {
        Ok(self.begin_shadow(None).await?)
    }

    async fn begin_rebuild_fenced(&self, lease: &Lease) -> Result<(), ViewError> {
        Ok(self.begin_shadow(Some(lease)).await?)
    }

    async fn prepare_swap(&self) -> Result<(), ViewError> {
        Ok(self.index_shadow().await?)
    }

    async fn swap(&self) -> Result<(), ViewError> {
        Ok(self.swap_copies(None).await?)
    }
}

/// A token for index names that no other copy's share.
fn fresh_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..6].to_owned()
}

/// One change per id, as if applied one by one: the newest version
/// wins, the last of equal ones (a multi-row upsert may not touch one
/// row twice, and an older version never replaces a newer one).
fn newest_per_id(changes: &[RowChange]) -> Vec<&RowChange> {
    let mut at: HashMap<&str, usize> = HashMap::with_capacity(changes.len());
    let mut last: Vec<&RowChange> = Vec::with_capacity(changes.len());
    for change in changes {
        match at.get(change.id.as_str()) {
            Some(&i) if change.version >= last[i].version => last[i] = change,
            Some(_) => {}
            None => {
                at.insert(&change.id, last.len());
                last.push(change);
            }
        }
    }
    last
}
