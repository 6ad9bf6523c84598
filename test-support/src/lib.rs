//! What KES's tests share: where the services under test are, and the one
//! rule for a service that is missing.
//!
//! **The rule.** Tests that need PostgreSQL or a Kafka broker ask this crate
//! for it. When the service is there they get its address. When it is not:
//! with `CI` set the test fails (a run that skipped a backend must not pass),
//! otherwise it is skipped with a printed reason, and the skip is recorded
//! in the file named by `KES_TEST_SKIPS` (if set) so that `scripts/test.sh`
//! can list every skipped test and why in its last lines.
//!
//! | service | where | variable |
//! |---|---|---|
//! | PostgreSQL | `postgres://postgres@127.0.0.1:5432/test` | `KES_TEST_DATABASE_URL` |
//! | Kafka broker | none by default | `KES_TEST_KAFKA_BROKERS` (`scripts/kafka-broker.sh start PORT DIR`) |

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{Connection, Executor, PgConnection};

/// The default PostgreSQL of the test machines.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Applies the rule to a missing `service`: panics under `CI`, otherwise
/// prints why the calling test is skipped and records it. Returns `None` so
/// that callers can write `let Some(x) = … else { return };`.
pub fn missing<T>(service: &str, why: &str) -> Option<T> {
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    if std::env::var_os("CI").is_some() {
        panic!("CI is set and {service} is unavailable ({why}); {test} cannot be skipped");
    }
    eprintln!("skipped {test}: {service} is unavailable ({why})");
    if let Some(path) = std::env::var_os("KES_TEST_SKIPS") {
        let line = format!("{test}: {service} is unavailable ({why})\n");
        if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            // A lost line only shortens the summary; the test output has it.
            let _ = file.write_all(line.as_bytes());
        }
    }
    None
}

/// The Kafka broker under test, from `KES_TEST_KAFKA_BROKERS`; `None` (by
/// [`missing`]) when it is not set.
pub fn kafka_brokers() -> Option<String> {
    match std::env::var("KES_TEST_KAFKA_BROKERS") {
        Ok(b) if !b.trim().is_empty() => Some(b),
        _ => missing("a Kafka broker", "KES_TEST_KAFKA_BROKERS is not set; see scripts/kafka-broker.sh"),
    }
}

/// The URL of the PostgreSQL under test (`KES_TEST_DATABASE_URL` or
/// [`DEFAULT_DATABASE_URL`]), without checking that it answers.
pub fn database_url() -> String {
    std::env::var("KES_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// [`database_url`] once it answered a connection within 5 s; `None` (by
/// [`missing`]) otherwise.
pub async fn postgres() -> Option<String> {
    let url = database_url();
    match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&url)).await {
        Ok(Ok(conn)) => {
            // Closing is a courtesy; the server drops the session anyway.
            let _ = conn.close().await;
            Some(url)
        }
        Ok(Err(e)) => missing("PostgreSQL", &format!("{url}: {e}")),
        Err(_) => missing("PostgreSQL", &format!("{url} did not answer within 5 s")),
    }
}

/// A new empty database on the PostgreSQL under test; its URL. `None` (by
/// [`missing`]) when the server does not answer.
///
/// Its name is `kes_{tag}_{created}_{random}` (`created`: Unix seconds in 8
/// hex digits; `random`: 16 hex digits). The first call of a process also
/// drops the databases of that form created more than
/// [`STALE_TEST_DATABASE`] ago that nobody is connected to: tests do not
/// drop their databases (a failing test's is worth a look), so a machine
/// that runs the suites again and again would otherwise pile them up.
pub async fn fresh_postgres_database(tag: &str) -> Option<String> {
    let base = postgres().await?;
    let name = test_database_name(tag, unix_now());
    let mut conn = match PgConnection::connect(&base).await {
        Ok(conn) => conn,
        Err(e) => return missing("PostgreSQL", &e.to_string()),
    };
    if !SWEPT.swap(true, Ordering::Relaxed) {
        drop_stale_test_databases(&mut conn, unix_now()).await;
    }
    if let Err(e) = conn.execute(format!("CREATE DATABASE {name}").as_str()).await {
        return missing("PostgreSQL", &format!("cannot create a database: {e}"));
    }
    let _ = conn.close().await;
    Some(with_database(&base, &name))
}

/// How old a test database must be before a later test run drops it.
pub const STALE_TEST_DATABASE: Duration = Duration::from_secs(6 * 3600);

/// Whether this process swept the stale test databases already.
static SWEPT: AtomicBool = AtomicBool::new(false);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The name of a test database tagged `tag`, created at `now` (Unix seconds).
fn test_database_name(tag: &str, now: u64) -> String {
    let random = uuid::Uuid::new_v4().as_u64_pair().0;
    format!("kes_{tag}_{:08x}_{random:016x}", now & 0xffff_ffff)
}

/// When `name` is a test database made by [`fresh_postgres_database`]: the
/// Unix second it was created at.
fn test_database_created(name: &str) -> Option<u64> {
    let mut parts = name.rsplitn(3, '_');
    let random = parts.next()?;
    let created = parts.next()?;
    let head = parts.next()?;
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !head.starts_with("kes_") || head.len() == "kes_".len() || !hex(random, 16) || !hex(created, 8) {
        return None;
    }
    u64::from_str_radix(created, 16).ok()
}

