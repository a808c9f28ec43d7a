//! `wss://`: the real proxy terminating TLS, with real clients (Python
//! `websockets`, Node `ws`, `openssl s_client`, Python's `ssl` for
//! resumption) and certificates made here with rcgen (no key is committed;
//! the RSA key comes from `openssl genpkey`, since rcgen's ring backend
//! cannot make one).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use eval_proxy::dev::conman::ConmanHandle;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use support::*;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A test CA, four leaf certificates it signed (ECDSA P-256 for
/// `eval.test`, localhost and 127.0.0.1, RSA 2048 for `other.test`, ECDSA
/// for `expired.test`, valid in 2020 only, and `client.test`, a client's),
/// and a second CA that signed nothing the proxy serves, only the client
/// certificate `stranger.test`.
struct Pki {
    dir: tempdir::Dir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempdir::Dir::new("pki");
        let ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, cn);
            let cert = p.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("eval test CA");
        let (other_ca, other_key) = ca("someone else's CA");
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other_ca.pem()).unwrap();
        let leaf_by =
            |name: &str, key: &KeyPair, sans: &[&str], by: (&rcgen::Certificate, &KeyPair)| {
                let mut p =
                    CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                        .unwrap();
                p.distinguished_name.push(DnType::CommonName, name);
                if name == "expired.test" {
                    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
                    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
                }
                let cert = p.signed_by(key, by.0, by.1).unwrap();
                std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
                std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem())
                    .unwrap();
            };
        let leaf = |name: &str, key: &KeyPair, sans: &[&str]| {
            leaf_by(name, key, sans, (&ca_cert, &ca_key))
        };
        leaf(
            "eval.test",
            &KeyPair::generate().unwrap(),
            &["eval.test", "localhost", "127.0.0.1"],
        );
        leaf(
            "client.test",
            &KeyPair::generate().unwrap(),
            &["client.test"],
        );
        leaf_by(
            "stranger.test",
            &KeyPair::generate().unwrap(),
            &["stranger.test"],
            (&other_ca, &other_key),
        );
        let rsa = dir.path().join("rsa.key");
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&rsa)
            .output()
            .expect("openssl (bash .ci/install-deps.sh)");
        assert!(out.status.success(), "openssl genpkey: {out:?}");
        let rsa_key = KeyPair::from_pem(&std::fs::read_to_string(&rsa).unwrap()).unwrap();
        leaf("other.test", &rsa_key, &["other.test"]);
        leaf(
            "expired.test",
            &KeyPair::generate().unwrap(),
            &["expired.test"],
        );
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ca(&self) -> String {
        self.path("ca.pem").display().to_string()
    }

    /// The `[tls]` section serving both certificates.
    fn config(&self, handshake_timeout_ms: u64) -> String {
        let entry = |name: &str| {
            format!(
                "[[tls.certs]]\ncert = {:?}\nkey = {:?}\nnames = [{name:?}]\n",
                self.path(&format!("{name}.pem")),
                self.path(&format!("{name}.key")),
            )
        };
        format!(
            "[tls]\nhandshake_timeout_ms = {handshake_timeout_ms}\n{}{}{}",
            entry("eval.test"),
            entry("other.test"),
            entry("expired.test")
        )
    }
}

fn wss(proxy: &Proxy, token: &str) -> String {
    format!("wss://{}/wsv2/{token}", proxy.listen)
}

fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!("{what}: cannot run ({e}); run `bash .ci/install-deps.sh` first")
    })
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = run(cmd, what);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn py_client() -> Command {
    let mut c = Command::new("python3");
    c.arg(root().join("tests/clients/py_client.py"));
    c
}

fn node_client() -> Command {
    let mut c = Command::new("node");
    c.arg(root().join("tests/clients/node_client.js"));
    c
}

fn tls_proxy(pki: &Pki, shards: &str) -> (ConmanHandle, Proxy) {
    let conman = echo_conman();
    let proxy = Proxy::start(
        &config_for(conman.local_addr, &pki.config(10_000)),
        &["--shards", shards],
    );
    (conman, proxy)
}

fn tls_failures(proxy: &Proxy, reason: &str) -> f64 {
    proxy.metric(
        "eval_session_setup_failures_total",
        &["stage=\"request\"", &format!("reason=\"{reason}\"")],
    )
}

