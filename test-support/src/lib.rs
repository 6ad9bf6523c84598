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
use std::time::Duration;

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
pub async fn fresh_postgres_database(tag: &str) -> Option<String> {
    let base = postgres().await?;
    let name = format!("kes_{tag}_{}", uuid::Uuid::new_v4().simple());
    let mut conn = match PgConnection::connect(&base).await {
        Ok(conn) => conn,
        Err(e) => return missing("PostgreSQL", &e.to_string()),
    };
    if let Err(e) = conn.execute(format!("CREATE DATABASE {name}").as_str()).await {
        return missing("PostgreSQL", &format!("cannot create a database: {e}"));
    }
    let _ = conn.close().await;
    Some(with_database(&base, &name))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_name_replaces_the_path_and_keeps_the_query() {
        assert_eq!(with_database("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
        assert_eq!(with_database("postgres://u@h/test?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
