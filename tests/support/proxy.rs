//! A TCP proxy that corrupts request bodies in transit, for proving that no
//! corrupted body is ever stored.
//!
//! It forwards loopback connections to the S3 server. Bytes from the client
//! pass through unchanged until a connection has carried more than
//! [`CLEAN_PREFIX`] bytes (so request lines and headers of a fresh
//! connection stay intact); after that, one bit is flipped in the first
//! such buffer the proxy sees (so every run corrupts something) and then in
//! a pseudo-random share of buffers. Answers from the server pass through
//! unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

/// Bytes of each connection that are never touched.
const CLEAN_PREFIX: u64 = 64 * 1024;
/// Of the later 64 KiB buffers, one in this many gets a flipped bit: about
/// one chunk PUT in three is corrupted, so retries soon get through.
const ONE_IN: u64 = 240;

/// What the client-to-server pumps share.
struct Corruption {
    flips: AtomicU64,
    flipped_once: AtomicBool,
}

pub struct CorruptingProxy {
    pub port: u16,
    corruption: Arc<Corruption>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CorruptingProxy {
    /// Listens on a free loopback port and forwards to `target_port`.
    pub fn start(target_port: u16, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let port = listener.local_addr().expect("address").port();
        let corruption = Arc::new(Corruption {
            flips: AtomicU64::new(0),
            flipped_once: AtomicBool::new(false),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(seed));
        let thread = {
            let (corruption, stop) = (corruption.clone(), stop.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                        continue;
                    };
                    let seed = connections.fetch_add(1, Ordering::SeqCst);
                    let corruption = corruption.clone();
                    let (client_reader, server_writer) = (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    );
                    std::thread::spawn(move || {
                        pump(client_reader, server_writer, Some((seed, corruption)))
                    });
                    std::thread::spawn(move || pump(server, client, None));
                }
            })
        };
        Self {
            port,
            corruption,
            stop,
            thread: Some(thread),
        }
    }

    /// How many bits were flipped so far.
    pub fn flips(&self) -> u64 {
        self.corruption.flips.load(Ordering::SeqCst)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for CorruptingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Copies `from` to `to` until either side closes; with `corrupt`, flips
/// bits as the module doc says.
fn pump(mut from: TcpStream, mut to: TcpStream, corrupt: Option<(u64, Arc<Corruption>)>) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut forwarded = 0u64;
    let mut state = corrupt
        .as_ref()
        .map_or(1, |(seed, _)| seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if let Some((_, corruption)) = &corrupt {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let first =
                forwarded > CLEAN_PREFIX && !corruption.flipped_once.swap(true, Ordering::SeqCst);
            if first || (forwarded > CLEAN_PREFIX && state.is_multiple_of(ONE_IN)) {
                let at = (state >> 20) as usize % read;
                buffer[at] ^= 0x10;
                corruption.flips.fetch_add(1, Ordering::SeqCst);
            }
        }
        forwarded += read as u64;
        if to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