/// Echo through the proxy, byte for byte, small and large (3 MiB: many
/// records, many ring buffers) both ways; SNI picks the RSA certificate
/// when asked; a certificate the client does not trust, for another name,
/// or expired, fails the way Python says it does.
#[test]
fn python_websockets_over_wss() {
    let pki = Pki::new();
    let (_conman, proxy) = tls_proxy(&pki, "1");
    let url = wss(&proxy, &dev_token("r1"));
    run_ok(
        py_client().args(["--cafile", &pki.ca(), "--binary-size", "3145728", &url]),
        "py_client over wss",
    );
    // SNI `other.test`: only the RSA certificate verifies for that name.
    run_ok(
        py_client().args(["--cafile", &pki.ca(), "--server-name", "other.test", &url]),
        "py_client over wss, SNI other.test",
    );
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 2.0);
    let untrusted = run_ok(
        py_client().args([
            "--cafile",
            &pki.path("other-ca.pem").display().to_string(),
            "--expect-tls-error",
            &url,
        ]),
        "py_client, untrusted CA",
    );
    assert!(
        untrusted.contains("unable to get local issuer certificate"),
        "{untrusted}"
    );
    let wrong = run_ok(
        py_client().args([
            "--cafile",
            &pki.ca(),
            "--server-name",
            "wrong.test",
            "--expect-tls-error",
            &url,
        ]),
        "py_client, wrong name",
    );
    assert!(wrong.contains("Hostname mismatch"), "{wrong}");
    let expired = run_ok(
        py_client().args([
            "--cafile",
            &pki.ca(),
            "--server-name",
            "expired.test",
            "--expect-tls-error",
            &url,
        ]),
        "py_client, expired certificate",
    );
    assert!(expired.contains("certificate has expired"), "{expired}");
    // The client's alert ends each handshake; the proxy counts all three.
    let deadline = Instant::now() + WAIT;
    // Python closes without sending its alert (`tls_handshake_eof`);
    // others send it first (`tls_handshake`).
    while tls_failures(&proxy, "tls_handshake") + tls_failures(&proxy, "tls_handshake_eof") != 3.0 {
        assert!(
            Instant::now() < deadline,
            "three failed handshakes not counted:\n{}",
            proxy.metrics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 2.0);
}

/// Node `ws`: an echo over wss://, and a certificate from another CA,
/// for another name or expired refused with Node's own error codes.
#[test]
fn node_ws_over_wss() {
    let pki = Pki::new();
    let (_conman, proxy) = tls_proxy(&pki, "1");
    let url = wss(&proxy, &dev_token("r1"));
    run_ok(
        node_client().args(["--ca", &pki.ca(), "--binary-size", "3145728", &url]),
        "node_client over wss",
    );
    let code = run_ok(
        node_client().args([
            "--ca",
            &pki.path("other-ca.pem").display().to_string(),
            "--expect-tls-error",
            &url,
        ]),
        "node_client, untrusted CA",
    );
    assert_eq!(code.trim(), "UNABLE_TO_VERIFY_LEAF_SIGNATURE");
    // SNI picks the certificate; Node checks it against the same name.
    for (name, want) in [
        ("wrong.test", "ERR_TLS_CERT_ALTNAME_INVALID"),
        ("expired.test", "CERT_HAS_EXPIRED"),
    ] {
        let code = run_ok(
            node_client().args([
                "--ca",
                &pki.ca(),
                "--server-name",
                name,
                "--expect-tls-error",
                &url,
            ]),
            "node_client, bad certificate",
        );
        assert_eq!(code.trim(), want, "{name}");
    }
    // Over plain ws:// to a TLS listener the upgrade cannot even start.
    let out = run(
        node_client().args(["--timeout", "10", &proxy.url(&dev_token("r1"))]),
        "node_client ws:// to wss listener",
    );
    assert!(!out.status.success());
}

