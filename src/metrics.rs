//! Prometheus metrics: the one implementation of [`Events`].
//!
//! Metric names are a public contract (dashboards and alerts depend on them).
//! There are no per-file or per-stream labels, so cardinality stays bounded
//! whatever the number of files. A private registry is used so only our
//! metrics (and the process collector) are exposed.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use std::sync::Arc;

use log::{info, warn};

use crate::bandwidth::Bandwidth;
use crate::events::{Disposal, Events, Gauges};
use crate::health::{Dependency, Readiness};
use crate::store::Integrity;
use crate::store::credentials::RefreshHealth;

/// The error kinds reported by `chunkstream_upload_errors_total`.
pub const UPLOAD_ERROR_KINDS: [&str; 7] = [
    "timeout",
    "connect",
    "tls",
    "http_4xx",
    "http_5xx",
    "integrity",
    "other",
];

pub struct Metrics {
    registry: Registry,
    chunks_uploaded: IntCounter,
    chunks_reuploaded: IntCounter,
    uploaded_bytes: IntCounter,
    streams_discovered: IntCounter,
    streams_completed: IntCounterVec,
    upload_errors: IntCounterVec,
    checkpoint_errors: IntCounter,
    credentials_refresh_failures: IntCounter,
    source_errors: IntCounter,
    worker_panics: IntCounter,
    streams_active: IntGauge,
    files_tracked: IntGauge,
    inflight_jobs: IntGauge,
    pending_bytes: IntGauge,
    streams_owned: IntGauge,
    replicas: IntGauge,
    unreadable_paths: IntGauge,
    watch_dir_blind: IntGauge,
    streams_quarantined: IntGauge,
    leases_claimed: IntCounter,
    leases_lost: IntCounter,
    last_scan_timestamp: prometheus::Gauge,
    storage_up: IntGauge,
    redis_up: IntGauge,
    checksum_verified: IntGauge,
    content_md5: IntGauge,
    multipart_aborted: IntCounter,
    events_delivered: IntCounter,
    event_delivery_failures: IntCounterVec,
    events_pending: IntGauge,
    files_disposed: IntCounterVec,
    on_complete_failures: IntCounterVec,
    poll_interval: prometheus::Gauge,
    bandwidth_limit: IntGauge,
    /// Read at every render, so the gauge follows BANDWIDTH_SCHEDULE.
    bandwidth: std::sync::OnceLock<Arc<Bandwidth>>,
    readiness: Arc<Readiness>,
    chunk_upload_duration: Histogram,
    scan_duration: Histogram,
    completion_lag: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("unique metric");
    counter
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("unique metric");
    gauge
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let histogram = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(histogram.clone()))
        .expect("unique metric");
    histogram
}

