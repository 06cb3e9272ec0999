//! Redis behind a private CA: redis-server's own TLS port with a certificate
//! from a CA made here with the openssl CLI. With `REDIS_CA_FILE` a stream
//! uploads byte-exact; without it, `/readyz` names the server and says
//! "certificate".

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use support::{MIB, TestEnv, free_port, pseudo_random, require_tool, wait_for};

/// Makes `ca.pem` and a `server.pem`/`server.key` for 127.0.0.1 signed by it.
fn make_ca(dir: &Path) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl {args:?}");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=chunkstream test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
}

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
