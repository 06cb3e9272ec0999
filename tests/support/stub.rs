//! A local HTTP server answering with a closure: the stand-in for the
//! container credentials endpoint and the instance-metadata service.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use super::{ACCESS_KEY, SECRET_KEY};

/// A local HTTP server: every request gets `answer(request, n)`, a status
/// and a body, `n` counting the requests from 0. Stops when dropped.
pub struct Stub {
    pub base: String,
    pub answered: Arc<AtomicUsize>,
    server: Arc<tiny_http::Server>,
}

impl Stub {
    pub fn start(
        answer: impl Fn(&tiny_http::Request, usize) -> (u16, String) + Send + 'static,
    ) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind"));
        let port = server.server_addr().to_ip().expect("ip").port();
        let answered = Arc::new(AtomicUsize::new(0));
        let (serving, count) = (server.clone(), answered.clone());
        std::thread::spawn(move || {
            for request in serving.incoming_requests() {
                let (status, body) = answer(&request, count.fetch_add(1, Ordering::SeqCst));
                let _ = request
                    .respond(tiny_http::Response::from_string(body).with_status_code(status));
            }
        });
        Self {
            base: format!("http://127.0.0.1:{port}"),
            answered,
            server,
        }
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// The JSON of the container endpoint and IMDS: the test's keys, expiring
/// `lifetime` from now.
pub fn credentials_json(token: &str, lifetime: Duration) -> String {
    let expires = humantime::format_rfc3339_seconds(SystemTime::now() + lifetime);
    format!(
        r#"{{"AccessKeyId":"{ACCESS_KEY}","SecretAccessKey":"{SECRET_KEY}","Token":"{token}","Expiration":"{expires}"}}"#
    )
}

/// The value of header `name`, if the request has it.
pub fn header(request: &tiny_http::Request, name: &str) -> Option<String> {
    request
        .headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.to_string())
}
