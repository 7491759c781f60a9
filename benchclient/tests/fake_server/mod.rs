//! A tiny OpenAI-style server for the benchmark's tests: raw HTTP/1.1 over a Tokio listener, one request per
//! connection, streaming completions whose shape and timing the test chooses.
//!
//! What a request gets depends on its prompt text: `http500` gets a 500 with a JSON error body, `malformed` a
//! stream whose second event is not JSON, `error-event` an in-stream `{"error": ...}` after one token,
//! `no-output` a stream with nothing but `[DONE]`; anything else (token-id prompts included) streams
//! `max_tokens` tokens, `tokens_per_chunk` per chunk, `gap` apart.
//!
//! Streams normally end by closing the connection (`connection: close`). With `keep_alive_then_close` they
//! are chunked and announce nothing about the connection, as llama.cpp's server does, and then the server
//! closes it anyway: the client's pool holds a connection that is about to be closed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

#[derive(Clone, Copy, Debug)]
pub struct Behaviour {
    /// Pause before each output chunk after the first.
    pub gap: Duration,
    pub tokens_per_chunk: usize,
    /// Send the final `usage` chunk.
    pub usage: bool,
    /// The first `hold_first` streams wait until that many are open at once before emitting a token, which
    /// makes "the client really reaches its concurrency" a deterministic fact rather than a timing accident.
    pub hold_first: usize,
    pub keep_alive_then_close: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self { gap: Duration::from_millis(2), tokens_per_chunk: 1, usage: true, hold_first: 0, keep_alive_then_close: false }
    }
}

/// What the server saw.
#[derive(Default)]
pub struct Seen {
    pub bodies: Mutex<Vec<Value>>,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    started: AtomicUsize,
}

impl Seen {
    /// Most generation streams open at the same time.
    pub fn peak_in_flight(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

pub struct FakeServer {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

impl FakeServer {
    /// Binds a free port on the current runtime and serves until the runtime ends.
    pub async fn start(behaviour: Behaviour) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free port");
        let addr = listener.local_addr().expect("local address");
        let seen = Arc::new(Seen::default());
        let barrier = Arc::new(Barrier::new(behaviour.hold_first.max(1)));
        let state = (seen.clone(), barrier);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (seen, barrier) = (state.0.clone(), state.1.clone());
                tokio::spawn(async move {
                    // A test server: a broken connection is the client's business, so errors end the task.
                    let _ = serve_connection(socket, behaviour, &seen, &barrier).await;
                });
            }
        });
        FakeServer { addr, seen }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve_connection(mut socket: TcpStream, behaviour: Behaviour, seen: &Seen, barrier: &Barrier) -> std::io::Result<()> {
    socket.set_nodelay(true)?;
    let Some((request_line, body)) = read_request(&mut socket).await? else { return Ok(()) };
    if request_line.starts_with("GET /v1/models") {
        let models = json!({"object": "list", "data": [{"id": "fake-model", "object": "model"}]});
        return write_response(&mut socket, "200 OK", &models.to_string()).await;
    }
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    seen.bodies.lock().expect("no poisoned lock").push(body.clone());
    let chat = request_line.contains("/chat/completions");
    let prompt_text = if chat { body.pointer("/messages/0/content") } else { body.get("prompt") };
    match prompt_text.and_then(Value::as_str).unwrap_or("") {
        "http500" => write_response(&mut socket, "500 Internal Server Error", r#"{"error":{"message":"injected failure"}}"#).await,
        "malformed" => stream(&mut socket, &["{\"choices\":[{\"text\":\"a\"}]}".to_owned(), "{not json".to_owned()]).await,
        "error-event" => {
            let events = ["{\"choices\":[{\"text\":\"a\"}]}".to_owned(), r#"{"error":{"message":"injected stream error"}}"#.to_owned()];
            stream(&mut socket, &events).await
        }
        "no-output" => stream(&mut socket, &["[DONE]".to_owned()]).await,
        _ => stream_tokens(&mut socket, &body, chat, behaviour, seen, barrier).await,
    }
}

/// Reads one request; returns its request line and body, or `None` if the client closed first.
async fn read_request(socket: &mut TcpStream) -> std::io::Result<Option<(String, String)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let content_length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < header_end + content_length {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..]).into_owned();
    Ok(Some((head.lines().next().unwrap_or("").to_owned(), body)))
}

async fn write_response(socket: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head =
        format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    socket.shutdown().await
}

async fn stream(socket: &mut TcpStream, events: &[String]) -> std::io::Result<()> {
    let mut sse = SseWriter::start(socket, false).await?;
    for event in events {
        sse.event(event).await?;
    }
    sse.finish().await
}

/// Writes an event stream, delimited by the connection's end or (`chunked`) by HTTP/1.1 chunks.
struct SseWriter<'a> {
    socket: &'a mut TcpStream,
    chunked: bool,
}

impl<'a> SseWriter<'a> {
    async fn start(socket: &'a mut TcpStream, chunked: bool) -> std::io::Result<Self> {
        let framing = if chunked { "transfer-encoding: chunked" } else { "connection: close" };
        let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n{framing}\r\n\r\n");
        socket.write_all(head.as_bytes()).await?;
        Ok(Self { socket, chunked })
    }

    async fn event(&mut self, data: &str) -> std::io::Result<()> {
        let event = format!("data: {data}\n\n");
        let bytes = if self.chunked { format!("{:x}\r\n{event}\r\n", event.len()) } else { event };
        self.socket.write_all(bytes.as_bytes()).await
    }

    /// Ends the body, then closes the connection either way. A chunked body is closed a moment after it ends,
    /// as a server thread going back to its pool does, so the client has time to reuse the connection.
    async fn finish(self) -> std::io::Result<()> {
        if self.chunked {
            self.socket.write_all(b"0\r\n\r\n").await?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.socket.shutdown().await
    }
}

async fn stream_tokens(
    socket: &mut TcpStream,
    body: &Value,
    chat: bool,
    b: Behaviour,
    seen: &Seen,
    barrier: &Barrier,
) -> std::io::Result<()> {
    let max_tokens = body.get("max_tokens").and_then(Value::as_u64).unwrap_or(16) as usize;
    let prompt_tokens = match body.get("prompt") {
        Some(Value::Array(ids)) => ids.len(),
        _ => 5,
    };
    let now = seen.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.peak.fetch_max(now, Ordering::SeqCst);
    let mut sse = SseWriter::start(socket, b.keep_alive_then_close).await?;
    if seen.started.fetch_add(1, Ordering::SeqCst) < b.hold_first {
        barrier.wait().await;
    }
    if chat {
        sse.event(r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#).await?;
    }
    let mut sent = 0;
    while sent < max_tokens {
        if sent > 0 {
            tokio::time::sleep(b.gap).await;
        }
        let n = b.tokens_per_chunk.min(max_tokens - sent);
        sent += n;
        let text = "tok ".repeat(n);
        let finish = if sent == max_tokens { json!("length") } else { Value::Null };
        let choice = if chat {
            json!({"index": 0, "delta": {"content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish})
        };
        sse.event(&json!({"choices": [choice]}).to_string()).await?;
    }
    // Leave the in-flight count before the stream ends, so the client can never start its next request
    // while this one still counts.
    seen.in_flight.fetch_sub(1, Ordering::SeqCst);
    if b.usage {
        sse.event(&json!({"choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens}}).to_string()).await?;
    }
    sse.event("[DONE]").await?;
    sse.finish().await
}
