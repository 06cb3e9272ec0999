//! `chunkstream status` and `chunkstream healthcheck`: small HTTP clients for
//! a running instance.
//!
//! `healthcheck` exists so a container image needs no curl for its Docker
//! `HEALTHCHECK`. `status` answers "what is being uploaded right now, and how
//! far along is it" from `/streams`, as a progress view in a terminal and as
//! stable plain text (or JSON) when piped.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytesize::ByteSize;

use crate::error::AppError;
use crate::http::StreamsSnapshot;
use crate::store::Integrity;
use crate::stream::table::StreamView;

/// Per-request timeout for both commands.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 24;

/// The URL to reach an instance listening on `metrics_addr` from this host.
pub fn default_url(metrics_addr: &str) -> String {
    match metrics_addr.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => format!("http://127.0.0.1:{}", addr.port()),
        Ok(addr) => format!("http://{addr}"),
        Err(_) => "http://127.0.0.1:9102".to_string(),
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(REQUEST_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into()
}

fn get(url: &str, path: &str) -> Result<(u16, String), AppError> {
    let full = format!("{}{path}", url.trim_end_matches('/'));
    let mut response = agent()
        .get(&full)
        .call()
        .map_err(|err| AppError::Startup(format!("no chunkstream listening at {url}: {err}")))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|err| AppError::Startup(format!("reading {full}: {err}")))?;
    Ok((status, body))
}

/// True when `/healthz` answers 200.
pub fn healthcheck(url: &str) -> bool {
    matches!(get(url, "/healthz"), Ok((200, _)))
}

pub fn fetch_streams(url: &str) -> Result<StreamsSnapshot, AppError> {
    let (status, body) = get(url, "/streams")?;
    if status != 200 {
        return Err(AppError::Startup(format!(
            "{url}/streams answered HTTP {status}: {}",
            body.trim()
        )));
    }
    serde_json::from_str(&body).map_err(|err| {
        AppError::Startup(format!("{url}/streams is not a chunkstream answer: {err}"))
    })
}

fn progress_bar(done: u64, total: u64) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as u128 * BAR_WIDTH as u128) / total as u128) as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR_WIDTH - filled))
}

fn percent(done: u64, total: u64) -> f64 {
    if total == 0 {
        100.0
    } else {
        done.min(total) as f64 * 100.0 / total as f64
    }
}

/// How uploads are protected, in words.
fn integrity_line(integrity: Integrity) -> String {
    let checksum = if integrity.checksum_verified {
        "the server verifies x-amz-checksum-sha256"
    } else {
        "the server does NOT verify x-amz-checksum-sha256"
    };
    let md5 = if integrity.content_md5 {
        "Content-MD5 sent"
    } else {
        "no Content-MD5"
    };
    format!("s3 integrity: {checksum}; {md5}")
}

