//! A local server that answers like a Hugging Face hub for the requests rbee's hub client
//! makes (repository info; ranged file requests with commit, etag and LFS hash headers),
//! for tests and benchmarks on loopback. It can cut a connection or stall once at a given
//! offset, and counts the bytes it sends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The server's files and behaviour.
#[derive(Default)]
pub struct LocalHub {
    /// Files of the one repository it serves, by name.
    pub files: HashMap<String, Vec<u8>>,
    /// Overrides the SHA-256 the hub announces for a file.
    pub announced_sha: HashMap<String, String>,
    /// File bytes sent so far, over all responses.
    pub bytes_sent: AtomicU64,
    /// Cut the first response that reaches this file offset there (once).
    pub cut_at: Mutex<Option<u64>>,
    /// Stall the first response that reaches this file offset there, forever (once).
    pub stall_at: Mutex<Option<u64>>,
    /// Pause after each 64 KiB piece, so a test can act mid-transfer.
    pub pace: Duration,
}

/// The commit every answer names.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

impl LocalHub {
    /// Serves on a free port of 127.0.0.1 until the runtime ends; returns the address.
    pub async fn serve(self) -> std::io::Result<(Arc<LocalHub>, SocketAddr)> {
        let hub = Arc::new(self);
        let app = axum::Router::new()
            .route("/api/models/{org}/{name}/revision/{rev}", get(info))
            .route("/{org}/{name}/resolve/{rev}/{file}", get(file))
            .with_state(hub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((hub, addr))
    }

    fn sha(&self, name: &str) -> String {
        self.announced_sha.get(name).cloned().unwrap_or_else(|| {
            use sha2::Digest;
            crate::checksum::hex(&sha2::Sha256::digest(&self.files[name]))
        })
    }
}

async fn info(State(hub): State<Arc<LocalHub>>) -> impl IntoResponse {
    let siblings: Vec<_> = hub
        .files
        .keys()
        .map(|f| serde_json::json!({ "rfilename": f }))
        .collect();
    axum::Json(serde_json::json!({ "sha": COMMIT, "siblings": siblings }))
}

async fn file(
    State(hub): State<Arc<LocalHub>>,
    UrlPath((_org, _name, _rev, name)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(data) = hub.files.get(&name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = data.len() as u64;
    let Some(last) = (data.len() as u64).checked_sub(1) else {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().unwrap_or(u64::MAX))));
    let (start, end) = match range {
        Some((a, b)) if a <= last => (a, b.min(last)),
        Some(_) => return StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
        None => (0, last),
    };
    let slice = Bytes::copy_from_slice(&data[start as usize..=end as usize]);
    let cut = take_if_within(&hub.cut_at, start, end);
    let stall = take_if_within(&hub.stall_at, start, end);
    let hub2 = hub.clone();
    let body = async_stream(slice, start, cut, stall, hub2);
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
        .header("x-repo-commit", COMMIT)
        .header("x-linked-etag", format!("\"{}\"", hub.sha(&name)))
        .header(header::ETAG, "\"git-blob-id\"")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn take_if_within(slot: &Mutex<Option<u64>>, start: u64, end: u64) -> Option<u64> {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    match *slot {
        Some(at) if at > start && at <= end => slot.take(),
        _ => None,
    }
}

fn async_stream(
    slice: Bytes,
    start: u64,
    cut: Option<u64>,
    stall: Option<u64>,
    hub: Arc<LocalHub>,
) -> Body {
    let stream = futures::stream::unfold(0usize, move |sent| {
        // `Bytes` clones share the buffer: no copy per piece.
        let slice = slice.clone();
        let hub = hub.clone();
        async move {
            if sent >= slice.len() {
                return None;
            }
            let offset = start + sent as u64;
            if cut.is_some_and(|c| offset >= c) {
                let cut: Result<Bytes, std::io::Error> =
                    Err(std::io::Error::other("connection cut by the test"));
                return Some((cut, usize::MAX));
            }
            if stall.is_some_and(|s| offset >= s) {
                std::future::pending::<()>().await;
            }
            let mut n = (64 << 10).min(slice.len() - sent);
            for limit in [cut, stall].into_iter().flatten() {
                if limit > offset {
                    n = n.min((limit - offset) as usize);
                }
            }
            if !hub.pace.is_zero() {
                tokio::time::sleep(hub.pace).await;
            }
            hub.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
            Some((Ok(slice.slice(sent..sent + n)), sent + n))
        }
    });
    Body::from_stream(stream)
}
