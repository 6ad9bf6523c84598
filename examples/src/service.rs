//! Wiring: stores and views chosen by URL, the projection runners, the
//! router, and the rebuild command.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use kes_core::{
    Aggregate, CatchUp, CommandBus, CommandRouter, CommandSink, EventStore, HistoryProjection, KeyStore, ListView,
    MasterKey, Projection, ProjectionRunner, ReactionConfig, ReactionProjection, ReactionRunner, RebuildReport, Row,
    RunnerConfig, StoredCatchUp, StoredStatus, Vault, ViewHistory, ViewProjection, ViewSchema, ViewStore,
    history_schema, journal_schema,
};
use kes_http::{AdminToken, Api, App, HttpConfig, JwtAuth, Readiness, ShutdownHandle};
#[cfg(feature = "kafka")]
use kes_store_kafka::{KafkaStore, KafkaStoreConfig};
use kes_store_sql::{SqlKeyStore, SqlKeyStoreConfig, SqlStore, SqlStoreConfig};

use crate::domain::{Project, Task};
use crate::reactions::{PROJECT_TASKS, ProjectTasks};
use crate::resources;

/// The default event store: a SQLite file under `./data`.
pub const DEFAULT_STORE: &str = "sqlite://data/events.db";

/// The default list backend for the features this binary was built with.
pub const DEFAULT_VIEW: &str = if cfg!(feature = "view-sql") { "sqlite://data/views.db" } else { "data/index" };

/// Where events and list views live.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `sqlite://PATH`, `postgres://…` or `kafka://HOST:PORT[,HOST:PORT][?prefix=PREFIX]`.
    pub store: String,
    /// With `view-sql`: `sqlite://PATH` or `postgres://…`; with
    /// `view-search`: an index directory.
    pub view: String,
    /// HTTP settings (CORS origins, limits, timeouts).
    pub http: HttpConfig,
    /// How long a projector's lease on a view lasts unless renewed (it is
    /// renewed every fifth of it): a projector that stops for longer is
    /// replaced by one that stands by.
    pub lease_ttl: std::time::Duration,
    /// The token of the admin endpoints; without one they do not exist.
    pub admin_token: Option<AdminToken>,
    /// What the process does; an `api` process opens the views read-only.
    pub role: Role,
    /// The most connections each SQL store and SQL view opens; `None`:
    /// each backend's default.
    pub db_connections: Option<u32>,
    /// Bearer JWT authentication of the API (its tokens' `admin` role
    /// opens the admin endpoints); `None`: see
    /// [`Settings::trusted_principal_header`].
    pub auth: Option<Arc<JwtAuth>>,
    /// Without `auth`: the header a gateway in front of the service puts
    /// the authenticated caller's name in (trusted-header mode). With
    /// neither, every request is `anonymous` (for trying it out).
    pub trusted_principal_header: Option<axum::http::HeaderName>,
    /// In trusted-header mode: the header the gateway puts the caller's
    /// roles in, separated by commas (`admin` passes every project rule).
    pub trusted_roles_header: Option<axum::http::HeaderName>,
    /// The key store of personal data (`sqlite://PATH` or `postgres://…`);
    /// `None`: derived from `store` by [`keys_url_for`].
    pub keys: Option<String>,
    /// The master key that wraps the keys of personal data, as 64 hex
    /// digits; `None`: read from (or, the first time, written to)
    /// `master_key_file`.
    pub master_key: Option<String>,
    /// Where the master key is kept when `master_key` is not given;
    /// `None`: `master.key` beside a SQLite log, else
    /// [`DEFAULT_MASTER_KEY_FILE`].
    pub master_key_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            store: DEFAULT_STORE.into(),
            view: DEFAULT_VIEW.into(),
            http: HttpConfig::default(),
            lease_ttl: RunnerConfig::default().lease_ttl,
            admin_token: None,
            role: Role::All,
            db_connections: None,
            auth: None,
            trusted_principal_header: None,
            trusted_roles_header: None,
            keys: None,
            master_key: None,
            master_key_file: None,
        }
    }
}

