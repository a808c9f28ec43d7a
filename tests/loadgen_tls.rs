//! `eval-loadgen --tls`, the client `bench/compare.sh --tls` measures
//! with: against the real proxy terminating TLS with a certificate from
//! `eval-loadgen tls-cert`, in front of the loadgen's echo backend. Its
//! resumption count must be right (the benchmark reports a server that
//! does not resume from it), its echoes verified, and a server it must not
//! trust refused.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use support::*;

struct Certs {
    dir: tempdir::Dir,
}

impl Certs {
    fn new(tag: &str) -> Certs {
        let dir = tempdir::Dir::new(tag);
        let out = Command::new(loadgen())
            .args(["tls-cert", "--dir"])
            .arg(dir.path())
            .output()
            .expect("run eval-loadgen tls-cert");
        assert!(out.status.success(), "tls-cert: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        for (what, file) in [("ca", "ca.pem"), ("cert", "cert.pem"), ("key", "key.pem")] {
            let path = dir.path().join(file);
            assert!(
                stdout.contains(&format!("{what} {}", path.display())),
                "tls-cert printed {stdout:?}"
            );
            assert!(path.exists(), "{} missing", path.display());
        }
        Certs { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// The proxy serving `certs` for `localhost`, in front of an echo backend.
fn tls_proxy(certs: &Certs, backend: &Listening) -> Proxy {
    tls_proxy_with(certs, backend, "")
}

/// As `tls_proxy`, with more config (TOML tables) after the rest.
fn tls_proxy_with(certs: &Certs, backend: &Listening, extra: &str) -> Proxy {
    let config = format!(
        "[token]\nallow_dev_key = true\n\n[placement]\ndefault = \"ws://{}/\"\n\n\
         [[tls.certs]]\ncert = {:?}\nkey = {:?}\nnames = [\"localhost\"]\n{extra}",
        backend.addr(),
        certs.path("cert.pem"),
        certs.path("key.pem"),
    );
    Proxy::start(&config, &[])
}

/// Runs a load mode over wss:// and returns its exit success and report.
fn load(proxy: &Proxy, ca: &PathBuf, args: &[&str]) -> (bool, Value) {
    let out = Command::new(loadgen())
        .args(args)
        .arg("--url")
        .arg(format!("wss://{}/wsv2/", proxy.listen))
        .arg("--ca")
        .arg(ca)
        .args(["--sni", "localhost", "--json", "--token-per-conn"])
        .args(["--dev-key", "--repls", "1", "--timeout", "10s"])
        .output()
        .expect("run eval-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let report = line
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON report; stdout {stdout:?}, stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out.status.success(), report)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[test]
fn handshakes_resume_from_tickets_kept_across_connections() {
    let certs = Certs::new("lgtls-resume");
    let backend = Listening::echo_server();
    let proxy = tls_proxy(&certs, &backend);
    // More workers than rustls' own cache keeps tickets per name (8).
    let args = ["handshake", "--workers", "16", "--duration", "1s"];
    let (ok, r) = load(&proxy, &certs.path("ca.pem"), &args);
    assert!(ok, "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    let (full, resumed) = (n(&r["tls"]["full"]), n(&r["tls"]["resumed"]));
    assert_eq!(full + resumed, n(&r["established"]), "{r}");
    assert!(n(&r["handshakes"]) > 32, "{r}");
    // Each worker's first handshake is full; every later one finds a
    // ticket, since each connection got its tickets before its 101 and
    // the pool keeps them all.
    assert!((1..=16).contains(&full), "{r}");
    assert!(resumed >= n(&r["handshakes"]) - 16, "{r}");
}

#[test]
fn no_resume_makes_every_handshake_full() {
    let certs = Certs::new("lgtls-full");
    let backend = Listening::echo_server();
    let proxy = tls_proxy(&certs, &backend);
    let args = [
        "handshake",
        "--workers",
        "2",
        "--duration",
        "1s",
        "--no-resume",
    ];
    let (ok, r) = load(&proxy, &certs.path("ca.pem"), &args);
    assert!(ok, "{r}");
    assert!(n(&r["handshakes"]) > 10, "{r}");
    assert_eq!(n(&r["tls"]["resumed"]), 0, "{r}");
    assert_eq!(n(&r["tls"]["full"]), n(&r["established"]), "{r}");
}

#[test]
fn echoes_and_bulk_over_tls_are_verified_byte_for_byte() {
    let certs = Certs::new("lgtls-echo");
    let backend = Listening::echo_server();
    let proxy = tls_proxy(&certs, &backend);
    let ca = certs.path("ca.pem");
    let echo = [
        "echo",
        "--conns",
        "8",
        "--messages",
        "4000",
        "--pipeline",
        "4",
    ];
    let (ok, r) = load(&proxy, &ca, &echo);
    assert!(ok, "{r}");
    assert_eq!(n(&r["messages"]), 4000, "{r}");
    // Larger than rustls' outgoing buffer and many records each way.
    let bulk = [
        "bulk",
        "--size",
        "3MiB",
        "--messages",
        "6",
        "--pipeline",
        "2",
    ];
    let (ok, r) = load(&proxy, &ca, &bulk);
    assert!(ok, "{r}");
    assert_eq!(n(&r["bytes"]), 6 * 3 * 1024 * 1024, "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
}

#[test]
fn a_server_whose_certificate_is_not_trusted_is_refused() {
    let certs = Certs::new("lgtls-served");
    let other = Certs::new("lgtls-other");
    let backend = Listening::echo_server();
    let proxy = tls_proxy(&certs, &backend);
    let args = ["echo", "--conns", "1", "--messages", "1"];
    let (ok, r) = load(&proxy, &other.path("ca.pem"), &args);
    assert!(!ok, "{r}");
    assert!(n(&r["errors"]["tls"]) >= 1, "{r}");
    assert_eq!(n(&r["established"]), 0, "{r}");
}

#[test]
fn a_dry_tls_buffer_pool_falls_back_without_losing_a_byte() {
    let certs = Certs::new("lgtls-pool");
    let backend = Listening::echo_server();
    // Two TLS-pool buffers for eight sessions streaming both ways: most
    // receives find the pool empty, or low enough that what they hold is
    // copied out.
    let proxy = tls_proxy_with(&certs, &backend, "[buffers]\ntls_count = 2\n");
    let bulk = [
        "bulk",
        "--conns",
        "8",
        "--size",
        "1MiB",
        "--messages",
        "32",
        "--pipeline",
        "2",
    ];
    let (ok, r) = load(&proxy, &certs.path("ca.pem"), &bulk);
    assert!(ok, "{r}");
    assert_eq!(n(&r["bytes"]), 32 * 1024 * 1024, "{r}");
    assert_eq!(r["errors"], serde_json::json!({}), "{r}");
    let dry = proxy.metric("eval_tls_buffer_pool_exhausted_total", &[]);
    assert!(dry > 0.0, "the pool never ran dry: the test tests nothing");
    assert_eq!(proxy.metric("eval_buffer_ring_exhausted_total", &[]), 0.0);
}