/// What `openssl s_client` negotiated: (protocol, ALPN, subject, verified).
fn s_client(proxy: &Proxy, pki: &Pki, args: &[&str]) -> String {
    let out = run(
        Command::new("openssl")
            .args(["s_client", "-connect", &proxy.listen.to_string()])
            .args(["-CAfile", &pki.ca(), "-alpn", "http/1.1"])
            .args(args)
            .stdin(Stdio::null()),
        "openssl s_client",
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subject line of the certificate served for SNI `eval.test`.
fn served_subject(proxy: &Proxy, pki: &Pki) -> String {
    let out = s_client(proxy, pki, &["-servername", "eval.test"]);
    out.lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn openssl_versions_alpn_and_sni() {
    let pki = Pki::new();
    let (_conman, proxy) = tls_proxy(&pki, "1");
    for (version, name, subject, protocol) in [
        ("-tls1_3", "eval.test", "CN = eval.test", "TLSv1.3"),
        ("-tls1_2", "eval.test", "CN = eval.test", "TLSv1.2"),
        ("-tls1_3", "other.test", "CN = other.test", "TLSv1.3"),
        ("-tls1_2", "other.test", "CN = other.test", "TLSv1.2"),
        // A name nobody lists, and no SNI at all: the first certificate.
        ("-tls1_3", "nobody.test", "CN = eval.test", "TLSv1.3"),
    ] {
        let out = s_client(&proxy, &pki, &[version, "-servername", name]);
        let what = format!("{version} {name}:\n{out}");
        assert!(out.contains(&format!("subject={subject}")), "{what}");
        assert!(out.contains(&format!("New, {protocol}, ")), "{what}");
        assert!(out.contains("ALPN protocol: http/1.1"), "{what}");
        if name != "nobody.test" {
            assert!(out.contains("Verify return code: 0 (ok)"), "{what}");
        }
    }
    let out = s_client(&proxy, &pki, &["-noservername"]);
    assert!(out.contains("subject=CN = eval.test"), "{out}");
    // Only http/1.1 is spoken: a client that insists on h2 is refused.
    let out = run(
        Command::new("openssl")
            .args(["s_client", "-connect", &proxy.listen.to_string()])
            .args(["-alpn", "h2"])
            .stdin(Stdio::null()),
        "openssl s_client -alpn h2",
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("no application protocol"), "{text}");
    // TLS 1.1 is not offered.
    let out = run(
        Command::new("openssl")
            .args(["s_client", "-connect", &proxy.listen.to_string()])
            .args(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(Stdio::null()),
        "openssl s_client -tls1_1",
    );
    assert!(!out.status.success(), "TLS 1.1 was accepted");
}

/// Tickets from one shard resume on the other (one ticketer for all), for
/// TLS 1.3 and 1.2; `/healthz` answers over TLS.
#[test]
fn sessions_resume_across_shards() {
    let pki = Pki::new();
    let (_conman, proxy) = tls_proxy(&pki, "2");
    let script = r#"
import socket, ssl, sys
port, ca, version = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, version)
def get(session=None):
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="eval.test", session=session) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: eval.test\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data
            return s.session, s.session_reused
session, reused = get()
assert not reused
print(sum(get(session)[1] for _ in range(16)))
"#;
    for version in ["TLSv1_3", "TLSv1_2"] {
        let out = run_ok(
            Command::new("python3").args([
                "-c",
                script,
                &proxy.listen.port().to_string(),
                &pki.ca(),
                version,
            ]),
            "resumption script",
        );
        assert_eq!(out.trim(), "16", "{version}: resumed of 16");
    }
    // Both shards took connections (SO_REUSEPORT spreads 34 of them).
    let per_shard = |s: &str| {
        proxy.metric(
            "eval_connections_accepted_total",
            &[&format!("shard=\"{s}\"")],
        )
    };
    assert!(per_shard("0") > 0.0 && per_shard("1") > 0.0);
}

/// A client that stops half way through its hello is dropped when
/// `tls.handshake_timeout_ms` is over, not before.
#[test]
fn a_stalled_handshake_is_dropped_at_its_deadline() {
    let pki = Pki::new();
    let conman = echo_conman();
    let proxy = Proxy::start(
        &config_for(conman.local_addr, &pki.config(1_000)),
        &["--shards", "1"],
    );
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let t0 = Instant::now();
    // A handshake record header announcing 512 bytes, and 2 of them.
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .unwrap();
    let mut buf = [0u8; 64];
    let n = match s.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
        Err(e) => panic!("read: {e}"),
    };
    let waited = t0.elapsed();
    assert_eq!(n, 0, "got {:?} instead of the end", &buf[..n]);
    assert!(
        waited >= Duration::from_millis(900),
        "dropped after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "dropped after {waited:?}");
    wait_until("the timeout counted", WAIT, || {
        tls_failures(&proxy, "tls_handshake_timeout") == 1.0
    });
    // Plaintext HTTP to the TLS port: a TLS alert, then the end.
    let mut s = TcpStream::connect(proxy.listen).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_eq!(got.first(), Some(&0x15), "an alert record: {got:?}");
}

/// A certificate that does not load keeps the proxy from starting, and
/// the message names the entry.
#[test]
fn a_bad_certificate_is_a_config_error() {
    let pki = Pki::new();
    let cfg_path = pki.path("eval.toml");
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[placement]\ndefault = \"ws://127.0.0.1:1/\"\n[[tls.certs]]\ncert = {:?}\nkey = {:?}\n",
        pki.path("eval.test.pem"),
        pki.path("other.test.key"),
    );
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = run(
        Command::new(bin())
            .arg("--config")
            .arg(&cfg_path)
            .arg("--check"),
        "eval-proxy --check",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.certs[0]") && err.contains("does not match"),
        "{err}"
    );
}

/// `eval-proxy --dev --tls`: a wss:// URL that works for a client trusting
/// the CA it names; the files go when the proxy exits.
#[test]
fn dev_tls_prints_a_wss_url_and_the_ca_to_trust() {
    let mut cmd = Command::new(bin());
    cmd.args([
        "--dev",
        "--tls",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ])
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut proxy = Proxy::spawn(cmd, tempdir::Dir::new("dev-tls"));
    let word = |prefix: &str| {
        proxy
            .banner
            .iter()
            .flat_map(|l| l.split_whitespace())
            .find(|w| w.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}… in {:?}", proxy.banner))
            .to_string()
    };
    let url = word("wss://");
    let ca = word("/");
    assert!(
        url.starts_with(&format!("wss://{}/wsv2/v4.public.", proxy.listen)),
        "{url}"
    );
    assert!(ca.ends_with("ca.pem"), "{ca}");
    run_ok(
        py_client().args(["--cafile", &ca, &url]),
        "py_client on the --dev --tls URL",
    );
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_exit().success());
    assert!(!Path::new(&ca).exists(), "{ca} left behind");
}

