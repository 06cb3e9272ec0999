//! The scanner thread: walks and stats the watch directory every
//! `POLL_INTERVAL` and sends each [`Scan`] to the coordinator.
//!
//! On a network file system a walk can take seconds, or hang while the
//! server is away. Running it here keeps the coordinator dispatching jobs,
//! renewing leases and answering `/streams` meanwhile. The channel holds one
//! scan: a coordinator that falls behind gets the next scan when it is ready,
//! never a backlog of stale ones.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, bounded, select};

use crate::events::Events;
use crate::scan::{DirectoryLister, Scan};

/// Starts the scanner. It scans at once, then every `interval` (from the
/// start of one scan to the start of the next), until `stop` closes or the
/// receiver is dropped.
pub fn spawn(
    mut lister: Box<dyn DirectoryLister>,
    interval: Duration,
    events: Arc<dyn Events>,
    stop: Receiver<()>,
) -> std::io::Result<(Receiver<Scan>, JoinHandle<()>)> {
    let (scans_tx, scans_rx) = bounded::<Scan>(1);
    let handle = std::thread::Builder::new()
        .name("scanner".into())
        .spawn(move || {
            loop {
                let started = Instant::now();
                let scan = lister.scan();
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                events.scan_finished(started.elapsed().as_secs_f64(), unix);
                select! {
                    send(scans_tx, scan) -> sent => if sent.is_err() { return },
                    recv(stop) -> _ => return,
                }
                let wait = interval.saturating_sub(started.elapsed());
                if !matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
            }
        })?;
    Ok((scans_rx, handle))
}
