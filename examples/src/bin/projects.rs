//! The `projects` service: `projects [serve] [--role all|api|projector]`
//! runs it (`serve` is the default command, so its flags work without the
//! word), `projects rebuild` rebuilds its list views from the log (itself,
//! or through the admin endpoint of the projector that leads them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use kes_core::ProjectionError;
use kes_examples::service::{DEFAULT_STORE, DEFAULT_VIEW, Role, Service, Settings};
use kes_http::{AdminToken, JwtAuth};
use tracing_subscriber::EnvFilter;

/// The projects service: event-sourced projects and tasks over REST.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Where the events live: sqlite://PATH, postgres://… or kafka://HOST:PORT[,HOST:PORT][?prefix=PREFIX].
    #[arg(long, env = "KES_STORE", default_value = DEFAULT_STORE, global = true)]
    store: String,
    /// Where the list views live: sqlite://PATH or postgres://… (view-sql), or an index directory (view-search).
    #[arg(long, env = "KES_VIEW", default_value = DEFAULT_VIEW, global = true)]
    view: String,
    /// Milliseconds a projector's lease on a view lasts unless renewed: a
    /// projector that stops for longer is replaced by a standby.
    #[arg(long, env = "KES_LEASE_TTL_MS", default_value_t = 5000, global = true)]
    lease_ttl_ms: u64,
    /// A file holding the admin token (at least 16 characters): enables
    /// `/admin/projections` on processes that run projections, and is what
    /// `rebuild --via` sends.
    #[arg(long, env = "KES_ADMIN_TOKEN_FILE", global = true)]
    admin_token_file: Option<PathBuf>,
    /// The most database connections each SQL store and each SQL view of
    /// this process opens (by default 10 per store, 5 per view, 2 per
    /// reaction journal): every process of a deployment holds its own, so
    /// size them against the database's `max_connections`.
    #[arg(long, env = "KES_DB_CONNECTIONS", global = true, value_parser = clap::value_parser!(u32).range(1..))]
    db_connections: Option<u32>,
    /// The key store of personal data (`sqlite://PATH` or `postgres://…`):
    /// by default a SQLite file beside a SQLite log, the schema `kes_keys`
    /// of a PostgreSQL log, the topic `{prefix}.keys` of a Kafka log.
    #[arg(long, env = "KES_KEYS", global = true)]
    keys: Option<String>,
    /// A file holding the master key (64 hex digits) that wraps the keys
    /// of personal data; made when missing. By default `master.key` beside
    /// a SQLite log, else `data/master.key`. Keep it apart from the key
    /// store and its backups.
    #[arg(long, env = "KES_MASTER_KEY_FILE", global = true)]
    master_key_file: Option<PathBuf>,
    /// `serve`'s flags, for `projects` without a command.
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KES_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Origins allowed by CORS (comma-separated), for a front end on another port.
    #[arg(long, env = "KES_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Require bearer JWTs signed with HS256 and the secret in this file
    /// (at least 32 bytes); tokens with the `admin` role may use the admin
    /// endpoints. Without an auth flag (or --trust-principal-header), every
    /// request is `anonymous`.
    #[arg(long, env = "KES_AUTH_HS256_SECRET_FILE", conflicts_with = "auth_jwks")]
    auth_hs256_secret_file: Option<PathBuf>,
    /// Require bearer JWTs signed with a key of this JWKS file (RSA, EC
    /// P-256/P-384, Ed25519), read again when it changes.
    #[arg(long, env = "KES_AUTH_JWKS")]
    auth_jwks: Option<PathBuf>,
    /// With an auth flag: the `iss` tokens must carry.
    #[arg(long, env = "KES_AUTH_ISSUER")]
    auth_issuer: Option<String>,
    /// With an auth flag: the `aud` tokens must name.
    #[arg(long, env = "KES_AUTH_AUDIENCE")]
    auth_audience: Option<String>,
    /// Trusted-header mode, for a service behind a gateway that
    /// authenticates: the caller is the value of this header (e.g.
    /// x-principal). Anyone who reaches the service directly can claim any
    /// name: off unless given, and ignored with an auth flag.
    #[arg(long, env = "KES_TRUST_PRINCIPAL_HEADER", conflicts_with_all = ["auth_hs256_secret_file", "auth_jwks"])]
    trust_principal_header: Option<axum::http::HeaderName>,
    /// With --trust-principal-header: the caller's roles are the value of
    /// this header (e.g. x-roles), comma-separated, set by the same gateway
    /// (`admin` passes every project rule).
    #[arg(long, env = "KES_TRUST_ROLES_HEADER", requires = "trust_principal_header")]
    trust_roles_header: Option<axum::http::HeaderName>,
    /// What this process does: `all` (API and projections), `api` (the API,
    /// reading views that projector processes keep) or `projector`
    /// (projections, with only /health and /metrics).
    #[arg(long, env = "KES_ROLE", value_enum, default_value_t = RoleArg::All)]
    role: RoleArg,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    All,
    Api,
    Projector,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::All => Role::All,
            RoleArg::Api => Role::Api,
            RoleArg::Projector => Role::Projector,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the REST API (the default).
    Serve(ServeArgs),
    /// Rebuild list views from the log, while the old ones keep answering.
    Rebuild {
        /// Only this projection (`projects` or `tasks`); all when absent.
        #[arg(long, env = "KES_PROJECTION")]
        projection: Option<String>,
        /// Ask the projector serving at this URL (e.g. http://127.0.0.1:9001)
        /// to rebuild, where it leads the views, instead of rebuilding here
        /// (which a running projector's lease refuses). Needs the admin token.
        #[arg(long, env = "KES_ADMIN_URL")]
        via: Option<String>,
    },
}