/// Drops the test databases created before `now` - [`STALE_TEST_DATABASE`].
/// One still in use is left (a plain `DROP DATABASE` refuses it); a failure
/// only leaves a database behind, so it is reported and not raised.
async fn drop_stale_test_databases(conn: &mut PgConnection, now: u64) {
    let names: Vec<(String,)> = match sqlx::query_as("SELECT datname FROM pg_database WHERE datname LIKE 'kes\\_%'")
        .fetch_all(&mut *conn)
        .await
    {
        Ok(names) => names,
        Err(e) => {
            eprintln!("test databases were not swept: {e}");
            return;
        }
    };
    let stale = now.saturating_sub(STALE_TEST_DATABASE.as_secs());
    for (name,) in names {
        if test_database_created(&name).is_some_and(|created| created < stale)
            && let Err(e) = conn.execute(format!("DROP DATABASE IF EXISTS {name}").as_str()).await
        {
            eprintln!("stale test database {name} was not dropped: {e}");
        }
    }
}

/// `url` with its database replaced by `name` (query parameters kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    let authority = head.find("://").map_or(0, |s| s + 3);
    let prefix = match head[authority..].find('/') {
        Some(slash) => &head[..authority + slash],
        None => head,
    };
    format!("{prefix}/{name}{query}")
}

/// A Kafka topic prefix no other test uses.
pub fn unique_prefix(tag: &str) -> String {
    format!("kes-test-{tag}-{}", uuid::Uuid::new_v4().simple())
}

/// A Kafka broker of one test's own (`scripts/kafka-broker.sh` on a free
/// loopback port and a temporary directory), for tests that stop and start
/// it; stopped when dropped, even when the test fails.
pub struct OwnBroker {
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnBroker {
    /// Starts one; `None` (by [`missing`]) when it cannot start. Runs only
    /// where broker tests run: `None` without a shared test broker too.
    pub fn start() -> Option<Self> {
        kafka_brokers()?;
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(e) => return missing("a dedicated Kafka broker", &format!("no temp dir: {e}")),
        };
        let port = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(addr) => addr.port(),
            Err(e) => return missing("a dedicated Kafka broker", &format!("no free port: {e}")),
        };
        let broker = Self { dir, port };
        match broker.script(&["start", &port.to_string()]) {
            Ok(()) => Some(broker),
            Err(e) => missing("a dedicated Kafka broker", &e),
        }
    }

    /// Its bootstrap address.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops it (its data stays for [`OwnBroker::up`]).
    pub fn down(&self) {
        if let Err(e) = self.script(&["stop"]) {
            panic!("stopping the test's broker: {e}");
        }
    }

    /// Starts it again on the same port and data.
    pub fn up(&self) {
        if let Err(e) = self.script(&["start", &self.port.to_string()]) {
            panic!("restarting the test's broker: {e}");
        }
    }

    /// `scripts/kafka-broker.sh COMMAND [PORT] DIR`.
    fn script(&self, args: &[&str]) -> Result<(), String> {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-broker.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .args(args)
            .arg(self.dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // A broker that is already down has nothing to stop.
        let _ = self.script(&["stop"]);
    }
}

/// What the log says while a test runs: the records of this thread at
/// `INFO` and above, as a `fmt` subscriber prints them (without colours).
///
/// ```ignore
/// let (log, _guard) = CapturedLog::start();
/// // … run what logs, on this thread (a current-thread runtime) …
/// assert_eq!(log.lines_with("request failed").len(), 1);
/// ```
#[derive(Clone, Default)]
pub struct CapturedLog(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    /// Captures until the guard is dropped.
    pub fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        let log = Self::default();
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The captured lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text().lines().filter(|line| line.contains(needle)).map(str::to_owned).collect()
    }
}

impl Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_name_replaces_the_path_and_keeps_the_query() {
        assert_eq!(with_database("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h/test?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }

    #[test]
    fn only_names_made_here_carry_a_creation_time() {
        let now = 1_796_400_000;
        let name = test_database_name("vsql_outage", now);
        assert_eq!(test_database_created(&name), Some(now));
        assert!(name.len() <= 63, "PostgreSQL cuts longer names: {name}");
        for other in [
            "test",
            "postgres",
            "kes_",
            // The form before creation times: a tag, then 32 hex digits.
            "kes_e2e_0123456789abcdef0123456789abcdef",
            "kes_bench_4242_pg_patch",
            "kes_e2e_6a8f0c11_0123456789abcdeg",
            "kes_6a8f0c11_0123456789abcdef",
            "app_e2e_6a8f0c11_0123456789abcdef",
        ] {
            assert_eq!(test_database_created(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn a_stale_test_database_is_dropped_and_a_recent_one_kept() {
        let Some(base) = postgres().await else { return };
        let mut conn = PgConnection::connect(&base).await.unwrap();
        let now = unix_now();
        let stale = test_database_name("sweep", now - STALE_TEST_DATABASE.as_secs() - 60);
        let recent = test_database_name("sweep", now - STALE_TEST_DATABASE.as_secs() + 600);
        for name in [&stale, &recent] {
            conn.execute(format!("CREATE DATABASE {name}").as_str()).await.unwrap();
        }
        // A stale database somebody is connected to stays too.
        let busy = test_database_name("sweep", now - STALE_TEST_DATABASE.as_secs() - 60);
        conn.execute(format!("CREATE DATABASE {busy}").as_str()).await.unwrap();
        let user = PgConnection::connect(&with_database(&base, &busy)).await.unwrap();
        drop_stale_test_databases(&mut conn, now).await;
        let exists = |name: String| {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)").bind(name)
        };
        assert!(!exists(stale.clone()).fetch_one(&mut conn).await.unwrap(), "{stale} was dropped");
        assert!(exists(recent.clone()).fetch_one(&mut conn).await.unwrap(), "{recent} is recent");
        assert!(exists(busy.clone()).fetch_one(&mut conn).await.unwrap(), "{busy} is in use");
        user.close().await.unwrap();
        for name in [&recent, &busy] {
            conn.execute(format!("DROP DATABASE {name}").as_str()).await.unwrap();
        }
    }
}