/// Headless Chromium opens `wss://` from a page, trusting the test
/// certificate by its public key; without that trust it is refused, as a
/// browser refuses any certificate it does not trust.
#[test]
fn headless_chromium_over_wss() {
    let pki = Pki::new();
    let (_conman, proxy) = tls_proxy(&pki, "1");
    let url = wss(&proxy, &dev_token("r1"));
    let spki = run_ok(
        Command::new("sh").arg("-c").arg(format!(
            "openssl x509 -in {:?} -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
            pki.path("eval.test.pem")
        )),
        "SPKI hash",
    );
    let chromium = || {
        let mut c = Command::new("python3");
        c.arg(root().join("tests/clients/chromium_check.py"));
        c
    };
    run_ok(
        chromium().args(["--trust-spki", spki.trim(), &url]),
        "chromium_check over wss",
    );
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 1.0);
    run_ok(
        chromium().args(["--expect-refused", &url]),
        "chromium_check, untrusted",
    );
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 1.0);
}

/// SIGHUP loads the certificates again: new handshakes get the new one
/// (here another certificate for the same listener), and a file that does
/// not load is refused, counted, and leaves the last good one serving.
#[test]
fn sighup_reloads_certificates_and_a_bad_one_keeps_the_old() {
    let pki = Pki::new();
    let conman = echo_conman();
    let only = |name: &str, key: &str| {
        format!(
            "[tls]\n[[tls.certs]]\ncert = {:?}\nkey = {:?}\nnames = [\"eval.test\"]\n",
            pki.path(&format!("{name}.pem")),
            pki.path(key),
        )
    };
    let proxy = Proxy::start_captured(
        &config_for(conman.local_addr, &only("other.test", "other.test.key")),
        &["--shards", "1"],
    );
    let file = proxy.dir.path().join("eval.toml");
    let subject = |proxy: &Proxy| served_subject(proxy, &pki);
    assert_eq!(subject(&proxy), "subject=CN = other.test");

    std::fs::write(
        &file,
        config_for(conman.local_addr, &only("eval.test", "eval.test.key")),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until("a config reload", WAIT, || {
        proxy.metric("eval_config_reloads_total", &[]) == 1.0
    });
    assert_eq!(subject(&proxy), "subject=CN = eval.test");

    // A key that does not match its certificate: refused, old one stays.
    std::fs::write(
        &file,
        config_for(conman.local_addr, &only("eval.test", "other.test.key")),
    )
    .unwrap();
    proxy.signal(libc::SIGHUP);
    wait_until("a refused reload", WAIT, || {
        proxy.metric("eval_config_reload_failures_total", &[]) == 1.0
    });
    assert_eq!(subject(&proxy), "subject=CN = eval.test");
}

// ---- wss:// to Conman -------------------------------------------------

/// A fake Conman speaking TLS with the leaf `name` (see [`Pki`]); with
/// `client_ca`, it requires a client certificate that CA signed.
fn tls_conman(pki: &Pki, name: &str, client_ca: Option<&str>) -> ConmanHandle {
    let cfg = eval_proxy::dev::conman::tls_config(
        &pki.path(&format!("{name}.pem")),
        &pki.path(&format!("{name}.key")),
        client_ca.map(|ca| pki.path(ca)).as_deref(),
    )
    .unwrap();
    fake_conman(eval_proxy::dev::conman::Behavior {
        vm_id: "vm-tls".into(),
        tls: Some(cfg),
        ..Default::default()
    })
}

/// A proxy whose one Conman is `url`, trusting the CA file `ca` for it,
/// presenting the client certificate `client` if given.
fn proxy_to_wss(pki: &Pki, url: &str, ca: &str, client: Option<&str>, extra: &str) -> Proxy {
    let mut cfg = format!(
        "[token]\nallow_dev_key = true\n[placement]\ndefault = {url:?}\n{extra}\n[conman.tls]\nca_file = {:?}\nhandshake_timeout_ms = 1000\n",
        pki.path(ca)
    );
    if let Some(name) = client {
        cfg += &format!(
            "cert = {:?}\nkey = {:?}\n",
            pki.path(&format!("{name}.pem")),
            pki.path(&format!("{name}.key"))
        );
    }
    Proxy::start(&cfg, &["--shards", "1"])
}

/// Echo of a text and a 3 MiB binary message through the proxy.
fn echo_through(proxy: &Proxy) {
    let mut ws = connect(&proxy.url(&dev_token("r1")));
    ws.send(tungstenite::Message::text("hello over wss"))
        .unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), "hello over wss");
    let big: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i * 31 + i / 4093) as u8)
        .collect();
    ws.send(tungstenite::Message::binary(big.clone())).unwrap();
    assert_eq!(ws.read().unwrap().into_data().to_vec(), big);
    ws.send(tungstenite::Message::text("__vm__")).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap(), "vm-tls");
    ws.close(None).unwrap();
    // Conman's answer to our Close comes back through the proxy.
    let end = loop {
        match ws.read() {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    assert!(matches!(end, tungstenite::Error::ConnectionClosed), "{end}");
}

/// The Close a client gets when setup fails, and the failure counted
/// under `stage="conman_tls"` with `reason`.
fn fails_with(proxy: &Proxy, reason: &str) {
    // A raw client: tungstenite turns a received 1014 into 1002.
    let mut s = raw_client(proxy.listen, &dev_token("r1"));
    let (code, text) = read_close(&mut s);
    assert_eq!(
        (code, text.as_str()),
        (1014, format!("stage=conman_tls;reason={reason}").as_str())
    );
    let counted = proxy.metric(
        "eval_session_setup_failures_total",
        &["stage=\"conman_tls\"", &format!("reason=\"{reason}\"")],
    );
    assert_eq!(counted, 1.0, "{}", proxy.metrics());
    assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 0.0);
}

