//! What the end-to-end tests share: the `projects` binary started on a
//! free port, and where the services are.

#![allow(dead_code, reason = "each test crate uses a part of it")]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_projects");

/// A running `projects serve`, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
}

impl Server {
    pub async fn start(dir: &Path, store: &str, view: &str) -> Self {
        Self::start_as(dir, store, view, "all").await
    }

    /// `projects serve --role ROLE`.
    pub async fn start_as(dir: &Path, store: &str, view: &str, role: &str) -> Self {
        Self::start_with(dir, store, view, role, &[]).await
    }

    /// `projects serve --role ROLE` with more environment.
    pub async fn start_with(dir: &Path, store: &str, view: &str, role: &str, env: &[(&str, &str)]) -> Self {
        Self::start_logged(dir, store, view, role, env, None).await
    }

    /// `projects serve --role ROLE` with more environment, its output
    /// (stdout and stderr) appended to `log` when given.
    pub async fn start_logged(
        dir: &Path,
        store: &str,
        view: &str,
        role: &str,
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut command = Command::new(BIN);
        command
            .current_dir(dir)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .env("KES_ROLE", role)
            .env("KES_LISTEN", format!("127.0.0.1:{port}"))
            .env("KES_STORE", store)
            .env("KES_VIEW", view)
            .stdin(Stdio::null());
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("the log file");
            command.stdout(file.try_clone().expect("the log file")).stderr(file);
        }
        let child = command.spawn().expect("start the projects binary");
        let server = Self { child, base: format!("http://127.0.0.1:{port}") };
        let client = reqwest::Client::new();
        let started = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{}/health", server.base)).send().await
                && r.status() == StatusCode::OK
            {
                return server;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "the service did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM, then wait: the graceful path.
    pub fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "the service exited with {status} on SIGTERM");
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the service did not stop within 20 s of SIGTERM");
    }

    /// SIGKILL: the crash path.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh PostgreSQL database, or `None` (skipped, or failed under CI, by
/// the workspace's one rule).
pub async fn fresh_database() -> Option<String> {
    kes_test_support::fresh_postgres_database("e2e").await
}

pub fn kafka_brokers() -> Option<String> {
    kes_test_support::kafka_brokers()
}

pub async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.expect("a JSON body")
}
