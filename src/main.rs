//! `eval-proxy`: parse flags, build the config, hand it to the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use eval_proxy::config::{Config, LogFormat};
use eval_proxy::token::{self, Claims};

/// io_uring thread-per-core reverse WebSocket proxy between users' clients
/// and Conman.
///
/// Clients connect with `GET /wsv2/<token>` (or `?token=`, or
/// `Authorization: Bearer`); the proxy verifies the PASETO v4.public token,
/// finds the repl's Conman, and relays frames both ways unchanged. Every
/// option of the TOML config is documented in README.md; the flags below
/// override the file.
/// `--version` names the crypto provider: the benchmark checks it, since
/// the `aws-lc` feature builds a binary that looks the same otherwise.
const VERSION: &str = if cfg!(feature = "aws-lc") {
    concat!(env!("CARGO_PKG_VERSION"), " (TLS: aws-lc-rs)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (TLS: ring)")
};

#[derive(Parser, Debug)]
#[command(
    name = "eval-proxy",
    version = VERSION,
    after_help = "Exit codes: 0 clean exit (after a drain), 1 runtime failure, 2 bad flags or config \
                  (also: the address is served by a running proxy, or --takeover was refused).\n\
                  Signals: SIGTERM/SIGINT drain (a second one ends the grace period), SIGHUP reloads the \
                  config and token keys, SIGUSR2 upgrades in place (starts the binary on disk with --takeover).\n\
                  Upgrade: start the new binary with --takeover and the same config.\n\
                  systemd socket activation (LISTEN_FDS) is used when present.\n\
                  Quick start: eval-proxy --dev"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// TOML config file (see README.md "Configuration").
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Public WebSocket listener (config: listen.addr; default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Default Conman URL, ws://host:port/path (config: placement.default).
    #[arg(long, value_name = "URL")]
    conman: Option<String>,
    /// Data shards, one pinned thread each; 0 = one per core (config: listen.shards).
    #[arg(long, value_name = "N")]
    shards: Option<usize>,
    /// Admin listener: /metrics, /healthz, /readyz, POST /drain, the session registry
    /// (/sessions, /vms) (config: admin.addr; default 127.0.0.1:9090). Off loopback it
    /// needs admin.token_file: every request then carries `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Do not start the admin listener.
    #[arg(long)]
    no_admin: bool,
    /// Directory of `<kid>.pub` token keys (config: token.keys_dir).
    #[arg(long, value_name = "DIR")]
    keys_dir: Option<PathBuf>,
    /// Log format (config: log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Development mode: embedded fake Conman (echo), the public dev token
    /// key, loopback listeners; prints a ready-to-use ws:// URL.
    #[arg(long)]
    dev: bool,
    /// With --dev: TLS with a throwaway CA and certificate; prints a wss://
    /// URL and the CA file to trust.
    #[arg(long, requires = "dev")]
    tls: bool,
    /// Validate the config and exit.
    #[arg(long)]
    check: bool,
    /// Zero-downtime upgrade: take the listening sockets over from the
    /// proxy running with this config (through lifecycle.handover_socket),
    /// start on them, print `ready`, then tell the old process to drain.
    /// Exit 2 if its config is incompatible (listen.addr, listen.shards);
    /// a normal start if no old process answers.
    #[arg(long)]
    takeover: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Token keys and tokens for operators, tests and demos.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Checks this host against a tuning profile and prints each finding
    /// with the line that fixes it.
    ///
    /// Reads /proc only: the kernel version, io_uring (not disabled by
    /// kernel.io_uring_disabled, and a ring set up as a data shard sets it up),
    /// open-file and locked-memory limits (a running eval-proxy's, else this
    /// process's) against the sessions the config or profile is sized for,
    /// net.core.somaxconn against listen.backlog, net.ipv4.tcp_migrate_req,
    /// and every sysctl of the profile (ports, keepalive, buffers, ...).
    /// Exit 0 when all is well, 1 when something is off, 2 on bad flags, an
    /// unknown profile or a bad config.
    Doctor {
        /// A built-in profile (eval-proxy, loopback-bench: tuning/*.conf) or a sysctl file.
        #[arg(long, value_name = "NAME", default_value = eval_proxy::doctor::DEFAULT_PROFILE)]
        profile: String,
        /// The config whose listen.backlog, listen.shards and
        /// limits.max_sessions_per_shard are checked (default: built-in defaults).
        #[arg(long, short = 'c', value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCmd {
    /// Writes a new Ed25519 key pair: DIR/KID.secret and DIR/KID.pub.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value = "k1")]
        kid: String,
    },
    /// Prints a signed v4.public token.
    Mint {
        /// Secret key file written by `keygen` (its kid is the file stem).
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "dev",
            conflicts_with = "dev"
        )]
        key: Option<PathBuf>,
        /// Sign with the public, insecure dev key (kid "dev").
        #[arg(long)]
        dev: bool,
        #[arg(long)]
        repl: String,
        #[arg(long, default_value = "dev-user")]
        user: String,
        #[arg(long, default_value = "dev")]
        cluster: String,
        /// Lifetime, e.g. 90s, 30m, 1h, 2d; negative values (e.g. -1h) mint expired tokens for tests.
        #[arg(long, default_value = "1h", allow_hyphen_values = true, value_parser = parse_duration_s)]
        ttl: i64,
        /// Not-before offset from now (e.g. 10m mints a token valid only later).
        #[arg(long, default_value = "0s", allow_hyphen_values = true, value_parser = parse_duration_s)]
        nbf: i64,
        #[arg(long)]
        jti: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Some(Cmd::Doctor { profile, config }) = &cli.cmd {
        return doctor_cmd(profile, config.as_ref().or(cli.config.as_ref()));
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<ConfigFault>().is_some() {
                2
            } else {
                1
            };
            eprintln!("eval-proxy: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Marks errors that are the operator's config or flags (exit 2).
#[derive(Debug)]
struct ConfigFault(String);
impl std::fmt::Display for ConfigFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for ConfigFault {}

/// Keeps freed heap memory for reuse while traffic flows. By default glibc
/// hands the top of a shard's arena back to the kernel whenever 128 KiB of
/// it is free, and serves blocks of 128 KiB and more with their own mmap:
/// relaying over TLS, which allocates and frees a sealed or decrypted block
/// per send, then paid page faults and TLB flushes on every few sends
/// (110,000 faults in 4 s of bulk TLS). The shards give the heap back with
/// `malloc_trim` once they are idle, so memory at rest is unchanged.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt takes plain integers; called before any shard thread
    // starts, so no allocation races with the change.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Some(Cmd::Token { cmd }) => return token_cmd(cmd),
        Some(Cmd::Doctor { .. }) => unreachable!("handled in main"),
        None => {}
    }
    tune_malloc();
    let overrides = Overrides {
        config: cli.config.clone(),
        dev: cli.dev,
        listen: cli.listen,
        conman: cli.conman.clone(),
        shards: cli.shards,
        admin: cli.admin,
        no_admin: cli.no_admin,
        keys_dir: cli.keys_dir.clone(),
        log_format: cli.log_format,
        dev_conman: None,
        dev_tls_cert: None,
    };
    let mut cfg = overrides.load_unvalidated().map_err(ConfigFault)?;
    // Before any thread starts (the --dev fake Conman below, then everything
    // `run` spawns): a thread that does not block these would take a
    // SIGTERM with the default action and kill the process without a drain.
    eval_proxy::server::block_signals();
    let mut dev_conman = None;
    let mut overrides = overrides;
    if cli.dev && cfg.placement.default.is_none() && cli.conman.is_none() {
        let h = eval_proxy::dev::conman::spawn(eval_proxy::dev::conman::ConmanConfig {
            listen: "127.0.0.1:0".parse().expect("literal"),
            behavior: eval_proxy::dev::conman::Behavior {
                vm_id: "dev-vm".into(),
                ..Default::default()
            },
        })
        .context("starting the embedded fake Conman")?;
        let url = format!("ws://{}/", h.local_addr);
        cfg.placement.default = Some(url.clone());
        overrides.dev_conman = Some(url);
        dev_conman = Some(h);
    }
    // Removed when the proxy exits: the certificate is for this run only.
    let mut dev_tls = None;
    if cli.tls {
        let dir = std::env::temp_dir().join(format!("eval-proxy-dev-tls-{}", std::process::id()));
        let made = eval_proxy::dev::tls::generate(&dir).map_err(anyhow::Error::msg)?;
        cfg.tls.certs.insert(0, made.cert.clone());
        overrides.dev_tls_cert = Some(made.cert);
        dev_tls = Some((dir, made.ca));
    }
    cfg.validate().map_err(|e| ConfigFault(e.to_string()))?;
    cfg.load_tls().map_err(|e| ConfigFault(e.to_string()))?;
    if cli.check {
        eval_proxy::server::load_keys(&cfg).map_err(|e| ConfigFault(e.to_string()))?;
        cfg.admin_token().map_err(|e| ConfigFault(e.to_string()))?;
        println!("config ok");
        return Ok(());
    }
    let set_log_level = init_logging(&cfg);
    let dev = cli.dev;
    let dev_ca = dev_tls.as_ref().map(|(_, ca)| ca.clone());
    let opts = eval_proxy::server::StartOptions {
        takeover: cli.takeover,
        reload: Some(Box::new(move || overrides.load())),
        set_log_level,
    };
    eval_proxy::server::run_with(cfg, opts, |b| {
        let mut out = std::io::stdout().lock();
        if dev {
            let claims = Claims {
                repl: "dev-repl".into(),
                user: "dev-user".into(),
                cluster: "dev".into(),
                exp: unix_now() + 24 * 3600,
                nbf: unix_now() - 60,
                jti: "dev".into(),
            };
            let t = token::mint(&claims, token::DEV_KID, &token::dev_signing_key());
            match &dev_ca {
                Some(ca) => {
                    let _ = writeln!(
                        out,
                        "eval-proxy --dev --tls: trust the CA in {} (it signed a certificate for localhost, 127.0.0.1, ::1)",
                        ca.display()
                    );
                    let _ = writeln!(
                        out,
                        "eval-proxy --dev: paste into any WebSocket client: wss://{}/wsv2/{t}",
                        b.listen
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "eval-proxy --dev: paste into any WebSocket client: ws://{}/wsv2/{t}",
                        b.listen
                    );
                }
            }
        }
        let admin = b.admin.map_or("off".to_string(), |a| a.to_string());
        let _ = writeln!(
            out,
            "eval-proxy ready listen={} admin={admin} shards={}",
            b.listen, b.shards
        );
        let _ = out.flush();
    })
    .map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidInput {
            anyhow::Error::new(ConfigFault(e.to_string()))
        } else {
            anyhow::Error::new(e)
        }
    })?;
    drop(dev_conman);
    if let Some((dir, _)) = dev_tls {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// The flags that override the config file, kept so that a SIGHUP reload
/// builds the config exactly as the start did.
#[derive(Clone)]
struct Overrides {
    config: Option<PathBuf>,
    dev: bool,
    listen: Option<SocketAddr>,
    conman: Option<String>,
    shards: Option<usize>,
    admin: Option<SocketAddr>,
    no_admin: bool,
    keys_dir: Option<PathBuf>,
    log_format: Option<LogFormatArg>,
    /// `--dev`'s embedded fake Conman, once started.
    dev_conman: Option<String>,
    /// `--dev --tls`'s throwaway certificate, once made.
    dev_tls_cert: Option<eval_proxy::config::TlsCert>,
}

impl Overrides {
    /// The file, then `--dev`, then the flags; validated, certificates
    /// loaded (so a reload also reloads them: a bad one refuses the reload).
    fn load(&self) -> Result<Config, String> {
        let mut cfg = self.load_unvalidated()?;
        cfg.validate().map_err(|e| e.to_string())?;
        cfg.load_tls().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// The same before `--dev` may add its embedded Conman.
    fn load_unvalidated(&self) -> Result<Config, String> {
        let mut cfg = match &self.config {
            Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
            None => Config::default(),
        };
        if let Some(cert) = &self.dev_tls_cert {
            cfg.tls.certs.insert(0, cert.clone());
        }
        if self.dev {
            cfg.token.allow_dev_key = true;
            if self.listen.is_none() && self.config.is_none() {
                cfg.listen.addr = "127.0.0.1:8080".parse().expect("literal");
            }
            if cfg.placement.default.is_none() && self.conman.is_none() {
                cfg.placement.default = self.dev_conman.clone();
            }
        }
        if let Some(a) = self.listen {
            cfg.listen.addr = a;
        }
        if let Some(u) = &self.conman {
            cfg.placement.default = Some(u.clone());
        }
        if let Some(n) = self.shards {
            cfg.listen.shards = n;
        }
        if let Some(a) = self.admin {
            cfg.admin.addr = a;
        }
        if self.no_admin {
            cfg.admin.enabled = false;
        }
        if let Some(d) = &self.keys_dir {
            cfg.token.keys_dir = Some(d.clone());
        }
        if let Some(f) = self.log_format {
            cfg.log.format = match f {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
        Ok(cfg)
    }
}

/// Starts logging; returns how to change `log.level` on a reload, unless
/// `RUST_LOG` is set (it wins over the config, then and on reloads).
fn init_logging(cfg: &Config) -> Option<eval_proxy::server::LogLevelSetter> {
    let from_env = EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&cfg.log.level));
    // Colours only for a person at a terminal: escape codes in a log file
    // or a journal get in the way of every grep.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let set: eval_proxy::server::LogLevelSetter = match cfg.log.format {
        LogFormat::Json => {
            let b = b.json().with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |level| {
                let _ = h.reload(EnvFilter::new(level));
            })
        }
        LogFormat::Text => {
            let b = b.with_filter_reloading();
            let h = b.reload_handle();
            b.init();
            Box::new(move |level| {
                let _ = h.reload(EnvFilter::new(level));
            })
        }
    };
    (!fixed).then_some(set)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Parses `90s`, `30m`, `1h`, `2d`, with an optional leading `-`.
/// Seconds from `90s`, `30m`, `1h`, `2d` (or a bare number), possibly
/// negative. A clap value parser, so a bad value is a flag error (exit 2,
/// with the usage) like any other.
fn parse_duration_s(s: &str) -> Result<i64, String> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s),
    };
    let split = body
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(body.len());
    let (num, unit) = body.split_at(split);
    let n: i64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 1h, 2d)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("bad unit in {s:?} (use s, m, h, d)")),
    };
    let secs = n
        .checked_mul(mult)
        .filter(|v| *v < 1 << 40)
        .ok_or_else(|| format!("{s:?} is too long"))?;
    Ok(if neg { -secs } else { secs })
}

