//! Shared harness for whole-process tests: the real `eval-proxy` binary on
//! port 0, waited for by its readiness line; fake Conmans on real sockets;
//! tungstenite clients.
#![allow(dead_code)]

mod refusing;
#[allow(unused_imports)] // not every test binary refuses
pub use refusing::{refusing_addr, RefusingAddr};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eval_proxy::dev::conman::{self, Behavior, ConmanConfig, ConmanHandle};
use eval_proxy::token::{self, Claims};
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::WebSocket;

pub const WAIT: Duration = Duration::from_secs(20);

/// The binary under test: this build's, or `EVAL_PROXY_BIN` (e.g. a
/// release build for a long stress run).
pub fn bin() -> PathBuf {
    std::env::var_os("EVAL_PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_eval-proxy")))
}

/// `eval-loadgen`, built beside the proxy: `cargo test --workspace` builds
/// it for its own tests; a lone `cargo test --test NAME` builds it here when
/// it is missing or older than its sources. (Only then: a nested cargo would
/// wait on the lock the outer `cargo test` holds.)
pub fn loadgen() -> PathBuf {
    let path = bin().with_file_name("eval-loadgen");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("loadgen/src");
    let newest_src = std::fs::read_dir(&src)
        .into_iter()
        .flatten()
        .filter_map(|e| modified(&e.ok()?.path()))
        .max();
    if modified(&path).is_none_or(|built| newest_src.is_some_and(|s| s > built)) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-q", "-p", "eval-loadgen"])
            .status()
            .expect("cargo build -p eval-loadgen");
        assert!(ok.success(), "building eval-loadgen failed");
    }
    path
}

/// A child process that printed `listening WHERE` as its first stdout
/// line (`eval-loadgen echo-server`, the Autobahn echo server); killed
/// when dropped.
pub struct Listening {
    pub child: Child,
    /// What followed `listening `: an address or a port.
    pub at: String,
}

impl Listening {
    pub fn start(cmd: &mut Command) -> Listening {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the `listening` line");
        let at = match line.trim().strip_prefix("listening ") {
            Some(at) => at.to_owned(),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} printed {line:?}, not `listening ...`");
            }
        };
        Listening { child, at }
    }

    /// `eval-loadgen echo-server` on a free loopback port.
    pub fn echo_server() -> Listening {
        Listening::start(Command::new(loadgen()).args(["echo-server", "--listen", "127.0.0.1:0"]))
    }

    pub fn addr(&self) -> SocketAddr {
        self.at
            .parse()
            .unwrap_or_else(|_| panic!("not an address: {:?}", self.at))
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Proxy {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// Lines printed on stdout before the ready line (e.g. the --dev URL).
    pub banner: Vec<String>,
    _stdout: mpsc::Receiver<String>,
    pub dir: tempdir::Dir,
}

pub mod tempdir {
    use std::path::{Path, PathBuf};
    /// A scratch directory removed on drop.
    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "eval-proxy-test-{tag}-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            std::fs::create_dir_all(&p).expect("create temp dir");
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }
}

impl Proxy {
    /// Starts the proxy with a config (TOML text) plus extra flags, on
    /// loopback port 0, and waits for its readiness line.
    pub fn start(config: &str, args: &[&str]) -> Proxy {
        Self::start_inner(config, args, None)
    }

    /// Like `start`, with debug logs written to `self.log_path()`.
    pub fn start_logged(config: &str, args: &[&str]) -> Proxy {
        Self::start_inner(config, args, Some("debug"))
    }

    /// Like `start`, with stderr (at the usual level) written to
    /// `self.log_path()`, for tests that read it afterwards.
    pub fn start_captured(config: &str, args: &[&str]) -> Proxy {
        let level = std::env::var("EVAL_TEST_LOG").unwrap_or_else(|_| "warn".into());
        Self::start_inner(config, args, Some(&level))
    }