/// Where the master key is kept when none is configured.
pub const DEFAULT_MASTER_KEY_FILE: &str = "data/master.key";

/// The SQL key store that goes with the SQL log at `store`: a SQLite file
/// beside a SQLite log (`events.db` → `events-keys.db`), the schema
/// `kes_keys` of a PostgreSQL log's database. `None` for a Kafka log, whose
/// keys are in its topic `{prefix}.keys` (see [`open_vault`]).
pub fn keys_url_for(store: &str) -> Option<String> {
    if store.starts_with("sqlite:") {
        let (path, query) = store.split_once('?').map_or((store, None), |(p, q)| (p, Some(q)));
        if path.contains(":memory:") {
            return Some("sqlite::memory:".to_owned());
        }
        let path = match path.strip_suffix(".db") {
            Some(stem) => format!("{stem}-keys.db"),
            None => format!("{path}-keys"),
        };
        return Some(query.map_or(path.clone(), |q| format!("{path}?{q}")));
    }
    store.starts_with("postgres:").then(|| store.to_owned())
}

/// The key store `settings` name: `keys` when given, else the one that goes
/// with the log (a compacted topic beside a Kafka log, a table beside a
/// SQL one).
async fn open_key_store(settings: &Settings) -> anyhow::Result<Arc<dyn KeyStore>> {
    #[cfg(feature = "kafka")]
    if settings.keys.is_none() && settings.store.starts_with("kafka:") {
        let config = KafkaStoreConfig::from_url(&settings.store)?;
        let keys = kes_store_kafka::KafkaKeyStore::open(&config).await.context("opening the keys topic")?;
        return Ok(Arc::new(keys));
    }
    let url = settings
        .keys
        .clone()
        .or_else(|| keys_url_for(&settings.store))
        .context("no key store goes with this kind of store URL: set KES_KEYS")?;
    let mut config = SqlKeyStoreConfig::from_url(&url);
    if url.starts_with("postgres:") {
        config = config.schema("kes_keys");
    }
    Ok(Arc::new(SqlKeyStore::open(config).await.context("opening the key store")?))
}

/// The vault of personal data: the key store `settings` name, and the
/// master key wrapping its keys.
pub async fn open_vault(settings: &Settings) -> anyhow::Result<Arc<Vault>> {
    let keys = open_key_store(settings).await?;
    let master = match &settings.master_key {
        Some(hex) => MasterKey::from_hex(hex).context("the master key")?,
        None => {
            let file = settings.master_key_file.clone().unwrap_or_else(|| master_key_file_for(&settings.store));
            master_key_from_file(&file)?
        }
    };
    Ok(Arc::new(Vault::new(keys, master)))
}

/// Where the master key of the log at `store` is kept by default: beside a
/// SQLite log's file, under `./data` otherwise.
pub fn master_key_file_for(store: &str) -> PathBuf {
    let path = store.strip_prefix("sqlite://").or_else(|| store.strip_prefix("sqlite:"));
    match path.map(|p| p.split('?').next().unwrap_or(p)).filter(|p| !p.contains(":memory:")) {
        Some(file) => std::path::Path::new(file).with_file_name("master.key"),
        None => PathBuf::from(DEFAULT_MASTER_KEY_FILE),
    }
}

/// The master key kept in `file`, made (readable by its owner only) when
/// the file does not exist yet. Processes starting together agree: the key
/// is written to a file of its own and linked into place, which fails for
/// all but the first; the others read the winner's.
fn master_key_from_file(file: &std::path::Path) -> anyhow::Result<MasterKey> {
    let read = |file: &std::path::Path| {
        let hex = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        MasterKey::from_hex(&hex).with_context(|| format!("the master key in {}", file.display()))
    };
    if file.exists() {
        return read(file);
    }
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    static DRAFTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = DRAFTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let draft = file.with_extension(format!("new-{}-{n}", std::process::id()));
    write_private(&draft, &MasterKey::generate_hex()).with_context(|| format!("writing {}", draft.display()))?;
    let linked = std::fs::hard_link(&draft, file);
    // The draft's only purpose was the link; a leftover is harmless.
    let _ = std::fs::remove_file(&draft);
    match linked {
        Ok(()) => tracing::warn!(
            file = %file.display(),
            "made a new master key for personal data; keep it apart from the key store and its backups"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("writing {}", file.display())),
    }
    read(file)
}