fn token_cmd(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Keygen { out, kid } => {
            if kid.is_empty() || kid.contains(['/', '.']) {
                return Err(ConfigFault(format!(
                    "--kid {kid:?}: must be non-empty, without '/' or '.'"
                ))
                .into());
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let sk = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
            let secret = out.join(format!("{kid}.secret"));
            let public = out.join(format!("{kid}.pub"));
            write_private(&secret, &token::encode_secret(&sk))?;
            std::fs::write(&public, token::encode_public(&sk.verifying_key()) + "\n")
                .with_context(|| format!("writing {}", public.display()))?;
            println!("{}\n{}", secret.display(), public.display());
            Ok(())
        }
        TokenCmd::Mint {
            key,
            dev,
            repl,
            user,
            cluster,
            ttl,
            nbf,
            jti,
        } => {
            let (kid, sk) = if dev {
                (token::DEV_KID.to_string(), token::dev_signing_key())
            } else {
                let path = key.expect("clap requires --key without --dev");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let sk = token::decode_secret(text.trim())
                    .map_err(|e| ConfigFault(format!("{}: {e}", path.display())))?;
                let kid = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("k1")
                    .to_string();
                (kid, sk)
            };
            let now = unix_now();
            let claims = Claims {
                repl,
                user,
                cluster,
                exp: now + ttl,
                nbf: now + nbf,
                jti: jti.unwrap_or_else(|| format!("{:016x}", rand::random::<u64>())),
            };
            println!("{}", token::mint(&claims, &kid, &sk));
            Ok(())
        }
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{text}").with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// `eval-proxy doctor`: the report on stdout; exit 1 when a finding is off,
/// 2 when the profile or config cannot be used.
fn doctor_cmd(profile: &str, config: Option<&PathBuf>) -> ExitCode {
    use eval_proxy::doctor::{self, Host, Needs, Profile, Verdict};
    let profile = match Profile::load(profile) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("eval-proxy doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = match config.map(|p| Config::from_file(p).and_then(|c| c.validate().map(|()| c))) {
        None => Config::default(),
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            eprintln!("eval-proxy doctor: {e}");
            return ExitCode::from(2);
        }
    };
    let needs = Needs::new(&cfg, &profile);
    let findings = doctor::check(&profile, &Host::read(&profile), &needs);
    print!("{}", doctor::render(&profile, &needs, &findings));
    if findings.iter().any(|f| f.verdict == Verdict::Off) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