    /// The captured stderr so far (empty unless started with a log file).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("stderr.log")
    }

    /// `log_level`: write stderr to `self.log_path()` at this level.
    fn start_inner(config: &str, args: &[&str], log_level: Option<&str>) -> Proxy {
        let dir = tempdir::Dir::new("proxy");
        let cfg_path = dir.path().join("eval.toml");
        std::fs::write(&cfg_path, config).expect("write config");
        let mut cmd = Command::new(bin());
        cmd.arg("--config")
            .arg(&cfg_path)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("EVAL_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(level) = log_level {
            let f = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
            cmd.env("RUST_LOG", level).stderr(f);
        }
        Self::spawn(cmd, dir)
    }

    pub fn spawn(mut cmd: Command, dir: tempdir::Dir) -> Proxy {
        let mut child = cmd.spawn().expect("spawn eval-proxy");
        let stdout = child.stdout.take().expect("stdout");
        let rx = lines(stdout);
        let mut banner = Vec::new();
        loop {
            let line = match rx.recv_timeout(WAIT) {
                Ok(l) => l,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("eval-proxy printed no ready line (banner so far: {banner:?})");
                }
            };
            if let Some(rest) = line.strip_prefix("eval-proxy ready ") {
                let mut listen = None;
                let mut admin = None;
                for kv in rest.split_whitespace() {
                    if let Some(v) = kv.strip_prefix("listen=") {
                        listen = v.parse().ok();
                    } else if let Some(v) = kv.strip_prefix("admin=") {
                        admin = v.parse().ok();
                    }
                }
                return Proxy {
                    child,
                    listen: listen.expect("listen= in ready line"),
                    admin,
                    banner,
                    _stdout: rx,
                    dir,
                };
            }
            banner.push(line);
        }
    }

    /// The next line the process (or a child sharing its stdout) prints.
    pub fn next_line(&self, within: Duration) -> Option<String> {
        self._stdout.recv_timeout(within).ok()
    }

    pub fn url(&self, token: &str) -> String {
        format!("ws://{}/wsv2/{token}", self.listen)
    }

    /// GET on the admin listener; returns (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http(self.admin.expect("admin enabled"), "GET", path)
    }

    pub fn metrics(&self) -> String {
        self.admin_get("/metrics").1
    }

    /// Sum of the samples of a metric whose labels contain every `want`.
    pub fn metric(&self, name: &str, want: &[&str]) -> f64 {
        metric_value(&self.metrics(), name, want)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit; panics if it takes longer than `WAIT`.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(std::time::Instant::now() < deadline, "proxy did not exit");
            std::thread::park_timeout(Duration::from_millis(20));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub fn metric_value(text: &str, name: &str, want: &[&str]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((key, val)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = match key.find('{') {
            Some(i) => (&key[..i], &key[i..]),
            None => (key, ""),
        };
        if n == name && want.iter().all(|w| labels.contains(w)) {
            sum += val.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

/// A minimal HTTP/1.1 request with `Connection: close`.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_body(addr, method, path, "")
}

/// [`http`] with a JSON body (none if empty).
pub fn http_body(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let length = if body.is_empty() {
        String::new()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{length}\r\n{body}"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// Sends raw bytes, half-closes nothing, reads until the server closes or
/// the timeout passes; returns everything read.
pub fn raw_exchange(addr: SocketAddr, req: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect proxy");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(req).expect("write request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

pub fn status_of(resp: &[u8]) -> u16 {
    std::str::from_utf8(&resp[..resp.len().min(64)])
        .ok()
        .and_then(|t| t.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// An address with nothing listening: connecting to it is refused.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn claims(repl: &str) -> Claims {
    Claims {
        repl: repl.into(),
        user: "alice".into(),
        cluster: "dev".into(),
        exp: unix_now() + 3600,
        nbf: unix_now() - 60,
        jti: "t1".into(),
    }
}

pub fn dev_token(repl: &str) -> String {
    token::mint(&claims(repl), token::DEV_KID, &token::dev_signing_key())
}

pub fn fake_conman(behavior: Behavior) -> ConmanHandle {
    conman::spawn(ConmanConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        behavior,
    })
    .expect("spawn fake conman")
}

pub fn echo_conman() -> ConmanHandle {
    fake_conman(Behavior {
        vm_id: "vm-1".into(),
        ..Default::default()
    })
}

/// A fake Controlplane placing repls on these (VM id, Conman address)
/// pairs, placements cached for a minute.
pub fn controlplane_with(
    conmans: &[(&str, SocketAddr)],
) -> eval_proxy::dev::controlplane::FakeControlplane {
    use eval_proxy::dev::controlplane::{spawn, FakeControlplaneConfig};
    spawn(FakeControlplaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        conmans: conmans
            .iter()
            .map(|(vm, a)| (vm.to_string(), format!("ws://{a}/")))
            .collect(),
        ttl_ms: 60_000,
        pins: Vec::new(),
    })
    .expect("fake controlplane")
}

/// A config for the proxy in front of one Conman, dev key trusted.
pub fn config_for(conman: SocketAddr, extra: &str) -> String {
    format!(
        "[token]\nallow_dev_key = true\n\n[placement]\ndefault = \"ws://{conman}/conman\"\n\n{extra}\n"
    )
}

pub type Client = WebSocket<MaybeTlsStream<TcpStream>>;

pub fn connect(url: &str) -> Client {
    let req = url.into_client_request().expect("request");
    let (ws, resp) = tungstenite::connect(req).expect("websocket connect through proxy");
    assert_eq!(resp.status().as_u16(), 101);
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(WAIT)).unwrap();
    }
    ws
}

/// A raw TCP WebSocket client: does the upgrade by hand and then exposes
/// the socket, so tests can send exactly the bytes they mean.
pub fn raw_client(proxy: SocketAddr, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).expect("connect proxy");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET /wsv2/{token} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected 101, got {head:?}"
    );
    assert!(
        head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "accept: {head}"
    );
    s
}

/// Reads an HTTP head byte by byte (so no frame bytes are consumed).
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).expect("read head");
        assert!(
            n == 1,
            "eof inside head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    String::from_utf8(head).expect("utf8 head")
}