fn write_private(file: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut out = options.open(file)?;
    out.write_all(text.as_bytes())?;
    out.sync_all()
}

#[cfg(test)]
mod master_key_tests {
    use super::*;

    #[test]
    fn processes_making_the_master_key_at_once_agree_on_one() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("keys").join("master.key");
        let made: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| master_key_from_file(&file).map(|_| std::fs::read_to_string(&file))))
                .collect();
            handles.into_iter().map(|h| h.join().expect("a thread").expect("a key").expect("the file")).collect()
        });
        assert!(made.windows(2).all(|w| w[0] == w[1]), "one key for all");
        let left: Vec<_> = std::fs::read_dir(file.parent().expect("a folder")).expect("the folder").collect();
        assert_eq!(left.len(), 1, "no drafts left behind");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).expect("the file").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

impl Settings {
    /// Settings for the store at `store` and the views at `view`, the rest
    /// by default.
    pub fn new(store: impl Into<String>, view: impl Into<String>) -> Self {
        Self { store: store.into(), view: view.into(), ..Self::default() }
    }

    /// The projection runners' settings.
    fn runner_config(&self) -> RunnerConfig {
        let ttl = self.lease_ttl.max(std::time::Duration::from_millis(500));
        RunnerConfig { lease_ttl: ttl, lease_renew: ttl / 5, ..RunnerConfig::default() }
    }
}

/// A store of the kind `url` names, for aggregate `A`.
pub async fn open_store<A: Aggregate>(url: &str) -> anyhow::Result<Arc<dyn EventStore<A>>> {
    open_store_sized(url, None).await
}

/// [`open_store`] with at most `connections` database connections per
/// pool (SQL stores; `None`: the store's default).
pub async fn open_store_sized<A: Aggregate>(
    url: &str,
    connections: Option<u32>,
) -> anyhow::Result<Arc<dyn EventStore<A>>> {
    if url.starts_with("sqlite:") || url.starts_with("postgres:") || url.starts_with("postgresql:") {
        let mut config = SqlStoreConfig::from_url(url);
        if let Some(n) = connections {
            config = config.max_connections(n);
        }
        let store =
            SqlStore::<A>::open(config).await.with_context(|| format!("opening the event store {}", redact(url)))?;
        Ok(Arc::new(store))
    } else if url.starts_with("kafka:") {
        open_kafka_store(url).await
    } else {
        bail!("unknown store URL {:?}: use sqlite://PATH, postgres://… or kafka://HOST:PORT", redact(url))
    }
}

#[cfg(feature = "kafka")]
async fn open_kafka_store<A: Aggregate>(url: &str) -> anyhow::Result<Arc<dyn EventStore<A>>> {
    let config = KafkaStoreConfig::from_url(url).context("reading the Kafka store URL")?;
    let store = KafkaStore::<A>::open(config).await.context("connecting to Kafka")?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "kafka"))]
async fn open_kafka_store<A: Aggregate>(url: &str) -> anyhow::Result<Arc<dyn EventStore<A>>> {
    bail!("{}: this build has no Kafka store (build kes-examples with the feature `kafka`, on by default)", redact(url))
}

/// A list view of the kind `location` names. `read_only` (an `api`
/// process, which writes no view) opens a Tantivy index without its
/// writer, so that the projector keeps it; SQL views need no such care
/// (their lease decides who writes).
/// `lease_ttl` is the projectors' lease on the views: a PostgreSQL session
/// idle inside a transaction (a stalled projector holding its lease row) is
/// ended well within it.
pub async fn open_view(
    location: &str,
    schema: ViewSchema,
    read_only: bool,
    lease_ttl: std::time::Duration,
) -> anyhow::Result<Arc<dyn ViewStore>> {
    open_view_sized(location, schema, read_only, lease_ttl, None).await
}

