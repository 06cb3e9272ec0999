//! A webhook receiver for tests and the benchmark: a std `TcpListener` on a
//! loopback port that checks each POST the way a real receiver should
//! (method, content type, the HMAC-SHA256 signature over the raw body under
//! [`SECRET`], headers that agree with the body) and records every delivery
//! id. It can answer 200, 500 or slowly, and be stopped (connections
//! refused) and started again on the same port.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::free_port;

/// The `WEBHOOK_SECRET` the daemon under test signs with.
pub const SECRET: &str = "webhook-test-secret";

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// HTTP 500, as a receiver that is up but broken.
    ServerError,
    /// 200, but only after this long (a request still in flight).
    Slowly(Duration),
}

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub kind: String,
    pub body: Value,
}

#[derive(Default)]
struct Seen {
    /// Accepted (answered 200) deliveries, in order.
    accepted: Vec<Delivery>,
    /// Requests that came in at all, whatever the answer.
    requests: usize,
    /// Requests whose signature or headers were wrong.
    rejected: Vec<String>,
}

/// A webhook receiver on a loopback port; it can be stopped (connections
/// refused) and started again on the same port.
pub struct Receiver {
    pub port: u16,
    answer: Arc<Mutex<Answer>>,
    seen: Arc<Mutex<Seen>>,
    running: Option<Arc<AtomicBool>>,
}

impl Receiver {
    /// A receiver whose port nobody listens on yet.
    pub fn unstarted() -> Self {
        Self {
            port: free_port(),
            answer: Arc::new(Mutex::new(Answer::Ok)),
            seen: Arc::default(),
            running: None,
        }
    }

    pub fn started() -> Self {
        let mut receiver = Self::unstarted();
        receiver.start();
        receiver
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/chunkstream", self.port)
    }

    pub fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("receiver port");
        listener.set_nonblocking(true).expect("nonblocking");
        let running = Arc::new(AtomicBool::new(true));
        let (answer, seen, flag) = (self.answer.clone(), self.seen.clone(), running.clone());
        std::thread::spawn(move || {
            while flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (answer, seen) = (answer.clone(), seen.clone());
                        std::thread::spawn(move || serve(stream, &answer, &seen));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        self.running = Some(running);
    }

    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.store(false, Ordering::SeqCst);
            // The accept loop notices within 20 ms and drops the listener.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    pub fn requests(&self) -> usize {
        self.seen.lock().unwrap().requests
    }

    pub fn accepted(&self) -> Vec<Delivery> {
        self.seen.lock().unwrap().accepted.clone()
    }

    /// Distinct accepted delivery ids of one event type.
    pub fn ids_of(&self, kind: &str) -> BTreeSet<String> {
        self.accepted()
            .into_iter()
            .filter(|delivery| delivery.kind == kind)
            .map(|delivery| delivery.id)
            .collect()
    }

    pub fn assert_all_signed(&self) {
        let rejected = self.seen.lock().unwrap().rejected.clone();
        assert!(rejected.is_empty(), "rejected deliveries: {rejected:?}");
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request, checks it, answers it.
fn serve(stream: TcpStream, answer: &Mutex<Answer>, seen: &Mutex<Seen>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    seen.lock().unwrap().requests += 1;
    let answer = *answer.lock().unwrap();
    let status = match answer {
        Answer::ServerError => "500 Internal Server Error",
        Answer::Ok => "200 OK",
        Answer::Slowly(delay) => {
            std::thread::sleep(delay);
            "200 OK"
        }
    };
    let verdict = check(SECRET, &request_line, &headers, &body);
    let mut writer = stream;
    let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if writer.write_all(reply.as_bytes()).is_err() {
        // The sender is gone (killed): it never learnt of the answer.
        return;
    }
    let mut seen = seen.lock().unwrap();
    match verdict {
        Err(why) => seen.rejected.push(why),
        Ok(delivery) if status.starts_with("200") => seen.accepted.push(delivery),
        Ok(_) => {}
    }
}

/// What a receiver must check: method, content type, the signature over the
/// raw body, and that the headers agree with the body.
fn check(
    secret: &str,
    request_line: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
) -> Result<Delivery, String> {
    if !request_line.starts_with("POST /hooks/chunkstream ") {
        return Err(format!("request line {request_line:?}"));
    }
    if headers.get("content-type").map(String::as_str) != Some("application/json") {
        return Err(format!("content type {:?}", headers.get("content-type")));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let signature = headers.get("x-chunkstream-signature").cloned();
    if signature.as_deref() != Some(expected.as_str()) {
        return Err(format!("signature {signature:?}, expected {expected}"));
    }
    let body: Value = serde_json::from_slice(body).map_err(|err| err.to_string())?;
    let id = headers
        .get("x-chunkstream-delivery")
        .cloned()
        .unwrap_or_default();
    let kind = headers
        .get("x-chunkstream-event")
        .cloned()
        .unwrap_or_default();
    if body["id"] != id.as_str() || body["type"] != kind.as_str() {
        return Err(format!("headers {id}/{kind} disagree with the body {body}"));
    }
    Ok(Delivery { id, kind, body })
}