/// A frame as bytes; `mask` set for client-to-server frames.
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads one whole frame: (fin, opcode, payload unmasked).
pub fn read_frame(s: &mut impl Read) -> (bool, u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("frame header");
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).unwrap();
        len = u64::from_be_bytes(b);
    }
    let mask = if h[1] & 0x80 != 0 {
        let mut k = [0u8; 4];
        s.read_exact(&mut k).unwrap();
        Some(k)
    } else {
        None
    };
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).expect("frame payload");
    if let Some(k) = mask {
        for (i, b) in p.iter_mut().enumerate() {
            *b ^= k[i % 4];
        }
    }
    (h[0] & 0x80 != 0, h[0] & 0x0f, p)
}

/// Reads past data frames to the peer's Close, answers it (tungstenite
/// queues the reply; the flush sends it) and closes the socket, so the proxy
/// sees a complete closing handshake instead of lingering until its
/// timeout. Returns (code, reason).
pub fn ws_close(mut ws: Client) -> (u16, String) {
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => {
                let _ = ws.flush();
                return (u16::from(f.code), f.reason.into_owned());
            }
            Ok(_) => continue,
            Err(e) => panic!("expected a Close frame: {e}"),
        }
    }
}

/// Reads frames until a Close; returns its (code, reason).
pub fn read_close(s: &mut TcpStream) -> (u16, String) {
    loop {
        let (_, op, p) = read_frame(s);
        if op == 8 {
            assert!(p.len() >= 2, "close without code");
            let code = u16::from_be_bytes([p[0], p[1]]);
            return (
                code,
                String::from_utf8(p[2..].to_vec()).expect("utf8 reason"),
            );
        }
    }
}

/// A raw Conman for one connection: answers the upgrade by hand and hands
/// the socket (and the request head) to `f` on its own thread.
pub fn raw_conman<F, T>(f: F) -> (SocketAddr, std::thread::JoinHandle<T>)
where
    F: FnOnce(TcpStream, String) -> T + Send + 'static,
    T: Send + 'static,
{
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("conman accept");
        s.set_read_timeout(Some(WAIT)).unwrap();
        let head = read_head(&mut s);
        let key = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| v.trim().to_string())
            })
            .expect("key header");
        let accept = eval_proxy::proto::handshake::accept_key(&key);
        write!(
            s,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .unwrap();
        f(s, head)
    });
    (addr, h)
}

/// Polls `cond` until it holds; panics naming `what` after `within`.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Open descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// How one connect-upgrade-echo attempt went (`try_echo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// 101, then one message echoed back.
    Served,
    /// connect(2) was refused: nobody listens (a clean answer).
    Refused,
    /// Anything else: connected, then reset, cut, or left hanging.
    Broken(String),
}

/// Connects, upgrades, echoes one message through the proxy and closes,
/// within `timeout` per step; never panics, so a load loop can count.
pub fn try_echo(addr: SocketAddr, token: &str, timeout: Duration) -> Attempt {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Attempt::Refused,
        Err(e) => return Attempt::Broken(format!("connect: {e}")),
    };
    let mut step = || -> std::io::Result<()> {
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET /wsv2/{token} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b)? == 0 {
                return Err(std::io::Error::other(format!(
                    "eof in head {:?}",
                    String::from_utf8_lossy(&head)
                )));
            }
            head.push(b[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(std::io::Error::other(format!(
                "not a 101: {:?}",
                String::from_utf8_lossy(&head)
            )));
        }
        s.write_all(&frame(true, 1, b"ping", Some([1, 2, 3, 4])))?;
        let mut h = [0u8; 6];
        s.read_exact(&mut h)?;
        if h != [0x81, 4, b'p', b'i', b'n', b'g'] {
            return Err(std::io::Error::other(format!("not the echo: {h:?}")));
        }
        s.write_all(&frame(true, 8, &1000u16.to_be_bytes(), Some([1, 2, 3, 4])))?;
        Ok(())
    };
    match step() {
        Ok(()) => Attempt::Served,
        Err(e) => Attempt::Broken(e.to_string()),
    }
}