/// [`open_view`] with at most `connections` database connections (SQL
/// views; 5 by default): a view written one batch at a time and read
/// rarely (a reaction's journal) needs few, and every process of a
/// deployment holds its own.
pub async fn open_view_sized(
    location: &str,
    schema: ViewSchema,
    read_only: bool,
    lease_ttl: std::time::Duration,
    connections: Option<u32>,
) -> anyhow::Result<Arc<dyn ViewStore>> {
    #[cfg(not(feature = "view-search"))]
    let _ = read_only;
    #[cfg(not(feature = "view-sql"))]
    let _ = (lease_ttl, connections);
    let sql =
        location.starts_with("sqlite:") || location.starts_with("postgres:") || location.starts_with("postgresql:");
    #[cfg(feature = "view-sql")]
    if sql {
        let mut config = kes_view_sql::SqlViewConfig::from_url(location).idle_in_transaction_timeout(lease_ttl * 2 / 5);
        if let Some(n) = connections {
            config = config.max_connections(n);
        }
        let view = kes_view_sql::SqlView::open(config, schema)
            .await
            .with_context(|| format!("opening the list views in {}", redact(location)))?;
        return Ok(Arc::new(view));
    }
    #[cfg(feature = "view-search")]
    if !sql {
        let dir = std::path::Path::new(location).join(&schema.name);
        let view = if read_only {
            kes_view_search::SearchView::open_read_only(&dir, schema)
        } else {
            kes_view_search::SearchView::open(&dir, schema)
        }
        .with_context(|| format!("opening the search index {}", dir.display()))?;
        return Ok(Arc::new(view));
    }
    bail!(
        "this build cannot serve list views from {:?} (SQL views need feature view-sql, index directories need view-search)",
        redact(location)
    )
}

/// Hides a password in a URL before it reaches a log or an error.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

type Runner<A> = ProjectionRunner<A, Arc<dyn EventStore<A>>>;

/// One aggregate's store, bus, view and projection runner.
pub struct Part<A: Aggregate> {
    /// The event store.
    pub store: Arc<dyn EventStore<A>>,
    /// The command bus over it.
    pub bus: Arc<CommandBus<A, Arc<dyn EventStore<A>>>>,
    /// The list view.
    pub view: Arc<dyn ViewStore>,
    /// The history view, on stores that cannot read a stream by version
    /// cheaply (Kafka); `None` where the store serves history itself.
    pub history: Option<Arc<dyn ViewStore>>,
    /// Feeds the views from the log.
    pub runner: Arc<Runner<A>>,
}

/// Whether the store at `url` is better served by a history view: a Kafka
/// topic can only be read by offset, and a stream's records lie scattered
/// among those of other aggregates (on some brokers each fetch also costs
/// in proportion to what the partition holds after it). The SQL stores
/// read a stream page by its (type, id, version) key.
pub fn history_from_view(store_url: &str) -> bool {
    store_url.starts_with("kafka:")
}

impl<A: Aggregate> Part<A> {
    async fn open(
        settings: &Settings,
        schema: ViewSchema,
        to_row: fn(&A) -> Row,
        vault: &Arc<Vault>,
    ) -> anyhow::Result<Self> {
        let store = open_store_sized::<A>(&settings.store, settings.db_connections).await?;
        let read_only = settings.role == Role::Api;
        let view =
            open_view_sized(&settings.view, schema, read_only, settings.lease_ttl, settings.db_connections).await?;
        let mut projections: Vec<Arc<dyn Projection<A::Event>>> =
            vec![Arc::new(ViewProjection::<A>::new(Arc::clone(&view), to_row).with_vault(Arc::clone(vault)))];
        let history = if history_from_view(&settings.store) {
            let history = open_view_sized(
                &settings.view,
                history_schema(A::NAME),
                read_only,
                settings.lease_ttl,
                settings.db_connections,
            )
            .await?;
            let projection = HistoryProjection::<A>::new(Arc::clone(&history))
                .with_context(|| format!("the history view of {}", A::NAME))?;
            projections.push(Arc::new(projection));
            Some(history)
        } else {
            None
        };
        let runner = ProjectionRunner::new(Arc::clone(&store), projections, settings.runner_config());
        let bus = Arc::new(CommandBus::new(Arc::clone(&store)).with_vault(Arc::clone(vault)));
        Ok(Self { bus, store, view, history, runner })
    }
}

