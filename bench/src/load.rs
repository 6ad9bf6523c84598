//! The load client and in-process servers: loopback only, keep-alive,
//! bounded in count and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::task::JoinHandle;

/// A router served on 127.0.0.1:0 until dropped.
pub struct Server {
    /// Where it listens.
    pub base: String,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `app` (a KES [`kes_http::App`] or a baseline's router) on an
/// ephemeral loopback port, with the server the projects service uses.
pub async fn serve<S>(app: S) -> anyhow::Result<Server>
where
    S: tower::Service<
            axum::http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding 127.0.0.1:0")?;
    let addr: SocketAddr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let _ = kes_http::serve(listener, app, kes_http::ServerConfig::default(), std::future::pending()).await;
    });
    Ok(Server { base: format!("http://{addr}"), task })
}

/// A keep-alive HTTP/1.1 client with room for `clients` idle connections.
pub fn client(clients: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// What to send.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `PATCH {base}/{path}/{id}` with `{"name": "n<counter>"}` (a new name each time, so each one is a Renamed).
    PatchName,
    /// `GET {base}/{path}/{id}`.
    Get,
    /// `PATCH` with `{"owner": "person <n mod 10>"}`: a personal field,
    /// sealed before the append and opened in the answer.
    PatchOwner,
    /// `PATCH` with `{"description": "person <n mod 10>"}`: the same bytes
    /// in a plain field.
    PatchDescription,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

async fn one(client: &reqwest::Client, verb: Verb, url: &str) -> anyhow::Result<()> {
    let response = match verb {
        Verb::PatchName => {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let body = format!("{{\"name\":\"n{n}\"}}");
            client.patch(url).header("content-type", "application/json").body(body).send().await?
        }
        Verb::Get => client.get(url).send().await?,
        Verb::PatchOwner | Verb::PatchDescription => {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let field = if verb == Verb::PatchOwner { "owner" } else { "description" };
            let body = format!("{{\"{field}\":\"person {}\"}}", n % 10);
            client.patch(url).header("content-type", "application/json").body(body).send().await?
        }
    };
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// `clients` concurrent loops, client `i` on `urls[i % urls.len()]`, for
/// `duration` (and at most `max` requests): successful requests per second.
/// Any failed request fails the measurement.
pub async fn concurrent(
    client: &reqwest::Client,
    verb: Verb,
    urls: &[String],
    clients: usize,
    duration: Duration,
    max: u64,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let client = client.clone();
        let url = urls[i % urls.len()].clone();
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline && done.load(Ordering::Relaxed) < max {
                one(&client, verb, &url).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a load task panicked")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// `clients` concurrent loops of `PATCH {"name"}` (as [`Verb::PatchName`]),
/// client `i` on `urls[i % urls.len()]`, for `duration`: successful
/// requests per second, and how many answered 409 or 412 (counted, not
/// fatal, so that a run shows how many there were; the requests carry no
/// `If-Match`, so every one of them is a fault). Any other failed request
/// fails the measurement.
pub async fn concurrent_patch_counting_conflicts(
    client: &reqwest::Client,
    urls: &[String],
    clients: usize,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let conflicts = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let client = client.clone();
        let url = urls[i % urls.len()].clone();
        let (done, conflicts) = (Arc::clone(&done), Arc::clone(&conflicts));
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let body = format!("{{\"name\":\"n{n}\"}}");
                let response = client.patch(&url).header("content-type", "application/json").body(body).send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                if status.is_success() {
                    done.fetch_add(1, Ordering::Relaxed);
                } else if status == reqwest::StatusCode::CONFLICT || status == reqwest::StatusCode::PRECONDITION_FAILED
                {
                    conflicts.fetch_add(1, Ordering::Relaxed);
                } else {
                    bail!("{url} answered {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a load task panicked")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((done.load(Ordering::Relaxed) as f64 / elapsed, conflicts.load(Ordering::Relaxed)))
}

/// `count` requests one after the other on one keep-alive connection:
/// mean milliseconds per request.
pub async fn sequential(client: &reqwest::Client, verb: Verb, url: &str, count: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    for _ in 0..count {
        one(client, verb, url).await?;
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0 / count as f64)
}

/// Runs `f` on each of `n` items with at most `width` in flight.
pub async fn in_parallel<T, F, Fut>(items: Vec<T>, width: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures::StreamExt;
    let mut stream = futures::stream::iter(items.into_iter().map(f)).buffer_unordered(width);
    while let Some(result) = stream.next().await {
        result?;
    }
    Ok(())
}
