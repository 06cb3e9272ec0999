//! A private CA made with the openssl CLI, and stunnel terminating TLS with
//! its certificate in front of a plain-HTTP test server.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::{free_port, require_tool, wait_for};

/// Makes `ca.pem` and a `server.pem`/`server.key` for 127.0.0.1 signed by it.
pub fn make_ca(dir: &Path) {
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

/// stunnel (`stunnel4` on Debian) answering TLS with `server.pem` on one
/// loopback port per target, forwarding in plain text to the target port.
pub struct Stunnel {
    child: Child,
    /// The TLS port of each target, in order.
    pub ports: Vec<u16>,
}

impl Stunnel {
    /// `None` (skip) when stunnel is missing outside CI. `dir` holds the
    /// certificates from [`make_ca`].
    pub fn start(dir: &Path, targets: &[u16]) -> Option<Self> {
        let binary = require_tool("stunnel4")?;
        let ports: Vec<u16> = targets.iter().map(|_| free_port()).collect();
        let mut conf = format!(
            "foreground = yes\npid =\ncert = {}\nkey = {}\n",
            dir.join("server.pem").display(),
            dir.join("server.key").display()
        );
        for (n, (port, target)) in ports.iter().zip(targets).enumerate() {
            conf.push_str(&format!(
                "[target{n}]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{target}\n"
            ));
        }
        let path = dir.join("stunnel.conf");
        std::fs::write(&path, conf).expect("stunnel.conf");
        let child = Command::new(binary)
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("stunnel starts");
        for port in &ports {
            wait_for("stunnel's TLS port", || {
                std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok()
            });
        }
        Some(Self { child, ports })
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
