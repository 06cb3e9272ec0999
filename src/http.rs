//! The HTTP endpoint on `METRICS_ADDR`: `/metrics` and `/healthz`.
//!
//! tiny_http on its own thread; handlers only read shared atomics or render
//! the registry, so they stay trivial (tiny_http has no request timeouts).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use tiny_http::{Header, Method, Response, Server};

use crate::app::Heartbeat;
use crate::error::AppError;
use crate::metrics::Metrics;

pub struct HttpServer {
    server: Arc<Server>,
    thread: JoinHandle<()>,
    /// The bound address (the real port when `METRICS_ADDR` used port 0).
    pub addr: SocketAddr,
}

impl HttpServer {
    /// Binds and starts serving. `liveness_limit` is how old the coordinator's
    /// heartbeat may be before `/healthz` answers 503.
    pub fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        heartbeat: Arc<Heartbeat>,
        liveness_limit: Duration,
    ) -> Result<Self, AppError> {
        let server = Server::http(addr).map_err(|err| {
            AppError::Startup(format!("cannot listen on METRICS_ADDR {addr}: {err}"))
        })?;
        let server = Arc::new(server);
        let bound = server.server_addr().to_ip().ok_or_else(|| {
            AppError::Startup(format!("METRICS_ADDR {addr} is not an IP address"))
        })?;
        info!("metrics and health endpoints listening on http://{bound}");
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = respond(
                        request.method(),
                        request.url(),
                        &metrics,
                        &heartbeat,
                        liveness_limit,
                    );
                    if let Err(err) = request.respond(response) {
                        warn!("HTTP client went away: {err}");
                    }
                }
            })
            .map_err(|err| AppError::Startup(format!("cannot start HTTP thread: {err}")))?;
        Ok(Self {
            server,
            thread,
            addr: bound,
        })
    }

    pub fn stop(self) {
        self.server.unblock();
        let _ = self.thread.join();
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

fn text(status: u16, body: impl Into<String>) -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/plain; charset=utf-8"))
}

fn respond(
    method: &Method,
    url: &str,
    metrics: &Metrics,
    heartbeat: &Heartbeat,
    liveness_limit: Duration,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let path = url.split('?').next().unwrap_or(url);
    if !matches!(path, "/metrics" | "/healthz") {
        return text(404, "not found; try /metrics or /healthz\n");
    }
    if !matches!(method, Method::Get | Method::Head) {
        return text(405, "method not allowed\n").with_header(header("Allow", "GET, HEAD"));
    }
    match path {
        "/metrics" => {
            let (body, content_type) = metrics.render();
            Response::from_string(body).with_header(header("Content-Type", &content_type))
        }
        _ => match heartbeat.age() {
            Some(age) if age <= liveness_limit => text(200, "ok\n"),
            Some(age) => text(
                503,
                format!(
                    "coordinator loop stalled: last turn {:.1}s ago\n",
                    age.as_secs_f64()
                ),
            ),
            None => text(503, "starting\n"),
        },
    }
}
