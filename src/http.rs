//! The HTTP endpoint on `METRICS_ADDR`: `/metrics`, `/healthz`, `/readyz` and
//! `/streams`, and the status page at `/`.
//!
//! tiny_http on its own thread. It has no request timeouts, so handlers stay
//! trivial: they read shared atomics, render the registry, or ask the
//! coordinator (the only owner of stream state) for a snapshot over a channel,
//! waiting at most [`STREAMS_REPLY_TIMEOUT`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, bounded};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tiny_http::{Header, Method, Response, Server};

use crate::error::AppError;
use crate::health::Heartbeat;
use crate::metrics::Metrics;
use crate::store::Integrity;
use crate::stream::table::StreamView;

/// How long `/streams` waits for the coordinator before answering 503.
pub const STREAMS_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The body of `/streams`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamsSnapshot {
    /// This process's owner id, so a reader can tell instances apart.
    pub instance: String,
    /// Active streams first, then recently completed or closed ones.
    pub streams: Vec<StreamView>,
    /// What the S3 start-up probe found (`None` before it ran).
    #[serde(default)]
    pub s3_integrity: Option<Integrity>,
    /// Why the watch directory cannot be seen, while it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_dir_blind: Option<String>,
}

/// A request for a snapshot: the coordinator answers on the enclosed sender.
pub type StreamsRequest = Sender<StreamsSnapshot>;

/// What the handlers read.
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub heartbeat: Arc<Heartbeat>,
    /// How old the coordinator's heartbeat may be before `/healthz` fails.
    pub liveness_limit: Duration,
    pub streams: Sender<StreamsRequest>,
}

pub struct HttpServer {
    server: Arc<Server>,
    thread: JoinHandle<()>,
    /// The bound address (the real port when `METRICS_ADDR` used port 0).
    pub addr: SocketAddr,
}

impl HttpServer {
    pub fn start(addr: SocketAddr, state: HttpState) -> Result<Self, AppError> {
        let server = Server::http(addr).map_err(|err| {
            AppError::Startup(format!("cannot listen on METRICS_ADDR {addr}: {err}"))
        })?;
        let server = Arc::new(server);
        let bound = server.server_addr().to_ip().ok_or_else(|| {
            AppError::Startup(format!("METRICS_ADDR {addr} is not an IP address"))
        })?;
        info!("HTTP endpoints (/metrics /healthz /readyz /streams) listening on http://{bound}");
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = respond(request.method(), request.url(), &state);
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

type Reply = Response<std::io::Cursor<Vec<u8>>>;

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

fn text(status: u16, body: impl Into<String>) -> Reply {
    Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/plain; charset=utf-8"))
}

fn json(status: u16, body: &impl Serialize) -> Reply {
    Response::from_string(serde_json::to_string_pretty(body).expect("serializable"))
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
}

const PATHS: [&str; 5] = ["/", "/metrics", "/healthz", "/readyz", "/streams"];

fn respond(method: &Method, url: &str, state: &HttpState) -> Reply {
    let path = url.split('?').next().unwrap_or(url);
    if !PATHS.contains(&path) {
        return text(404, format!("not found; try {}\n", PATHS.join(" ")));
    }
    if !matches!(method, Method::Get | Method::Head) {
        return text(405, "method not allowed\n").with_header(header("Allow", "GET, HEAD"));
    }
    match path {
        "/" => Response::from_string(crate::status_page::PAGE)
            .with_header(header("Content-Type", "text/html; charset=utf-8")),
        "/metrics" => {
            let (body, content_type) = state.metrics.render();
            Response::from_string(body).with_header(header("Content-Type", &content_type))
        }
        "/healthz" => match state.heartbeat.age() {
            Some(age) if age <= state.liveness_limit => text(200, "ok\n"),
            Some(age) => text(
                503,
                format!(
                    "coordinator loop stalled: last turn {:.1}s ago\n",
                    age.as_secs_f64()
                ),
            ),
            None => text(503, "starting\n"),
        },
        "/readyz" => {
            let report = state.metrics.readiness().report();
            json(if report.ready() { 200 } else { 503 }, &report)
        }
        _ => {
            let (reply_tx, reply_rx) = bounded(1);
            if state.streams.try_send(reply_tx).is_err() {
                return text(503, "coordinator busy\n");
            }
            match reply_rx.recv_timeout(STREAMS_REPLY_TIMEOUT) {
                Ok(mut snapshot) => {
                    snapshot.s3_integrity = state.metrics.readiness().integrity();
                    json(200, &snapshot)
                }
                Err(_) => text(503, "coordinator not answering (starting or stalled)\n"),
            }
        }
    }
}