/// What a `projects serve` process does: the command side and the query
/// side together, or one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Serves the API and runs the projections (one process does it all).
    #[default]
    All,
    /// Serves the API (commands and reads) and runs no projection: lists
    /// and histories come from views that `projector` processes keep, and
    /// a read carrying `KES-Position` waits for the checkpoints those views
    /// store.
    Api,
    /// Runs the projections and serves only `/health`, `/metrics` and,
    /// with an admin token, the admin endpoints. Several projectors may
    /// run on one view: one leads (holds the view's lease), the others
    /// stand by and take over within the lease time when it stops.
    Projector,
}

impl Role {
    /// Whether a process of this role runs the projections.
    pub fn runs_projections(self) -> bool {
        matches!(self, Self::All | Self::Projector)
    }
}

/// How often an `api` process reads the views' stored checkpoints while a
/// read waits for a position.
const STORED_CHECKPOINT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// `/health` of a projector: its store answers.
struct StoreReady<A: Aggregate>(Arc<dyn EventStore<A>>);

#[async_trait::async_trait]
impl<A: Aggregate> Readiness for StoreReady<A> {
    async fn ready(&self) -> bool {
        self.0.ping().await.is_ok()
    }
}

/// `/health` of a projector: its view answers.
struct ViewReady(Arc<dyn ViewStore>);

#[async_trait::async_trait]
impl Readiness for ViewReady {
    async fn ready(&self) -> bool {
        self.0.position().await.is_ok()
    }
}

impl<A: Aggregate> Part<A> {
    /// The views of this aggregate, as read by an `api` process.
    fn views(&self) -> Vec<Arc<dyn ListView>> {
        let mut views: Vec<Arc<dyn ListView>> = vec![self.view.clone()];
        if let Some(history) = &self.history {
            views.push(history.clone());
        }
        views
    }

    /// Where `/metrics` (and the admin endpoints) learn of projections: the
    /// runner where it runs, the views' stored checkpoints otherwise.
    fn status_source(&self, role: Role) -> Arc<dyn kes_http::ProjectionStatusSource> {
        if role.runs_projections() {
            return self.runner.clone();
        }
        Arc::new(StoredStatus::<A, _>::new(Arc::clone(&self.store), self.views()))
    }

    /// How reads of this aggregate wait for a position: on the runner in
    /// a process that runs it, on the stored checkpoints otherwise.
    fn catch_up(&self, role: Role) -> Arc<dyn CatchUp> {
        if role.runs_projections() {
            return self.runner.clone();
        }
        Arc::new(StoredCatchUp::new(self.views(), STORED_CHECKPOINT_POLL))
    }
}

/// The reactions of the service ([`ProjectTasks`]), one runner per source
/// aggregate type; each keeps its checkpoint, lease and refused commands
/// in a journal view beside the list views.
pub struct Reactions {
    /// Over the projects' log.
    pub projects: Arc<ReactionRunner<Project, Arc<dyn EventStore<Project>>>>,
    /// Over the tasks' log.
    pub tasks: Arc<ReactionRunner<Task, Arc<dyn EventStore<Task>>>>,
}

