//! The HTTP transport: `/metrics`, `/healthz` and `/readyz` (axum).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::command::{Command, DriverHandle};
use crate::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    driver: DriverHandle,
    metrics: Arc<Metrics>,
}

/// How long `/readyz` and `/metrics` wait for the driver before they say it is stuck.
const DRIVER_ANSWER_MAX: Duration = Duration::from_secs(2);

/// The HTTP routes.
pub fn router(driver: DriverHandle, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AppState { driver, metrics })
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    // Asking for the lockspaces refreshes the gauges of held and waiting locks.
    let refreshed =
        tokio::time::timeout(DRIVER_ANSWER_MAX, state.driver.ask(|reply| Command::Lockspaces { reply })).await;
    if !matches!(refreshed, Ok(Ok(_))) {
        return (StatusCode::SERVICE_UNAVAILABLE, "the lock engine does not answer\n".to_string()).into_response();
    }
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.encode()).into_response()
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(DRIVER_ANSWER_MAX, state.driver.ask(|reply| Command::Status { reply })).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready: the lock engine does not answer\n"),
    }
}
