//! The server against hostile clients: slow headers (slowloris) and idle
//! connections are cut after the header timeout while other clients are
//! answered; oversized request lines and headers are a 431 that reaches no
//! route; connections beyond the limit wait instead of starving the rest.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kes_core::EventStore;
use kes_http::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    harness: Harness,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops")
            .expect("task")
            .expect("serve");
    }
}

async fn start(config: ServerConfig) -> Running {
    let harness = harness().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = harness.app.clone();
    let task = tokio::spawn(kes_http::serve(listener, app, config, async move {
        let _ = stopped.await;
    }));
    Running { addr, stop: Some(stop), task, harness }
}

/// Sends `request` whole and reads the answer until the server closes the
/// connection; the status code, or `None` when the connection ended first.
async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.ok()?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    read.expect("the server answers within 10 s").ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: kes\r\nconnection: close\r\n\r\n").into_bytes()
}

/// Whether the server closed `stream` (it reads end of file or an error).
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 64];
    matches!(tokio::time::timeout(within, stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_silent_clients_are_cut_off_while_others_are_answered() {
    let timeout = Duration::from_millis(800);
    let server = start(ServerConfig { header_read_timeout: timeout, ..ServerConfig::default() }).await;
    let addr = server.addr;
    // 40 clients that send their headers one byte every 100 ms, for ever,
    // and 20 that connect and send nothing.
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..40 {
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            let trickle = b"GET /health HTTP/1.1\r\nhost: kes\r\nx-slow: ".iter().chain(std::iter::repeat(&b'a'));
            for byte in trickle {
                if stream.write_all(&[*byte]).await.is_err() {
                    return Some(opened.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if opened.elapsed() > Duration::from_secs(20) {
                    return None;
                }
            }
            None
        }));
    }
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Meanwhile, everyone else is served at once.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(exchange(addr, &get("/health")).await, Some(200));
        assert!(started.elapsed() < Duration::from_secs(2), "an honest client waited {:?}", started.elapsed());
    }
    for stream in &mut silent {
        assert!(closed_by_server(stream, Duration::from_secs(5)).await, "an idle connection stayed open");
    }
    for client in slow {
        let cut = client.await.expect("slow client").expect("a slow client was never cut off");
        assert!(cut < timeout + Duration::from_secs(3), "cut only after {cut:?}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_lines_and_headers_are_431_and_change_nothing() {
    let server = start(ServerConfig { max_header_bytes: 8 * 1024, max_headers: 32, ..ServerConfig::default() }).await;
    let addr = server.addr;
    let long_path = format!("/projects/{}", "a".repeat(10 * 1024));
    assert_eq!(exchange(addr, &get(&long_path)).await, Some(431), "a path longer than the header limit");
    let big_header = format!(
        "POST /projects HTTP/1.1\r\nhost: kes\r\nconnection: close\r\ncontent-type: application/json\r\n\
         content-length: 14\r\nx-filler: {}\r\n\r\n{{\"name\":\"big\"}}",
        "b".repeat(10 * 1024)
    );
    assert_eq!(exchange(addr, big_header.as_bytes()).await, Some(431), "a header larger than the limit");
    let mut many = String::from("POST /projects HTTP/1.1\r\nhost: kes\r\nconnection: close\r\n");
    for i in 0..40 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("content-type: application/json\r\ncontent-length: 15\r\n\r\n{\"name\":\"many\"}");
    assert_eq!(exchange(addr, many.as_bytes()).await, Some(431), "more header fields than allowed");
    let head = server.harness.store.head().await.expect("head");
    assert_eq!(head.iter().map(|(_, n)| n).sum::<u64>(), 0, "nothing was appended");
    // Within the limits, the same requests go through.
    let fits = "POST /projects HTTP/1.1\r\nhost: kes\r\nconnection: close\r\ncontent-type: application/json\r\n\
                content-length: 15\r\n\r\n{\"name\":\"fits\"}";
    assert_eq!(exchange(addr, fits.as_bytes()).await, Some(201));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_beyond_the_limit_wait_their_turn() {
    let timeout = Duration::from_millis(600);
    let server =
        start(ServerConfig { max_connections: 2, header_read_timeout: timeout, ..ServerConfig::default() }).await;
    let addr = server.addr;
    // Two idle connections take both places…
    let _a = TcpStream::connect(addr).await.expect("connect");
    let _b = TcpStream::connect(addr).await.expect("connect");
    // …so a third client waits until the header timeout frees one.
    let started = Instant::now();
    assert_eq!(exchange(addr, &get("/health")).await, Some(200));
    let waited = started.elapsed();
    assert!(waited >= timeout / 2, "served before a place was free ({waited:?})");
    server.stop().await;
}

/// Reads one answer (head and a `content-length` body) off a keep-alive
/// connection; its status.
async fn read_answer(stream: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("head");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("body");
    head.get(9..12).and_then(|s| s.parse().ok()).expect("a status")
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_a_request_in_flight_finish() {
    let server = start(ServerConfig::default()).await;
    let addr = server.addr;
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // One answered request: the server has taken this connection.
    stream.write_all(b"GET /health HTTP/1.1\r\nhost: kes\r\n\r\n").await.expect("write");
    assert_eq!(read_answer(&mut stream).await, 200);
    // Headers sent, body not yet: the handler asks for the body, which
    // hyper announces with `100 Continue`: the request is in flight.
    stream
        .write_all(
            b"POST /projects HTTP/1.1\r\nhost: kes\r\ncontent-type: application/json\r\n\
              expect: 100-continue\r\ncontent-length: 15\r\n\r\n",
        )
        .await
        .expect("write");
    assert_eq!(read_answer(&mut stream).await, 100);
    let store = server.harness.store.clone();
    let stopping = tokio::spawn(server.stop());
    stream.write_all(b"{\"name\":\"late\"}").await.expect("the connection is still open");
    assert_eq!(read_answer(&mut stream).await, 201);
    assert!(closed_by_server(&mut stream, Duration::from_secs(5)).await, "closed once the answer is out");
    stopping.await.expect("stopped");
    let head = store.head().await.expect("head");
    assert_eq!(head.iter().map(|(_, n)| n).sum::<u64>(), 1, "the request in flight was carried out");
}

/// Sends `request` whole and reads the whole answer (the server closes
/// the connection after it: `connection: close`).
async fn answer_text(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    read.expect("the server answers within 10 s").expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_is_served_without_a_router_in_front_and_the_applications_routes_sit_behind_its_edge() {
    use axum::routing::get as route_get;

    let h = harness().await;
    let (id, _) = create(&h.app, "Served", 3).await;
    let own = axum::Router::new().route("/hello", route_get(|| async { "hi" })).fallback(|| async { "own fallback" });
    let app = kes_http::Api::new(kes_http::HttpConfig::default())
        .mount(
            resource(),
            std::sync::Arc::new(kes_core::CommandBus::new(h.store.clone())),
            h.view.clone(),
            h.runner.clone(),
        )
        .expect("mount")
        .merge(own)
        .into_app();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(kes_http::serve(listener, app, ServerConfig::default(), async move {
        let _ = stopped.await;
    }));

    // The API's routes, straight on the edge.
    let read = answer_text(addr, &get(&format!("/projects/{id}"))).await;
    assert!(read.starts_with("HTTP/1.1 200"), "{read}");
    assert!(read.contains("\"Served\"") && read.to_ascii_lowercase().contains("etag: \"1\""), "{read}");
    // The application's own route, behind the same edge: its trailing
    // slash is trimmed before routing, and it gets a request id.
    let hello = answer_text(addr, &get("/hello/")).await;
    assert!(hello.starts_with("HTTP/1.1 200") && hello.ends_with("hi"), "{hello}");
    assert!(hello.to_ascii_lowercase().contains("x-request-id: "), "{hello}");
    // Neither knows the path: the API's problem answer, not the merged
    // routes' fallback.
    let missing = answer_text(addr, &get("/nowhere")).await;
    assert!(missing.starts_with("HTTP/1.1 404") && missing.contains("application/problem+json"), "{missing}");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), task).await.expect("stops").expect("task").expect("serve");
}