impl Reactions {
    async fn open(settings: &Settings, projects: &Part<Project>, tasks: &Part<Task>) -> anyhow::Result<Self> {
        let router = CommandRouter::new()
            .route::<Project>(Arc::clone(&projects.bus) as Arc<dyn CommandSink<Project>>)
            .route::<Task>(Arc::clone(&tasks.bus) as Arc<dyn CommandSink<Task>>);
        let reaction = Arc::new(ProjectTasks::new(
            Arc::clone(&projects.store),
            Arc::clone(&tasks.store),
            Arc::clone(&tasks.view) as Arc<dyn ListView>,
        ));
        let journal = |source: &'static str| {
            // Written one batch at a time, read by the admin endpoint.
            let connections = settings.db_connections.map_or(2, |n| n.min(2));
            open_view_sized(
                &settings.view,
                journal_schema(PROJECT_TASKS, source),
                false,
                settings.lease_ttl,
                Some(connections),
            )
        };
        let on_projects = ReactionProjection::<Project>::new(
            reaction.clone(),
            router.clone(),
            journal(Project::NAME).await?,
            ReactionConfig::default(),
        )?;
        let on_tasks =
            ReactionProjection::<Task>::new(reaction, router, journal(Task::NAME).await?, ReactionConfig::default())?;
        let config = settings.runner_config();
        Ok(Self {
            projects: Arc::new(ReactionRunner::new(Arc::clone(&projects.store), vec![on_projects], config.clone())),
            tasks: Arc::new(ReactionRunner::new(Arc::clone(&tasks.store), vec![on_tasks], config)),
        })
    }
}

/// The whole projects service: both aggregates, ready to serve.
pub struct Service {
    /// Projects.
    pub projects: Part<Project>,
    /// Tasks.
    pub tasks: Part<Task>,
    /// The reactions, in processes that run projections.
    pub reactions: Option<Reactions>,
    /// Seals and opens personal data; erases data subjects.
    pub vault: Arc<Vault>,
    http: HttpConfig,
    admin_token: Option<AdminToken>,
    auth: Option<Arc<JwtAuth>>,
    trusted_principal_header: Option<axum::http::HeaderName>,
    trusted_roles_header: Option<axum::http::HeaderName>,
    /// Ends the change feeds of the routers made so far.
    feeds: std::sync::Mutex<Vec<ShutdownHandle>>,
}