/// One line per stream, the S3 integrity row, then a summary line. Stable: no colours, no widths
/// that depend on the terminal.
pub fn render(snapshot: &StreamsSnapshot) -> String {
    let mut out = String::new();
    let is_active = |s: &&StreamView| !matches!(s.state.as_str(), "complete" | "incomplete");
    let active: Vec<&StreamView> = snapshot.streams.iter().filter(is_active).collect();
    for stream in &active {
        let mut line = format!(
            "{} {:5.1}% {:>10} / {:<10} {:>10}/s  {:<10} {} ({})",
            progress_bar(stream.uploaded_bytes, stream.size_bytes),
            percent(stream.uploaded_bytes, stream.size_bytes),
            ByteSize::b(stream.uploaded_bytes)
                .display()
                .iec()
                .to_string(),
            ByteSize::b(stream.size_bytes).display().iec().to_string(),
            ByteSize::b(stream.upload_rate_bytes_per_second as u64)
                .display()
                .iec()
                .to_string(),
            stream.state,
            stream.path,
            stream.stream_id,
        );
        if stream.retries > 0 {
            line.push_str(&format!(" retries={}", stream.retries));
        }
        if let Some(error) = &stream.last_error {
            line.push_str(&format!(" last_error={error:?}"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(integrity) = snapshot.s3_integrity {
        out.push_str(&integrity_line(integrity));
        out.push('\n');
    }
    if let Some(reason) = &snapshot.watch_dir_blind {
        out.push_str(&format!("watch dir: degraded: {reason}\n"));
    }
    let recent = snapshot.streams.len() - active.len();
    let pending: u64 = active
        .iter()
        .filter(|s| s.owned)
        .map(|s| s.size_bytes.saturating_sub(s.uploaded_bytes))
        .sum();
    let rate: f64 = active.iter().map(|s| s.upload_rate_bytes_per_second).sum();
    let elsewhere = active.iter().filter(|s| !s.owned).count();
    out.push_str(&format!(
        "{}: {} active ({} owned by other replicas), {} recently finished, {} pending, {}/s\n",
        snapshot.instance,
        active.len(),
        elsewhere,
        recent,
        ByteSize::b(pending).display().iec(),
        ByteSize::b(rate as u64).display().iec()
    ));
    out
}

/// Prints the status once, or every second with `watch` (redrawn in place in
/// a terminal, appended when piped).
pub fn status(url: &str, as_json: bool, watch: bool) -> Result<(), AppError> {
    let terminal = std::io::stdout().is_terminal();
    loop {
        let snapshot = fetch_streams(url)?;
        let text = if as_json {
            format!(
                "{}\n",
                serde_json::to_string_pretty(&snapshot).expect("serializable")
            )
        } else {
            render(&snapshot)
        };
        let mut stdout = std::io::stdout().lock();
        if watch && terminal {
            // Clear the screen and move home, so the bars redraw in place.
            let _ = write!(stdout, "\x1b[2J\x1b[H");
        }
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
        if !watch {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(path: &str, state: &str, uploaded: u64, size: u64) -> StreamView {
        StreamView {
            stream_id: format!("{path}-id"),
            path: path.into(),
            state: state.into(),
            size_bytes: size,
            uploaded_bytes: uploaded,
            chunks_uploaded: 1,
            last_change_seconds_ago: 0.5,
            retries: 0,
            last_error: None,
            upload_rate_bytes_per_second: 1024.0 * 1024.0,
            revision: 0,
            owned: state != "elsewhere",
        }
    }

    #[test]
    fn default_url_reaches_a_wildcard_listener_on_loopback() {
        assert_eq!(default_url("0.0.0.0:9102"), "http://127.0.0.1:9102");
        assert_eq!(default_url("10.1.2.3:80"), "http://10.1.2.3:80");
    }

    #[test]
    fn plain_status_is_one_line_per_active_stream_and_a_summary() {
        let snapshot = StreamsSnapshot {
            instance: "host-1-abc".into(),
            streams: vec![
                view("cam1.mp4", "uploading", 10 << 20, 40 << 20),
                view("cam2.mp4", "elsewhere", 0, 40 << 20),
                view("old.mp4", "complete", 5, 5),
            ],
            s3_integrity: Some(Integrity {
                checksum_verified: false,
                content_md5: true,
            }),
            watch_dir_blind: None,
        };
        let text = render(&snapshot);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[2],
            "s3 integrity: the server does NOT verify x-amz-checksum-sha256; Content-MD5 sent"
        );
        assert!(
            lines[0].starts_with("[######------------------]  25.0%"),
            "{text}"
        );
        assert!(lines[0].contains("cam1.mp4 (cam1.mp4-id)"));
        assert!(lines[0].contains("uploading"));
        assert!(lines[1].contains("elsewhere"));
        assert_eq!(
            lines[3],
            "host-1-abc: 2 active (1 owned by other replicas), 1 recently finished, 30.0 MiB pending, 2.0 MiB/s"
        );
    }

    #[test]
    fn bars_handle_empty_and_overfull_streams() {
        assert_eq!(progress_bar(0, 0), format!("[{}]", "-".repeat(BAR_WIDTH)));
        assert_eq!(progress_bar(9, 4), format!("[{}]", "#".repeat(BAR_WIDTH)));
        assert_eq!(percent(0, 0), 100.0);
    }

    #[test]
    fn a_blind_watch_dir_gets_its_own_status_row() {
        let snapshot = StreamsSnapshot {
            instance: "host-1-abc".into(),
            streams: vec![view("cam1.mp4", "unseen", 10 << 20, 40 << 20)],
            s3_integrity: None,
            watch_dir_blind: Some("watch directory /w is not readable (EIO)".into()),
        };
        let text = render(&snapshot);
        assert!(
            text.lines()
                .any(|line| line == "watch dir: degraded: watch directory /w is not readable (EIO)"),
            "{text}"
        );
    }
}
