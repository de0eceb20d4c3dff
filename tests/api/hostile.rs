//! Hostile clients against the real binary: slow heads, slow and endless bodies, huge bodies,
//! thousands of idle connections. Others stay served, memory stays bounded.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::helpers::ServerProcess;

/// The memory the server allocated (anonymous resident pages), in MB: what connections and
/// requests cost. The program's own code pages are left out: a debug build maps tens of MB of
/// them, more with every dependency, and they say nothing about load.
fn rss_mb(server: &ServerProcess) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    kb / 1024
}

fn connect(server: &ServerProcess) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads until the server answers or closes; returns what it said.
fn answer(mut stream: TcpStream) -> String {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buffer.extend_from_slice(&chunk[..n]);
                if buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buffer).into_owned()
}

async fn healthy_quickly(server: &ServerProcess) {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .get(server.url("/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "others wait: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn slow_heads_and_slow_bodies_are_cut_off_while_others_are_served() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[("MAESTRA_BODY_TIMEOUT_SECONDS", "1")]).await;

    let mut slow_head = connect(&server);
    slow_head
        .write_all(b"POST /api/maestra/core HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let mut slow_body = connect(&server);
    slow_body
        .write_all(b"POST /api/maestra/core HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user_id\"")
        .unwrap();

    healthy_quickly(&server).await;
    let started = Instant::now();
    let said = tokio::task::spawn_blocking(move || answer(slow_body))
        .await
        .unwrap();
    assert!(said.starts_with("HTTP/1.1 408"), "slow body: {said:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    let said = tokio::task::spawn_blocking(move || answer(slow_head))
        .await
        .unwrap();
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 408"),
        "slow head: {said:?}"
    );
    healthy_quickly(&server).await;
    let files = std::fs::read_dir(data.path().join("conversations"))
        .unwrap()
        .count();
    assert_eq!(files, 0, "nothing stored from cut-off requests");
}

#[tokio::test]
async fn huge_and_endless_bodies_are_refused_without_being_read() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]).await;

    // 10 MB announced: refused from the head alone.
    let mut announced = connect(&server);
    announced
        .write_all(b"POST /api/maestra/core HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 10485760\r\n\r\n")
        .unwrap();
    let said = tokio::task::spawn_blocking(move || answer(announced))
        .await
        .unwrap();
    assert!(said.starts_with("HTTP/1.1 413"), "{said:?}");

    // An endless chunked body: refused once past the limit.
    let mut endless = connect(&server);
    endless
        .write_all(b"POST /api/maestra/core HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let said = tokio::task::spawn_blocking(move || {
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
        // 10 MB at most; the server stops reading long before.
        for _ in 0..160 {
            if endless.write_all(chunk.as_bytes()).is_err() {
                break;
            }
        }
        answer(endless)
    })
    .await
    .unwrap();
    assert!(
        said.is_empty() || said.starts_with("HTTP/1.1 413"),
        "{said:?}"
    );

    healthy_quickly(&server).await;
    assert!(rss_mb(&server) < 64, "RSS {} MB", rss_mb(&server));
}

#[tokio::test]
async fn thousands_of_idle_connections_do_not_starve_others() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]).await;
    let before = rss_mb(&server);
    let idle: Vec<TcpStream> = (0..2000).map(|_| connect(&server)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    healthy_quickly(&server).await;
    let body = serde_json::json!({"user_id": "ana", "surface_id": "cli", "message": "still here"});
    let response = reqwest::Client::new()
        .post(server.url("/api/maestra/core"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let during = rss_mb(&server);
    // About 15 KB each (actix-web's buffers and the head's deadline) when written.
    assert!(
        during - before < 40,
        "{during} MB allocated with 2000 idle connections (was {before} MB)"
    );
    drop(idle);
}