impl Service {
    /// Opens stores and views; the SQL backends create missing files, their
    /// folders and their tables themselves.
    pub async fn open(settings: &Settings) -> anyhow::Result<Self> {
        let vault = open_vault(settings).await?;
        let projects = Part::open(settings, resources::project_view(), resources::project_row, &vault).await?;
        let tasks = Part::open(settings, resources::task_view(), resources::task_row, &vault).await?;
        let reactions = if settings.role.runs_projections() {
            Some(Reactions::open(settings, &projects, &tasks).await.context("opening the reactions")?)
        } else {
            None
        };
        Ok(Self {
            projects,
            tasks,
            reactions,
            vault,
            http: settings.http.clone(),
            admin_token: settings.admin_token.clone(),
            auth: settings.auth.clone(),
            trusted_principal_header: settings.trusted_principal_header.clone(),
            trusted_roles_header: settings.trusted_roles_header.clone(),
            feeds: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Starts following the log (rebuilding views whose version changed).
    pub async fn start_projections(&self) -> anyhow::Result<()> {
        self.projects.runner.start().await.context("starting the projects projection")?;
        self.tasks.runner.start().await.context("starting the tasks projection")?;
        if let Some(reactions) = &self.reactions {
            reactions.projects.start().await.context("starting the reactions to projects")?;
            reactions.tasks.start().await.context("starting the reactions to tasks")?;
        }
        Ok(())
    }

    /// The HTTP router of both aggregates, for a process that does it all.
    pub fn router(&self) -> anyhow::Result<Router> {
        Ok(self.api_for(Role::All)?.into_router())
    }

    /// The HTTP API of both aggregates as one service, for
    /// [`kes_http::serve`]: routed once, without a router in front.
    pub fn app(&self) -> anyhow::Result<App> {
        Ok(self.api_for(Role::All)?.into_app())
    }

    /// The HTTP API of a process of `role`, not yet finished: the whole
    /// API (`all`, `api`), or only `/health` and `/metrics` (`projector`).
    pub fn api_for(&self, role: Role) -> anyhow::Result<Api> {
        if role == Role::Projector {
            let api = self
                .with_admin(Api::new(self.http.clone()), role)
                .projections(self.projects.runner.clone())
                .projections(self.tasks.runner.clone())
                .readiness("projects.store", Arc::new(StoreReady(self.projects.store.clone())))
                .readiness("projects.view", Arc::new(ViewReady(self.projects.view.clone())))
                .readiness("tasks.store", Arc::new(StoreReady(self.tasks.store.clone())))
                .readiness("tasks.view", Arc::new(ViewReady(self.tasks.view.clone())));
            return Ok(self.with_identity(api));
        }
        let mut api = Api::new(self.http.clone())
            .mount(
                resources::projects(),
                Arc::clone(&self.projects.bus),
                self.projects.view.clone(),
                self.projects.catch_up(role),
            )?
            .mount(
                resources::tasks(),
                Arc::clone(&self.tasks.bus),
                self.tasks.view.clone(),
                self.tasks.catch_up(role),
            )?;
        api = self
            .with_admin(api, role)
            .projections(self.projects.status_source(role))
            .projections(self.tasks.status_source(role));
        api = self.with_identity(api);
        if let Some(view) = &self.projects.history {
            api = api.history("projects", Arc::new(ViewHistory::new::<Project>(view.clone())))?;
        }
        if let Some(view) = &self.tasks.history {
            api = api.history("tasks", Arc::new(ViewHistory::new::<Task>(view.clone())))?;
        }
        self.feeds.lock().unwrap_or_else(|p| p.into_inner()).push(api.shutdown_handle());
        Ok(api)
    }

    /// `api` with the identity of its callers: bearer JWTs, a trusted
    /// header, or none (anonymous).
    fn with_identity(&self, api: Api) -> Api {
        match (&self.auth, &self.trusted_principal_header) {
            (Some(auth), _) => api.authenticate(Arc::clone(auth)).admin_role(resources::ADMIN_ROLE),
            (None, Some(header)) => {
                let api = api.trust_principal_header(header.clone());
                match &self.trusted_roles_header {
                    Some(roles) => api.trust_roles_header(roles.clone()),
                    None => api,
                }
            }
            (None, None) => api,
        }
    }

    /// `api` with the admin endpoints where projections run and a token
    /// is set, and the reactions' status where they run.
    fn with_admin(&self, api: Api, role: Role) -> Api {
        let api = match (&self.reactions, role.runs_projections()) {
            (Some(r), true) => api.reactions(r.projects.clone()).reactions(r.tasks.clone()),
            _ => api,
        };
        match &self.admin_token {
            Some(token) if role.runs_projections() => api.admin(token.clone()).erasure(Arc::clone(&self.vault)),
            _ => api,
        }
    }

    /// The names of the list projections.
    pub fn projection_names(&self) -> Vec<String> {
        let mut names = self.projects.runner.names();
        names.extend(self.tasks.runner.names());
        names
    }

    /// Rebuilds projection `name` from the log; `progress(done, total)`
    /// is called after each batch.
    pub async fn rebuild(&self, name: &str, progress: &(dyn Fn(u64, u64) + Sync)) -> anyhow::Result<RebuildReport> {
        if self.projects.runner.names().iter().any(|n| n == name) {
            Ok(self.projects.runner.rebuild(name, progress).await?)
        } else if self.tasks.runner.names().iter().any(|n| n == name) {
            Ok(self.tasks.runner.rebuild(name, progress).await?)
        } else {
            bail!("no projection named {name:?}; there are: {}", self.projection_names().join(", "))
        }
    }

    /// Ends the change feeds of every router this service made, so that a
    /// graceful shutdown does not wait for clients that never hang up.
    pub fn end_feeds(&self) {
        for handle in self.feeds.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            handle.shutdown();
        }
    }

    /// Stops the projection runners (after in-flight batches), then lets
    /// the stores write out what they hold in memory only.
    pub async fn shutdown(&self) {
        if let Some(reactions) = &self.reactions {
            reactions.projects.shutdown().await;
            reactions.tasks.shutdown().await;
        }
        self.projects.runner.shutdown().await;
        self.tasks.runner.shutdown().await;
        for (name, flushed) in
            [("projects", self.projects.store.flush().await), ("tasks", self.tasks.store.flush().await)]
        {
            if let Err(e) = flushed {
                tracing::warn!(store = name, error = %e, "could not flush the store at shutdown; the next start catches up");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("sqlite://data/x.db"), "sqlite://data/x.db");
    }
}
