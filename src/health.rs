//! Health endpoints for orchestrators (Kubernetes probes, load balancers): `GET /health`
//! answers 200 while the process serves HTTP (liveness); `GET /ready` answers 200 when the
//! daemon can do its job and 503 with the reason when not (readiness). Neither needs an
//! API key, and neither says more than that.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

/// Whether the daemon is ready: `Err(reason)` when not.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// The two routes, for a router of any state.
pub fn routes<S: Clone + Send + Sync + 'static>(ready: ReadyCheck) -> Router<S> {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready().await {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
}

/// Serves only the health routes on `addr` (a hive, which has no other HTTP); the bound
/// address.
pub async fn serve(addr: SocketAddr, ready: ReadyCheck) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app: Router = routes(ready);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the health endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn get_status(addr: SocketAddr, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    #[tokio::test]
    async fn ready_follows_the_check_and_health_only_the_process() {
        let up = Arc::new(AtomicBool::new(false));
        let check = up.clone();
        let ready: ReadyCheck = Arc::new(move || {
            let up = check.load(Ordering::SeqCst);
            Box::pin(async move {
                if up {
                    Ok(())
                } else {
                    Err("no queen link".into())
                }
            })
        });
        let addr = serve("127.0.0.1:0".parse().unwrap(), ready).await.unwrap();
        assert_eq!(get_status(addr, "/health").await.0, 200);
        assert_eq!(
            get_status(addr, "/ready").await,
            (503, "not ready: no queen link\n".into())
        );
        up.store(true, Ordering::SeqCst);
        assert_eq!(get_status(addr, "/ready").await.0, 200);
        assert_eq!(get_status(addr, "/other").await.0, 404);
    }
}
