//! Graceful shutdown of the real binary: SIGTERM stops accepting, lets the
//! in-flight stream finish, and exits 0.

mod support;

use std::process::{Command, Stdio};

use futures_util::StreamExt;
use serde_json::json;
use support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_then_exits_zero() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "10"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (http, ops) = (free_port(), free_port());
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nhttp = \"127.0.0.1:{http}\"\nops = \"127.0.0.1:{ops}\"\n[limits]\ndrain_timeout = \"20s\"\n{}{}",
            pool("p", &[url(&engine)], ""),
            tenant("acme", "p", "sk-test-acme", "")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = http_client();
    let ready = format!("http://127.0.0.1:{ops}/readyz");
    let mut up = false;
    for _ in 0..250 {
        if client
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(up, "sluice did not become ready");

    // A stream of 150 tokens at 10 ms: still running when SIGTERM arrives.
    let mut req = chat("deepseek-v4-flash", true);
    req["sim"] = json!({"output_tokens": 150});
    let resp = client
        .post(format!("http://127.0.0.1:{http}/v1/chat/completions"))
        .bearer_auth("sk-test-acme")
        .json(&req)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", http))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(refused, "listener still accepting after SIGTERM");

    // The in-flight stream still completes.
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "stream cut short: ...{}",
        &text[text.len().saturating_sub(200)..]
    );
    let content_chunks = sse_data(&text)
        .iter()
        .filter(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\""))
        .count();
    assert_eq!(content_chunks, 150);

    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}