/// The JWT authentication the auth flags ask for, if any.
fn authentication(args: &ServeArgs) -> anyhow::Result<Option<JwtAuth>> {
    let auth = match (&args.auth_hs256_secret_file, &args.auth_jwks) {
        (Some(file), _) => {
            let secret =
                std::fs::read(file).with_context(|| format!("reading the HS256 secret file {}", file.display()))?;
            let secret = secret.trim_ascii();
            JwtAuth::hs256(secret).context("the HS256 secret")?
        }
        (None, Some(file)) => JwtAuth::jwks_file(file).context("the JWKS file")?,
        (None, None) => {
            if args.auth_issuer.is_some() || args.auth_audience.is_some() {
                anyhow::bail!("--auth-issuer and --auth-audience need --auth-hs256-secret-file or --auth-jwks");
            }
            return Ok(None);
        }
    };
    let auth = match &args.auth_issuer {
        Some(iss) => auth.issuer(iss),
        None => auth,
    };
    Ok(Some(match &args.auth_audience {
        Some(aud) => auth.audience(aud),
        None => auth,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    let mut settings = Settings::new(cli.store, cli.view);
    settings.lease_ttl = Duration::from_millis(cli.lease_ttl_ms);
    settings.db_connections = cli.db_connections;
    settings.keys = cli.keys;
    settings.master_key_file = cli.master_key_file;
    if let Some(file) = &cli.admin_token_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the admin token file {}", file.display()))?;
        settings.admin_token = Some(AdminToken::new(&text).context("the admin token")?);
    }
    match command {
        Command::Serve(args) => {
            settings.auth = authentication(&args)?.map(Arc::new);
            settings.trusted_principal_header = args.trust_principal_header;
            settings.trusted_roles_header = args.trust_roles_header;
            settings.http.cors_origins = args.cors_origins;
            settings.role = args.role.into();
            serve(settings, args.listen).await
        }
        Command::Rebuild { projection, via: Some(url) } => {
            let token =
                cli.admin_token_file.context("rebuild --via needs --admin-token-file (KES_ADMIN_TOKEN_FILE)")?;
            let token = std::fs::read_to_string(&token)
                .with_context(|| format!("reading the admin token file {}", token.display()))?;
            rebuild_via(&url, token.trim(), projection).await
        }
        Command::Rebuild { projection, via: None } => rebuild(settings, projection).await,
    }
}

async fn serve(settings: Settings, listen: SocketAddr) -> anyhow::Result<()> {
    let role = settings.role;
    let service = std::sync::Arc::new(Service::open(&settings).await?);
    if role.runs_projections() {
        service.start_projections().await?;
    }
    let mut api = service.api_for(role)?;
    if role != Role::Projector {
        // The demo page, served beside the API it uses, behind the same edge.
        api = api.merge(kes_examples::web::router());
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, store = %settings.store, ?role, "projects service listening");
    let feeds = std::sync::Arc::clone(&service);
    let stopping = async move {
        shutdown_signal().await;
        feeds.end_feeds();
    };
    // Header timeouts, header size and connection limits against slow or
    // hostile clients (see kes_http::serve).
    kes_http::serve(listener, api.into_app(), kes_http::ServerConfig::default(), stopping).await.context("serving")?;
    tracing::info!("in-flight requests finished; stopping projections");
    service.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}

async fn rebuild(settings: Settings, only: Option<String>) -> anyhow::Result<()> {
    let service = Service::open(&settings).await?;
    let names = match only {
        Some(name) => vec![name],
        None => service.projection_names(),
    };
    for name in names {
        let bar = progress_bar(&name);
        let report = service
            .rebuild(&name, &|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await
            .map_err(|e| match e.downcast_ref::<ProjectionError>() {
                Some(ProjectionError::Standby(_)) => e.context(
                    "a running projector leads this view: rebuild through it with \
                     `projects rebuild --via http://PROJECTOR --admin-token-file FILE`",
                ),
                _ => e,
            })?;
        bar.finish_and_clear();
        let secs = report.elapsed.as_secs_f64();
        let rate = if secs > 0.0 { report.events as f64 / secs } else { 0.0 };
        println!("rebuilt {}: {} events in {:.2}s ({:.0} events/s)", report.name, report.events, secs, rate);
    }
    service.shutdown().await;
    Ok(())
}

fn progress_bar(name: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} records ({per_sec}, {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(name.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `projects rebuild --via URL`: asks the projector at `base` to rebuild
/// each projection (one after the other) and follows its progress.
async fn rebuild_via(base: &str, token: &str, only: Option<String>) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/');
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let listed = admin_status(&client, base, token).await?;
    let names: Vec<String> = match only {
        Some(name) => vec![name],
        None => listed.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect(),
    };
    for name in names {
        let r = client
            .post(format!("{base}/admin/projections/{name}/rebuild"))
            .bearer_auth(token)
            .send()
            .await
            .with_context(|| format!("asking {base} to rebuild {name}"))?;
        if r.status() != reqwest::StatusCode::ACCEPTED {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            anyhow::bail!("{base} refused to rebuild {name}: {status} {body}");
        }
        let bar = progress_bar(&name);
        let finished = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let listed = admin_status(&client, base, token).await?;
            let Some(rebuild) = listed.iter().find(|p| p["name"] == name.as_str()).map(|p| p["rebuild"].clone()) else {
                anyhow::bail!("{base} no longer reports projection {name}");
            };
            bar.set_length(rebuild["total"].as_u64().unwrap_or(0));
            bar.set_position(rebuild["done"].as_u64().unwrap_or(0));
            if rebuild["state"] != "running" {
                break rebuild;
            }
        };
        bar.finish_and_clear();
        if finished["state"] != "done" {
            anyhow::bail!("rebuilding {name} failed: {}", finished["error"].as_str().unwrap_or("no reason given"));
        }
        let secs = finished["elapsed_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
        let events = finished["events"].as_u64().unwrap_or(0);
        let rate = if secs > 0.0 { events as f64 / secs } else { 0.0 };
        println!("rebuilt {name} on {base}: {events} events in {secs:.2}s ({rate:.0} events/s)");
    }
    Ok(())
}

/// The projections the admin endpoint at `base` reports.
async fn admin_status(client: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let r = client
        .get(format!("{base}/admin/projections"))
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| format!("reading {base}/admin/projections"))?;
    if !r.status().is_success() {
        anyhow::bail!("{base}/admin/projections answered {}", r.status());
    }
    let body: serde_json::Value = r.json().await.context("reading the admin answer")?;
    Ok(body["projections"].as_array().cloned().unwrap_or_default())
}