/// `wss://` Conman: relayed by a DNS name (SNI, verified against a DNS
/// SAN) and by an IP literal (an IP SAN); refused, with the stage and the
/// reason, when the CA is not the one that signed it, when the
/// certificate is for another name or expired, and when Conman never
/// answers the hello (the handshake deadline).
#[test]
fn wss_conman_relays_and_refuses_bad_certificates() {
    let pki = Pki::new();
    let good = tls_conman(&pki, "eval.test", None);
    let port = good.local_addr.port();
    for url in [
        format!("wss://localhost:{port}/conman"),
        format!("wss://127.0.0.1:{port}/conman"),
    ] {
        let proxy = proxy_to_wss(&pki, &url, "ca.pem", None, "");
        echo_through(&proxy);
        assert_eq!(proxy.metric("eval_sessions_established_total", &[]), 1.0);
        let timed = proxy.metric(
            "eval_setup_duration_seconds_count",
            &["stage=\"conman_tls\""],
        );
        assert_eq!(timed, 1.0, "{url}");
    }
    let proxy = proxy_to_wss(
        &pki,
        &format!("wss://127.0.0.1:{port}/"),
        "other-ca.pem",
        None,
        "",
    );
    fails_with(&proxy, "unknown_ca");
    for (name, reason) in [("other.test", "wrong_name"), ("expired.test", "expired")] {
        let conman = tls_conman(&pki, name, None);
        let url = format!("wss://127.0.0.1:{}/", conman.local_addr.port());
        fails_with(&proxy_to_wss(&pki, &url, "ca.pem", None, ""), reason);
    }
    // Reads the hello and never answers.
    let silent = fake_conman(eval_proxy::dev::conman::Behavior {
        stall_before_101: true,
        ..Default::default()
    });
    let url = format!("wss://127.0.0.1:{}/", silent.local_addr.port());
    fails_with(&proxy_to_wss(&pki, &url, "ca.pem", None, ""), "timeout");
}