fn labelled(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("unique metric");
    vec
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        let streams_completed = labelled(
            &registry,
            "chunkstream_streams_completed_total",
            "Streams closed, by status (complete, incomplete).",
            "status",
        );
        let event_delivery_failures = labelled(
            &registry,
            "chunkstream_event_delivery_failures_total",
            "Failed attempts to deliver a completion event, by destination (redis_stream, webhook, outbox); each is retried.",
            "destination",
        );
        for destination in ["redis_stream", "webhook", "outbox"] {
            event_delivery_failures.with_label_values(&[destination]);
        }
        let upload_errors = labelled(
            &registry,
            "chunkstream_upload_errors_total",
            "Failed S3 request attempts, by kind.",
            "kind",
        );
        let files_disposed = labelled(
            &registry,
            "chunkstream_files_disposed_total",
            "Complete streams' files deleted or moved after verification (ON_COMPLETE), by action.",
            "action",
        );
        let on_complete_failures = labelled(
            &registry,
            "chunkstream_on_complete_failures_total",
            "Failed attempts to delete or move a complete stream's file, or to verify it in S3 first; retried with backoff.",
            "action",
        );
        for action in ["deleted", "moved"] {
            files_disposed.with_label_values(&[action]);
        }
        for action in ["delete", "move"] {
            on_complete_failures.with_label_values(&[action]);
        }
        // Pre-create every series so rates work from the first scrape.
        for status in ["complete", "incomplete"] {
            streams_completed.with_label_values(&[status]);
        }
        for kind in UPLOAD_ERROR_KINDS {
            upload_errors.with_label_values(&[kind]);
        }
        Self {
            files_disposed,
            on_complete_failures,
            chunks_uploaded: counter(
                &registry,
                "chunkstream_chunks_uploaded_total",
                "Chunk objects written to S3 and checkpointed (including re-uploads).",
            ),
            chunks_reuploaded: counter(
                &registry,
                "chunkstream_chunks_reuploaded_total",
                "Chunks uploaded again because verification found changed bytes.",
            ),
            uploaded_bytes: counter(
                &registry,
                "chunkstream_uploaded_bytes_total",
                "Bytes of chunk objects written to S3.",
            ),
            streams_discovered: counter(
                &registry,
                "chunkstream_streams_discovered_total",
                "New streams registered.",
            ),
            streams_completed,
            upload_errors,
            checkpoint_errors: counter(
                &registry,
                "chunkstream_checkpoint_errors_total",
                "Failed checkpoint writes to Redis.",
            ),
            credentials_refresh_failures: counter(
                &registry,
                "chunkstream_credentials_refresh_failures_total",
                "Failed attempts to refresh temporary S3 credentials (each is retried with backoff).",
            ),
            source_errors: counter(
                &registry,
                "chunkstream_source_errors_total",
                "Jobs that failed on the source file (permissions, read errors); retried with backoff.",
            ),
            worker_panics: counter(
                &registry,
                "chunkstream_worker_panics_total",
                "Jobs that panicked in a worker (a bug, or data that slipped past validation); each is retried with backoff.",
            ),
            streams_active: gauge(
                &registry,
                "chunkstream_streams_active",
                "Streams not yet complete.",
            ),
            files_tracked: gauge(
                &registry,
                "chunkstream_files_tracked",
                "Files the coordinator is tracking (active and complete).",
            ),
            inflight_jobs: gauge(
                &registry,
                "chunkstream_inflight_jobs",
                "Jobs handed to workers and not yet finished.",
            ),
            pending_bytes: gauge(
                &registry,
                "chunkstream_pending_bytes",
                "Bytes seen in active streams but not yet uploaded.",
            ),
            streams_owned: gauge(
                &registry,
                "chunkstream_streams_owned",
                "Streams whose lease this replica holds (it alone uploads them).",
            ),
            replicas: gauge(
                &registry,
                "chunkstream_replicas",
                "Live replicas sharing this Redis key prefix, this one included, at the last lease renewal.",
            ),
            unreadable_paths: gauge(
                &registry,
                "chunkstream_unreadable_paths",
                "Files and directories under WATCH_DIR (WATCH_DIR itself included) that the last scan could not read (EIO, ESTALE, EACCES, ...); their streams are kept as they are.",
            ),
            watch_dir_blind: gauge(
                &registry,
                "chunkstream_watch_dir_blind",
                "1 while WATCH_DIR cannot be trusted (unreadable, remounted, or empty while streams are open): no stream completes or vanishes meanwhile.",
            ),
            streams_quarantined: gauge(
                &registry,
                "chunkstream_streams_quarantined",
                "Streams whose checkpoint record in Redis cannot be trusted: nothing is uploaded or closed for them (see /streams for why).",
            ),
            leases_claimed: counter(
                &registry,
                "chunkstream_lease_claims_total",
                "Stream leases this replica claimed (new streams, takeovers, reopens).",
            ),
            leases_lost: counter(
                &registry,
                "chunkstream_leases_lost_total",
                "Streams this replica was working on when another replica took them over (after a pause or partition longer than LEASE_TTL).",
            ),
            last_scan_timestamp: {
                let gauge = prometheus::Gauge::new(
                    "chunkstream_last_scan_timestamp_seconds",
                    "Unix time of the last finished directory scan.",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(gauge.clone()))
                    .expect("unique metric");
                gauge
            },
            storage_up: gauge(
                &registry,
                "chunkstream_storage_up",
                "1 if S3 answered at the last check, else 0.",
            ),
            redis_up: gauge(
                &registry,
                "chunkstream_redis_up",
                "1 if Redis answered at the last check, else 0.",
            ),
            checksum_verified: gauge(
                &registry,
                "chunkstream_s3_checksum_verified",
                "1 if the start-up probe proved that the S3 server verifies x-amz-checksum-sha256, else 0.",
            ),
            content_md5: gauge(
                &registry,
                "chunkstream_s3_content_md5",
                "1 if requests with a body carry Content-MD5 (S3_CONTENT_MD5 and the probe), else 0.",
            ),
            multipart_aborted: counter(
                &registry,
                "chunkstream_multipart_uploads_aborted_total",
                "Abandoned multipart uploads under S3_PREFIX that the sweep aborted.",
            ),
            events_delivered: counter(
                &registry,
                "chunkstream_events_delivered_total",
                "Completion events delivered to every destination and removed from the outbox.",
            ),
            event_delivery_failures,
            events_pending: gauge(
                &registry,
                "chunkstream_events_pending",
                "Completion events waiting in the outbox (due or backing off), at the delivery thread's last look.",
            ),
            bandwidth_limit: gauge(
                &registry,
                "chunkstream_bandwidth_limit_bytes",
                "The upload bandwidth cap in force now (BANDWIDTH_LIMIT, BANDWIDTH_SCHEDULE), bytes per second; 0 means unlimited.",
            ),
            bandwidth: std::sync::OnceLock::new(),
            poll_interval: {
                let gauge = prometheus::Gauge::new(
                    "chunkstream_poll_interval_seconds",
                    "The configured POLL_INTERVAL (for scan-staleness alerts).",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(gauge.clone()))
                    .expect("unique metric");
                gauge
            },
            readiness: Arc::new(Readiness::default()),
            chunk_upload_duration: histogram(
                &registry,
                "chunkstream_chunk_upload_duration_seconds",
                "Time to PUT and checkpoint one chunk (the read and hash come before).",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0],
            ),
            scan_duration: histogram(
                &registry,
                "chunkstream_scan_duration_seconds",
                "Time of one directory scan.",
                vec![
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
            ),
            completion_lag: histogram(
                &registry,
                "chunkstream_stream_completion_lag_seconds",
                "Time from a stream's last change to its metadata being written.",
                vec![1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0],
            ),
            registry,
        }
    }

    /// Publishes the configured poll interval.
    pub fn set_poll_interval(&self, interval: std::time::Duration) {
        self.poll_interval.set(interval.as_secs_f64());
    }

    /// Follows `bandwidth` in `chunkstream_bandwidth_limit_bytes`.
    pub fn watch_bandwidth(&self, bandwidth: Arc<Bandwidth>) {
        let _ = self.bandwidth.set(bandwidth);
    }

    /// What `/readyz` reports, shared with the coordinator's breaker.
    pub fn readiness(&self) -> Arc<Readiness> {
        self.readiness.clone()
    }

    /// The Prometheus text exposition and its content type.
    pub fn render(&self) -> (String, String) {
        if let Some(bandwidth) = self.bandwidth.get() {
            let limit = bandwidth.limit_now().unwrap_or(0);
            self.bandwidth_limit
                .set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let encoder = TextEncoder::new();
        let mut buffer = Vec::new();
        encoder
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding does not fail");
        (
            String::from_utf8(buffer).expect("exposition is UTF-8"),
            encoder.format_type().to_string(),
        )
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Events for Metrics {
    fn stream_discovered(&self) {
        self.streams_discovered.inc();
    }

    fn chunk_uploaded(&self, bytes: u64, seconds: f64, reupload: bool) {
        self.chunks_uploaded.inc();
        self.uploaded_bytes.inc_by(bytes);
        self.chunk_upload_duration.observe(seconds);
        if reupload {
            self.chunks_reuploaded.inc();
        }
    }

    fn upload_error(&self, kind: &'static str) {
        self.upload_errors.with_label_values(&[kind]).inc();
    }

    fn checkpoint_error(&self) {
        self.checkpoint_errors.inc();
    }

    fn source_error(&self) {
        self.source_errors.inc();
    }

    fn worker_panicked(&self) {
        self.worker_panics.inc();
    }

    fn lease_claimed(&self) {
        self.leases_claimed.inc();
    }

    fn lease_lost(&self) {
        self.leases_lost.inc();
    }

    fn stream_closed(&self, status: &'static str, lag_seconds: f64) {
        self.streams_completed.with_label_values(&[status]).inc();
        if status == "complete" {
            self.completion_lag.observe(lag_seconds);
        }
    }

    fn scan_finished(&self, seconds: f64, unix_time: f64) {
        self.scan_duration.observe(seconds);
        self.last_scan_timestamp.set(unix_time);
    }

    fn dependency_checked(&self, dependency: Dependency, outcome: Result<(), String>) {
        let (gauge, name) = match dependency {
            Dependency::Storage => (&self.storage_up, "S3"),
            Dependency::Redis => (&self.redis_up, "Redis"),
        };
        gauge.set(i64::from(outcome.is_ok()));
        let detail = outcome.as_ref().err().cloned();
        if self.readiness.record(dependency, outcome) {
            match detail {
                None => info!("{name} is reachable"),
                Some(detail) => warn!("{name} is unavailable: {detail}"),
            }
        }
    }

    fn credentials_refresh(&self, health: &RefreshHealth) {
        let counted = self.credentials_refresh_failures.get();
        self.credentials_refresh_failures
            .inc_by(health.failures.saturating_sub(counted));
        self.readiness.set_credentials(health.clone());
    }

    fn storage_integrity(&self, integrity: Integrity) {
        self.checksum_verified
            .set(i64::from(integrity.checksum_verified));
        self.content_md5.set(i64::from(integrity.content_md5));
        self.readiness.set_integrity(integrity);
    }

    fn multipart_uploads_aborted(&self, count: u64) {
        self.multipart_aborted.inc_by(count);
    }

    fn event_delivered(&self) {
        self.events_delivered.inc();
    }

    fn event_delivery_failed(&self, destination: &'static str) {
        self.event_delivery_failures
            .with_label_values(&[destination])
            .inc();
    }

    fn events_pending(&self, count: u64) {
        self.events_pending
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    fn file_disposed(&self, _stream_id: &str, _rel_path: &str, disposal: &Disposal) {
        self.files_disposed
            .with_label_values(&[disposal.as_str()])
            .inc();
    }

    fn on_complete_failed(&self, action: &'static str) {
        self.on_complete_failures.with_label_values(&[action]).inc();
    }

    fn gauges(&self, gauges: &Gauges) {
        let set =
            |gauge: &IntGauge, value: u64| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        set(&self.streams_active, gauges.streams_active);
        set(&self.files_tracked, gauges.files_tracked);
        set(&self.inflight_jobs, gauges.inflight_jobs);
        set(&self.pending_bytes, gauges.pending_bytes);
        set(&self.streams_owned, gauges.streams_owned);
        set(&self.replicas, gauges.replicas);
        set(&self.unreadable_paths, gauges.unreadable_paths);
        set(&self.watch_dir_blind, u64::from(gauges.watch_dir_blind));
        set(&self.streams_quarantined, gauges.streams_quarantined);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_show_up_in_the_exposition() {
        let metrics = Metrics::new();
        metrics.chunk_uploaded(10, 0.2, false);
        metrics.chunk_uploaded(5, 0.1, true);
        metrics.upload_error("timeout");
        metrics.stream_closed("complete", 3.0);
        let (text, content_type) = metrics.render();
        assert!(content_type.starts_with("text/plain"));
        assert!(text.contains("chunkstream_chunks_uploaded_total 2"));
        assert!(text.contains("chunkstream_chunks_reuploaded_total 1"));
        assert!(text.contains("chunkstream_uploaded_bytes_total 15"));
        assert!(text.contains("chunkstream_upload_errors_total{kind=\"timeout\"} 1"));
        assert!(text.contains("chunkstream_upload_errors_total{kind=\"http_5xx\"} 0"));
        assert!(text.contains("chunkstream_streams_completed_total{status=\"complete\"} 1"));
        assert!(text.contains("chunkstream_chunk_upload_duration_seconds_bucket"));
    }
}
