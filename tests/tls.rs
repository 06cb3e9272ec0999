//! Redis and S3 behind a private CA made with the openssl CLI: redis-server's
//! own TLS port, and stunnel terminating TLS in front of s3s-fs and of a
//! container credentials endpoint. With `REDIS_CA_FILE` / `AWS_CA_BUNDLE` a
//! stream uploads byte-exact; without them the failure names the server and
//! says "certificate"; `S3_INSECURE_TLS=true` works and warns.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::time::Duration;

use support::stub::{Stub, credentials_json};
use support::tls::{Stunnel, make_ca};
use support::{MIB, TestEnv, free_port, pseudo_random, require_tool, run_to_exit, wait_for};

/// redis-server answering TLS only, on a free port.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let file = |name: &str| dir.join(name).display().to_string();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &file("server.pem")])
            .args(["--tls-key-file", &file("server.key")])
            .args(["--tls-ca-cert-file", &file("ca.pem")])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", &dir.display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        wait_for("redis-server's TLS port", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rediss_with_a_private_ca_works_with_redis_ca_file_and_fails_clearly_without() {
    if require_tool("openssl").is_none() {
        return;
    }
    let Some(env) = TestEnv::start() else { return };
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path());
    let redis = TlsRedis::start(certs.path());

    let untrusted = env.start_daemon(&[("REDIS_URL", &redis.url())]);
    wait_for("/readyz names the server and the certificate", || {
        let (status, body) = untrusted.http("GET", "/readyz");
        status == 503 && body.contains("certificate") && body.contains(&redis.url())
    });
    untrusted.terminate();

    let ca = certs.path().join("ca.pem");
    let daemon = env.start_daemon(&[
        ("REDIS_URL", &redis.url()),
        ("REDIS_CA_FILE", ca.to_str().unwrap()),
    ]);
    let path = env.drop_file("cam-tls.mp4", &pseudo_random(6 * MIB, 11));
    let meta = env.wait_complete("cam-tls.mp4");
    env.assert_byte_exact(&meta, &path);
    let (status, _) = daemon.http("GET", "/readyz");
    assert_eq!(status, 200);
    daemon.terminate();
}

#[test]
fn s3_behind_a_private_ca_works_with_aws_ca_bundle_and_stops_the_start_without() {
    if require_tool("openssl").is_none() {
        return;
    }
    let Some(env) = TestEnv::start() else { return };
    let certs = tempfile::tempdir().unwrap();
    make_ca(certs.path());
    // The container credentials endpoint hands out the test's keys.
    let credentials = Stub::start(|_, n| {
        (
            200,
            credentials_json(&format!("session-{n}"), Duration::from_secs(3600)),
        )
    });
    let stub_port: u16 = credentials
        .base
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let Some(stunnel) = Stunnel::start(certs.path(), &[env.s3.port, stub_port]) else {
        return;
    };
    let endpoint = format!("https://127.0.0.1:{}", stunnel.ports[0]);
    let credentials_uri = format!("https://127.0.0.1:{}/creds", stunnel.ports[1]);

    // Without the CA: the start stops, naming the endpoint and the certificate.
    let mut vars = env.daemon_env();
    vars.insert("S3_ENDPOINT".into(), endpoint.clone());
    let output = run_to_exit(vars);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&endpoint) && stderr.contains("certificate"),
        "{stderr}"
    );

    // With AWS_CA_BUNDLE: S3 and the credentials endpoint, both over TLS.
    let ca = certs.path().join("ca.pem");
    let mut vars = env.keyless_env();
    vars.insert("S3_ENDPOINT".into(), endpoint.clone());
    vars.insert("AWS_CA_BUNDLE".into(), ca.display().to_string());
    vars.insert("AWS_CONTAINER_CREDENTIALS_FULL_URI".into(), credentials_uri);
    let daemon = support::Daemon::start(vars, env.watch.path());
    let path = env.drop_file("cam-ca.mp4", &pseudo_random(12 * MIB + 5, 21));
    let meta = env.wait_complete("cam-ca.mp4");
    env.assert_byte_exact(&meta, &path);
    let (_, log) = daemon.terminate();
    assert!(log.contains("credentials: container credentials"), "{log}");

    // S3_INSECURE_TLS=true: no verification, and a warning at the start.
    let daemon = env.start_daemon(&[("S3_ENDPOINT", &endpoint), ("S3_INSECURE_TLS", "true")]);
    let path = env.drop_file("cam-insecure.mp4", &pseudo_random(6 * MIB, 22));
    let meta = env.wait_complete("cam-insecure.mp4");
    env.assert_byte_exact(&meta, &path);
    let (_, log) = daemon.terminate();
    assert!(log.contains("are NOT verified"), "{log}");
}