/// A Conman that requires a client certificate from the test CA: the
/// proxy with `conman.tls.cert` gets through; without one, or with one
/// another CA signed, the attempt fails as `conman_tls`.
#[test]
fn mtls_to_conman() {
    let pki = Pki::new();
    let conman = tls_conman(&pki, "eval.test", Some("ca.pem"));
    let url = format!("wss://localhost:{}/", conman.local_addr.port());
    echo_through(&proxy_to_wss(&pki, &url, "ca.pem", Some("client.test"), ""));
    fails_with(
        &proxy_to_wss(&pki, &url, "ca.pem", None, ""),
        "client_cert_refused",
    );
    fails_with(
        &proxy_to_wss(&pki, &url, "ca.pem", Some("stranger.test"), ""),
        "client_cert_refused",
    );
}

/// `eval-proxy --check` on `config`: refused (exit 2); its stderr.
fn check_refuses(config: &str) -> String {
    let dir = tempdir::Dir::new("check");
    let cfg = dir.path().join("eval.toml");
    std::fs::write(&cfg, config).unwrap();
    let out = run(
        Command::new(bin()).arg("--config").arg(&cfg).arg("--check"),
        "eval-proxy --check",
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `wss://` without `conman.tls.ca_file`, or with one holding no CA, is a
/// config error naming the key.
#[test]
fn wss_conman_without_a_ca_is_a_config_error() {
    let wss = "[token]\nallow_dev_key = true\n[placement]\ndefault = \"wss://127.0.0.1:1/\"\n";
    let err = check_refuses(wss);
    assert!(
        err.contains("placement.default") && err.contains("conman.tls.ca_file"),
        "{err}"
    );
    let dir = tempdir::Dir::new("empty-ca");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let err = check_refuses(&format!("{wss}[conman.tls]\nca_file = {empty:?}\n"));
    assert!(
        err.contains("conman.tls") && err.contains("no CA certificate"),
        "{err}"
    );
}

// ---- client certificates ------------------------------------------------

/// What the TLS listener does with a client presenting `cert` (a leaf of
/// [`Pki`], or none): "answer HTTP/1.1 200 OK" from `/healthz`, or
/// "refused REASON" with Python's reason for the failed TLS connection.
fn healthz_with_client_cert(proxy: &Proxy, pki: &Pki, cert: Option<&str>) -> String {
    let script = r#"
import socket, ssl, sys
port, ca, cert = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
if cert != "-":
    ctx.load_cert_chain(cert + ".pem", cert + ".key")
try:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="eval.test") as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: eval.test\r\n\r\n")
            data = s.recv(4096)
            print("answer", data.split(b"\r\n")[0].decode())
except ssl.SSLError as e:
    print("refused", e.reason)
"#;
    let cert = cert.map_or("-".to_string(), |c| pki.path(c).display().to_string());
    run_ok(
        Command::new("python3").args([
            "-c",
            script,
            &proxy.listen.port().to_string(),
            &pki.ca(),
            &cert,
        ]),
        "client certificate script",
    )
    .trim()
    .to_string()
}

/// The `client_cert` of the access lines logged so far.
fn logged_client_certs(proxy: &Proxy) -> Vec<String> {
    proxy
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "eval_proxy::access")
        .map(|v| {
            v["fields"]["client_cert"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect()
}

/// `tls.client_ca`: a client certificate the CA signed is verified and its
/// subject logged; `optional` lets a client without one in, `required`
/// refuses it, and one signed by another CA is refused either way
/// (counted as `reason="tls_client_cert"`).
#[test]
fn client_certificates_are_verified_and_logged() {
    let pki = Pki::new();
    let conman = echo_conman();
    for mode in ["optional", "required"] {
        let cfg = pki.config(10_000).replacen(
            "[tls]\n",
            &format!(
                "[log]\nformat = \"json\"\n[tls]\nclient_ca = {:?}\nclient_auth = {mode:?}\n",
                pki.path("ca.pem")
            ),
            1,
        );
        let proxy = Proxy::start_logged(&config_for(conman.local_addr, &cfg), &["--shards", "1"]);
        let url = wss(&proxy, &dev_token("r1"));
        let client = |cert: &str| {
            py_client()
                .args(["--cafile", &pki.ca(), "--binary-size", "1000"])
                .args([
                    "--certfile",
                    &pki.path(&format!("{cert}.pem")).display().to_string(),
                ])
                .args([
                    "--keyfile",
                    &pki.path(&format!("{cert}.key")).display().to_string(),
                ])
                .arg(&url)
                .output()
                .unwrap()
        };
        let out = client("client.test");
        assert!(out.status.success(), "{mode}: {out:?}");
        assert_eq!(
            healthz_with_client_cert(&proxy, &pki, Some("client.test")),
            "answer HTTP/1.1 200 OK"
        );
        let refused = healthz_with_client_cert(&proxy, &pki, Some("stranger.test"));
        assert_eq!(refused, "refused TLSV1_ALERT_UNKNOWN_CA", "{mode}");
        let none = healthz_with_client_cert(&proxy, &pki, None);
        let mut want_refused = 1.0;
        if mode == "optional" {
            assert_eq!(none, "answer HTTP/1.1 200 OK");
            run_ok(
                py_client().args(["--cafile", &pki.ca(), "--binary-size", "1000", &url]),
                "py_client without a certificate",
            );
        } else {
            assert_eq!(none, "refused TLSV13_ALERT_CERTIFICATE_REQUIRED");
            want_refused = 2.0;
        }
        wait_until("the refusals counted", WAIT, || {
            tls_failures(&proxy, "tls_client_cert") == want_refused
        });
        let sessions = if mode == "optional" { 2 } else { 1 };
        wait_until("the access lines", WAIT, || {
            logged_client_certs(&proxy).len() == sessions
        });
        let mut logged = logged_client_certs(&proxy);
        logged.sort();
        let want: &[&str] = if mode == "optional" {
            &["", "client.test"]
        } else {
            &["client.test"]
        };
        assert_eq!(logged, want, "{mode}");
    }
}

// ---- certificate files reload -------------------------------------------

/// A certificate's files rewritten in place load without a SIGHUP: new
/// handshakes get the new certificate, a session opened before goes on,
/// and a key that does not match its certificate is refused (logged why,
/// counted) while the last good pair keeps serving.
#[test]
fn certificate_files_reload_when_they_change() {
    let pki = Pki::new();
    let conman = echo_conman();
    let dir = tempdir::Dir::new("tls-files");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let install = |name: &str, key_of: &str| {
        std::fs::copy(pki.path(&format!("{key_of}.key")), &key).unwrap();
        std::fs::copy(pki.path(&format!("{name}.pem")), &cert).unwrap();
    };
    install("other.test", "other.test");
    let tls =
        format!("[tls]\n[[tls.certs]]\ncert = {cert:?}\nkey = {key:?}\nnames = [\"eval.test\"]\n");
    let proxy = Proxy::start_captured(&config_for(conman.local_addr, &tls), &["--shards", "1"]);
    let subject = |proxy: &Proxy| served_subject(proxy, &pki);
    assert_eq!(subject(&proxy), "subject=CN = other.test");

    // A session that lives across the reloads.
    let script = r#"
import asyncio, ssl, sys, websockets
async def main(url, ca):
    ctx = ssl.create_default_context(cafile=ca)
    async with websockets.connect(url, ssl=ctx, server_hostname="other.test") as ws:
        await ws.send("one")
        assert await ws.recv() == "one"
        print("open", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await ws.send("two")
        assert await ws.recv() == "two"
        print("still open", flush=True)
asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;
    let mut live = Command::new("python3")
        .args(["-c", script, &wss(&proxy, &dev_token("r1")), &pki.ca()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = std::io::BufReader::new(live.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "open");

    install("eval.test", "eval.test");
    wait_until("the new certificate served", WAIT, || {
        subject(&proxy) == "subject=CN = eval.test"
    });
    assert_eq!(proxy.metric("eval_config_reloads_total", &[]), 1.0);

    install("eval.test", "other.test");
    wait_until("a refused certificate reload", WAIT, || {
        proxy.metric("eval_config_reload_failures_total", &[]) == 1.0
    });
    assert_eq!(subject(&proxy), "subject=CN = eval.test");
    assert!(proxy.log().contains("does not match"), "{}", proxy.log());
    assert_eq!(proxy.metric("eval_config_reloads_total", &[]), 1.0);

    live.stdin.take().unwrap().write_all(b"\n").unwrap();
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "still open");
    assert!(live.wait().unwrap().success());
}

/// A Controlplane answer naming `wss://`: relayed with `conman.tls.ca_file`
/// (the Conman side verified by name, as for a static VM); without it the
/// attempt fails as `conman_tls`/`no_ca`, and the client hears it.
#[test]
fn wss_conman_from_the_controlplane() {
    use eval_proxy::dev::controlplane::{self, FakeControlplaneConfig};
    let pki = Pki::new();
    let conman = tls_conman(&pki, "eval.test", None);
    let cp = controlplane::spawn(FakeControlplaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        conmans: vec![(
            "vm-tls".into(),
            format!("wss://localhost:{}/", conman.local_addr.port()),
        )],
        ttl_ms: 60_000,
        pins: Vec::new(),
    })
    .expect("fake controlplane");
    let base = format!(
        "[token]\nallow_dev_key = true\n[limits]\nmax_attempts = 1\n[placement]\nmode = \"controlplane\"\n[controlplane]\nurls = [\"http://{}\"]\n",
        cp.local_addr
    );
    let with_ca = format!("{base}[conman.tls]\nca_file = {:?}\n", pki.path("ca.pem"));
    echo_through(&Proxy::start(&with_ca, &["--shards", "1"]));
    fails_with(&Proxy::start(&base, &["--shards", "1"]), "no_ca");
}

/// A client that updates its keys mid-session, asking the proxy to update
/// its own each time, keeps relaying: after the handshake the proxy seals
/// and opens records itself (`proto::tls_record`), and must follow the
/// client's new keys and answer with its own KeyUpdate before its next
/// record. rustls as the client: the only one here that can send one.
#[test]
fn key_updates_mid_session_keep_relaying_both_ways() {
    let pki = Pki::new();
    let (_conman, proxy) = tls_proxy(&pki, "1");
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(pki.ca()).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "eval.test".try_into().unwrap())
            .unwrap();
    let tcp = TcpStream::connect(proxy.listen).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    write!(
        s,
        "GET /wsv2/{} HTTP/1.1\r\nHost: eval.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        dev_token("r1")
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("the 101");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    for round in 0..4 {
        let msg = format!("round {round}, {}", "x".repeat(round * 20_000));
        s.write_all(&frame(true, 1, msg.as_bytes(), Some([1, 2, 3, 4])))
            .unwrap();
        let (_, op, p) = read_frame(&mut s);
        assert_eq!((op, p.len()), (1, msg.len()), "round {round}");
        assert!(p == msg.as_bytes(), "round {round}: the echo differs");
        s.conn.refresh_traffic_keys().unwrap();
    }
}
