//! `eval-proxy doctor`: the live host against a tuning profile.
//!
//! # Layout
//! - [`Profile`]: a sysctl profile from `tuning/` (built in, or a file),
//!   with the session count it is sized for.
//! - [`Host`]: what was read from `/proc` (sysctls, the limits that apply,
//!   the kernel release) and whether an io_uring like a data shard's could be
//!   set up. [`Host::read`] is the only part that touches the system.
//! - [`check`]: pure judgement, host and needs in, [`Finding`]s out; each
//!   finding that is off carries the exact line that fixes it. The unit
//!   tests below feed made-up hosts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::config::Config;

/// The tuning profiles shipped in `tuning/`, by name.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("eval-proxy", include_str!("../tuning/eval-proxy.conf")),
    (
        "loopback-bench",
        include_str!("../tuning/loopback-bench.conf"),
    ),
];

/// The profile used when none is named.
pub const DEFAULT_PROFILE: &str = "eval-proxy";

/// Oldest kernel with everything a data shard's ring is set up with:
/// `IORING_SETUP_DEFER_TASKRUN` (6.1) is the newest of them.
pub const MIN_KERNEL: (u32, u32) = (6, 1);

/// The control shard's glommio executor refuses to start below this
/// (see `control` "Locked memory").
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// Descriptors beyond two per session: listeners, rings, eventfds, the
/// control socketpairs, admin connections, splice pipes in use, logs.
pub const FD_RESERVE: u64 = 1024;

/// `tcp_migrate_req = 1` moves a closing `SO_REUSEPORT` listener's queued
/// connections to a sibling (a shard ending its drain, the old process
/// after a handover) instead of resetting them. Checked even when the
/// profile does not set it.
const MIGRATE_REQ: &str = "net.ipv4.tcp_migrate_req";

const SOMAXCONN: &str = "net.core.somaxconn";
const NR_OPEN: &str = "fs.nr_open";
const FILE_MAX: &str = "fs.file-max";
const IO_URING_DISABLED: &str = "kernel.io_uring_disabled";

/// The marker line by which a profile states the sessions it is sized for.
const SESSIONS_MARKER: &str = "# eval-proxy doctor: sessions =";

/// A sysctl profile: `key = value` lines, and the session count it is
/// sized for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub sysctls: Vec<(String, String)>,
    pub sessions: Option<u64>,
}

impl Profile {
    /// A built-in profile by name, or else a profile file at that path.
    pub fn load(name_or_path: &str) -> Result<Profile, String> {
        if let Some((name, text)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            return Profile::parse(name, text);
        }
        let path = Path::new(name_or_path);
        let text = std::fs::read_to_string(path).map_err(|e| {
            let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
            format!(
                "--profile {name_or_path}: not a built-in profile ({}) and not a readable file: {e}",
                names.join(", ")
            )
        })?;
        Profile::parse(name_or_path, &text)
    }

    /// sysctl.conf syntax: `key = value`, `#` or `;` comments, blank lines.
    pub fn parse(name: &str, text: &str) -> Result<Profile, String> {
        let mut sysctls = Vec::new();
        let mut sessions = None;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix(SESSIONS_MARKER) {
                let n = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name}:{}: sessions must be a whole number", i + 1))?;
                sessions = Some(n);
                continue;
            }
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("{name}:{}: expected `key = value`", i + 1))?;
            let (k, v) = (k.trim(), normalize(v));
            if k.is_empty() || v.is_empty() {
                return Err(format!("{name}:{}: expected `key = value`", i + 1));
            }
            sysctls.push((k.to_string(), v));
        }
        Ok(Profile {
            name: name.to_string(),
            sysctls,
            sessions,
        })
    }

    fn wants(&self, key: &str) -> bool {
        self.sysctls.iter().any(|(k, _)| k == key)
    }
}

/// Whitespace runs (the tabs /proc uses between fields) as one space.
fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A soft and a hard resource limit; `u64::MAX` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
}

/// What was read from the host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Every sysctl a check reads: key → value (`None`: this kernel has no
    /// such key, or it could not be read).
    pub sysctls: BTreeMap<String, Option<String>>,
    /// Whose limits these are: a running proxy's, or this process's.
    pub limits_of: String,
    pub nofile: Option<Limit>,
    pub memlock: Option<Limit>,
    /// The process whose limits these are may raise its hard limits.
    pub cap_sys_resource: bool,
    /// `kernel.osrelease`.
    pub kernel: String,
    /// Setting up a ring with the data shards' flags: `Err` holds why not.
    pub io_uring: Result<(), String>,
}

impl Host {
    /// Reads `/proc` (no other process is run) and probes io_uring. The
    /// limits are those of a running `eval-proxy` if there is one (what the
    /// service really got), else this process's (what a proxy started
    /// from this shell would get).
    pub fn read(profile: &Profile) -> Host {
        let mut keys: Vec<String> = profile.sysctls.iter().map(|(k, _)| k.clone()).collect();
        for k in [SOMAXCONN, NR_OPEN, FILE_MAX, MIGRATE_REQ, IO_URING_DISABLED] {
            keys.push(k.to_string());
        }
        let sysctls = keys
            .into_iter()
            .map(|k| {
                let v = read_sysctl(&k);
                (k, v)
            })
            .collect();
        let (pid, limits_of) = match running_proxy() {
            Some(pid) => (pid.to_string(), format!("running eval-proxy pid {pid}")),
            None => ("self".to_string(), "this process".to_string()),
        };
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        Host {
            sysctls,
            limits_of,
            nofile: parse_limit(&limits, "Max open files"),
            memlock: parse_limit(&limits, "Max locked memory"),
            cap_sys_resource: has_cap(&status, CAP_SYS_RESOURCE),
            kernel: read_sysctl("kernel.osrelease").unwrap_or_default(),
            io_uring: probe_io_uring(),
        }
    }

    fn sysctl(&self, key: &str) -> Option<&str> {
        self.sysctls.get(key).and_then(|v| v.as_deref())
    }
}

fn read_sysctl(key: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(path).ok().map(|v| normalize(&v))
}

/// Another process whose executable is named `eval-proxy` and that is not
/// a `doctor` run.
fn running_proxy() -> Option<u32> {
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != me)
        .collect();
    pids.sort_unstable();
    pids.into_iter().find(|pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        comm.trim() == "eval-proxy" && !cmdline.split(|&b| b == 0).any(|a| a == b"doctor")
    })
}

/// One row of `/proc/PID/limits`: `Max open files  1024  524288  files`.
pub fn parse_limit(limits: &str, row: &str) -> Option<Limit> {
    let rest = limits.lines().find_map(|l| l.strip_prefix(row))?;
    let mut f = rest.split_whitespace();
    let num = |s: &str| match s {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    };
    Some(Limit {
        soft: num(f.next()?)?,
        hard: num(f.next()?)?,
    })
}

const CAP_SYS_RESOURCE: u32 = 24;

/// Whether `CapEff` of a `/proc/PID/status` text holds capability `cap`.
pub fn has_cap(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|bits| bits & (1 << cap) != 0)
}

/// A ring set up exactly as a data shard sets up its own.
fn probe_io_uring() -> Result<(), String> {
    io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(8)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// What the proxy's config asks of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    pub shards: u64,
    pub backlog: u64,
    pub sessions: u64,
    /// Where `sessions` comes from, for the report.
    pub sessions_from: String,
}

impl Needs {
    /// Sessions: the config's cap when it has one (per shard × shards),
    /// else what the profile is sized for.
    pub fn new(cfg: &Config, profile: &Profile) -> Needs {
        let shards = cfg.shard_count() as u64;
        let cap = u64::from(cfg.limits.max_sessions_per_shard);
        let (sessions, sessions_from) = if cap > 0 {
            (
                cap * shards,
                format!("limits.max_sessions_per_shard {cap} × {shards} shards"),
            )
        } else if let Some(n) = profile.sessions {
            (n, format!("profile {}", profile.name))
        } else {
            (0, "neither the config nor the profile".to_string())
        };
        Needs {
            shards,
            backlog: u64::from(cfg.listen.backlog),
            sessions,
            sessions_from,
        }
    }

    /// Two descriptors per session, and the reserve.
    pub fn fds(&self) -> u64 {
        self.sessions.saturating_mul(2).saturating_add(FD_RESERVE)
    }

    /// What a fix sets: [`Needs::fds`] rounded up to a power of two (for
    /// the eval-proxy profile, the unit's LimitNOFILE=2097152), so that
    /// the limit and `fs.nr_open` fixes agree.
    pub fn fds_to_set(&self) -> u64 {
        self.fds().checked_next_power_of_two().unwrap_or(u64::MAX)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Off,
}

/// One line of the report: what was checked, what was found, and for a
/// finding that is off, the line that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    pub what: String,
    pub detail: String,
    pub fix: Option<String>,
}

impl Finding {
    fn ok(what: &str, detail: String) -> Finding {
        Finding {
            verdict: Verdict::Ok,
            what: what.to_string(),
            detail,
            fix: None,
        }
    }

    fn off(what: &str, detail: String, fix: String) -> Finding {
        Finding {
            verdict: Verdict::Off,
            what: what.to_string(),
            detail,
            fix: Some(fix),
        }
    }
}

/// How a live sysctl value is held to the profile's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// At least the profile's number (queues, descriptor ceilings).
    AtLeast,
    /// At most (timeouts, keepalive timing, unsent bytes).
    AtMost,
    /// `lo hi`: the live range contains the profile's.
    Covers,
    /// Exactly (switches, buffer triplets).
    Equal,
}

pub fn rule_for(key: &str) -> Rule {
    match key {
        "net.core.somaxconn"
        | "net.ipv4.tcp_max_syn_backlog"
        | "net.core.netdev_max_backlog"
        | "fs.file-max"
        | "fs.nr_open" => Rule::AtLeast,
        "net.ipv4.tcp_fin_timeout"
        | "net.ipv4.tcp_notsent_lowat"
        | "net.ipv4.tcp_keepalive_time"
        | "net.ipv4.tcp_keepalive_intvl"
        | "net.ipv4.tcp_keepalive_probes" => Rule::AtMost,
        "net.ipv4.ip_local_port_range" => Rule::Covers,
        _ => Rule::Equal,
    }
}

/// `sysctl -w` for a value, quoted when it has several fields.
fn sysctl_fix(key: &str, want: &str) -> String {
    if want.contains(' ') {
        format!("sysctl -w {key}=\"{want}\"")
    } else {
        format!("sysctl -w {key}={want}")
    }
}

fn numbers(v: &str) -> Option<Vec<u64>> {
    v.split_whitespace().map(|n| n.parse().ok()).collect()
}

/// One profile line against the live value.
pub fn check_sysctl(profile: &str, key: &str, want: &str, live: Option<&str>) -> Finding {
    let Some(live) = live else {
        return Finding::off(
            key,
            format!(
                "absent from /proc/sys (an older kernel, or hidden in this container's namespace); profile {profile} sets {want}"
            ),
            sysctl_fix(key, want),
        );
    };
    let rule = rule_for(key);
    let good = match (rule, numbers(live), numbers(want)) {
        (Rule::AtLeast, Some(l), Some(w)) if l.len() == 1 && w.len() == 1 => l[0] >= w[0],
        (Rule::AtMost, Some(l), Some(w)) if l.len() == 1 && w.len() == 1 => l[0] <= w[0],
        (Rule::Covers, Some(l), Some(w)) if l.len() == 2 && w.len() == 2 => {
            l[0] <= w[0] && l[1] >= w[1]
        }
        (Rule::Equal, Some(l), Some(w)) => l == w,
        _ => normalize(live) == normalize(want),
    };
    let wants = match rule {
        Rule::AtLeast => format!(">= {want}"),
        Rule::AtMost => format!("<= {want}"),
        Rule::Covers => format!("{want} or wider"),
        Rule::Equal => want.to_string(),
    };
    let detail = format!("{live} (profile {profile}: {wants})");
    if good {
        Finding::ok(key, detail)
    } else {
        Finding::off(key, detail, sysctl_fix(key, want))
    }
}

/// `6.18.44-fc-v657` → (6, 18).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub fn check_kernel(release: &str) -> Finding {
    let (maj, min) = MIN_KERNEL;
    match kernel_version(release) {
        Some(v) if v >= MIN_KERNEL => Finding::ok(
            "kernel",
            format!("{release} (>= {maj}.{min}: io_uring DEFER_TASKRUN, as every data shard's ring uses)"),
        ),
        _ => Finding::off(
            "kernel",
            format!("{release:?}: the data shards' rings need Linux >= {maj}.{min} (IORING_SETUP_DEFER_TASKRUN)"),
            format!("install a kernel >= {maj}.{min} (Debian 12: apt-get install linux-image-amd64) and reboot"),
        ),
    }
}

/// `kernel.io_uring_disabled` (Linux >= 6.6: 0 allowed, 1 only for
/// `kernel.io_uring_group` or CAP_SYS_ADMIN, 2 nobody) and the probe.
pub fn check_io_uring(disabled: Option<&str>, probe: &Result<(), String>) -> Vec<Finding> {
    let mut out = Vec::new();
    match disabled {
        None => out.push(Finding::ok(
            IO_URING_DISABLED,
            "absent (Linux < 6.6: io_uring cannot be disabled)".to_string(),
        )),
        Some("0") => out.push(Finding::ok(IO_URING_DISABLED, "0 (allowed)".to_string())),
        Some(v) => out.push(Finding::off(
            IO_URING_DISABLED,
            format!("{v}: io_uring is refused to the proxy's user (1: all but kernel.io_uring_group; 2: everyone)"),
            sysctl_fix(IO_URING_DISABLED, "0"),
        )),
    }
    out.push(match probe {
        Ok(()) => Finding::ok(
            "io_uring",
            "a ring with SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN, as each data shard sets up, works"
                .to_string(),
        ),
        Err(e) => Finding::off(
            "io_uring",
            format!("setting up a ring as each data shard does failed: {e}"),
            match disabled {
                Some(v) if v != "0" => sysctl_fix(IO_URING_DISABLED, "0"),
                _ => "allow io_uring_setup(2) (seccomp profile of the container or unit: SystemCallFilter, docker --security-opt)".to_string(),
            },
        ),
    });
    out
}

fn show(n: u64) -> String {
    if n == u64::MAX {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

/// Descriptors: the soft limit the proxy runs with (it does not raise it),
/// and the kernel ceilings above it.
pub fn check_fds(
    needs: &Needs,
    nofile: Option<Limit>,
    limits_of: &str,
    nr_open: Option<u64>,
    file_max: Option<u64>,
) -> Vec<Finding> {
    let need = needs.fds();
    let set = needs.fds_to_set();
    let why = format!(
        "{} sessions ({}) × 2 + {FD_RESERVE}",
        needs.sessions, needs.sessions_from
    );
    let mut out = Vec::new();
    out.push(match nofile {
        Some(l) if l.soft >= need => Finding::ok(
            "open files",
            format!(
                "{} soft / {} hard for {limits_of} (needs {need}: {why})",
                show(l.soft),
                show(l.hard)
            ),
        ),
        Some(l) => Finding::off(
            "open files",
            format!(
                "{} soft / {} hard for {limits_of}; needs {need}: {why}",
                show(l.soft),
                show(l.hard)
            ),
            format!(
                "LimitNOFILE={set} in [Service] of eval-proxy.service (a shell: ulimit -n {set})"
            ),
        ),
        None => Finding::off(
            "open files",
            format!("could not read the limit of {limits_of}"),
            format!("LimitNOFILE={set} in [Service] of eval-proxy.service"),
        ),
    });
    for (key, live) in [(NR_OPEN, nr_open), (FILE_MAX, file_max)] {
        out.push(match live {
            Some(v) if v >= need => Finding::ok(key, format!("{v} (>= {need} descriptors: {why})")),
            Some(v) => Finding::off(
                key,
                format!("{v}, below the {need} descriptors needed: {why}"),
                sysctl_fix(key, &set.to_string()),
            ),
            None => Finding::off(
                key,
                "could not be read".to_string(),
                sysctl_fix(key, &set.to_string()),
            ),
        });
    }
    out
}

/// glommio's minimum: the proxy raises the soft limit itself as far as
/// the hard limit (or CAP_SYS_RESOURCE) allows.
pub fn check_memlock(memlock: Option<Limit>, limits_of: &str, cap_sys_resource: bool) -> Finding {
    let what = "locked memory";
    let need = MIN_MEMLOCK;
    match memlock {
        Some(l) if l.soft >= need => Finding::ok(
            what,
            format!("{} soft for {limits_of} (>= {need} bytes for the control shard's glommio)", show(l.soft)),
        ),
        Some(l) if l.hard >= need || cap_sys_resource => Finding::ok(
            what,
            format!(
                "{} soft / {} hard for {limits_of}: the proxy raises its soft limit to {need} bytes",
                show(l.soft),
                show(l.hard)
            ),
        ),
        Some(l) => Finding::off(
            what,
            format!(
                "{} soft / {} hard for {limits_of}: below the {need} bytes the control shard's glommio needs",
                show(l.soft),
                show(l.hard)
            ),
            "LimitMEMLOCK=512K in [Service] of eval-proxy.service (a shell: ulimit -l 512)".to_string(),
        ),
        None => Finding::off(
            what,
            format!("could not read the limit of {limits_of}"),
            "LimitMEMLOCK=512K in [Service] of eval-proxy.service".to_string(),
        ),
    }
}

/// listen(2) silently caps each shard's backlog at somaxconn.
pub fn check_backlog(needs: &Needs, somaxconn: Option<u64>) -> Finding {
    let what = "listen backlog";
    match somaxconn {
        Some(s) if s >= needs.backlog => Finding::ok(
            what,
            format!("listen.backlog {} per shard fits net.core.somaxconn {s}", needs.backlog),
        ),
        Some(s) => Finding::off(
            what,
            format!(
                "listen.backlog {} per shard is cut to net.core.somaxconn {s}: connects beyond it are dropped in a storm",
                needs.backlog
            ),
            sysctl_fix(SOMAXCONN, &needs.backlog.to_string()),
        ),
        None => Finding::off(
            what,
            "net.core.somaxconn could not be read".to_string(),
            sysctl_fix(SOMAXCONN, &needs.backlog.to_string()),
        ),
    }
}

/// Checked whatever the profile says: drain and handover rely on it.
pub fn check_migrate_req(live: Option<&str>) -> Finding {
    let why = "1 moves a closing listener's queued connects to a sibling (a shard ending its drain, the old process after a handover) instead of resetting them; Linux >= 5.14";
    match live {
        Some("1") => Finding::ok(MIGRATE_REQ, format!("1 ({why})")),
        Some(v) => Finding::off(
            MIGRATE_REQ,
            format!("{v}; want {why}"),
            sysctl_fix(MIGRATE_REQ, "1"),
        ),
        None => Finding::off(
            MIGRATE_REQ,
            format!("absent from /proc/sys; want {why}"),
            sysctl_fix(MIGRATE_REQ, "1"),
        ),
    }
}

/// Every check, in report order.
pub fn check(profile: &Profile, host: &Host, needs: &Needs) -> Vec<Finding> {
    let num = |k: &str| host.sysctl(k).and_then(|v| v.parse::<u64>().ok());
    let mut out = vec![check_kernel(&host.kernel)];
    out.extend(check_io_uring(
        host.sysctl(IO_URING_DISABLED),
        &host.io_uring,
    ));
    out.extend(check_fds(
        needs,
        host.nofile,
        &host.limits_of,
        num(NR_OPEN),
        num(FILE_MAX),
    ));
    out.push(check_memlock(
        host.memlock,
        &host.limits_of,
        host.cap_sys_resource,
    ));
    out.push(check_backlog(needs, num(SOMAXCONN)));
    if !profile.wants(MIGRATE_REQ) {
        out.push(check_migrate_req(host.sysctl(MIGRATE_REQ)));
    }
    for (k, v) in &profile.sysctls {
        out.push(check_sysctl(&profile.name, k, v, host.sysctl(k)));
    }
    out
}

/// The report: one line per finding (`ok  ` or `off `), each off one
/// followed by its `fix:` line, then a summary.
pub fn render(profile: &Profile, needs: &Needs, findings: &[Finding]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "eval-proxy doctor: profile {}, {} shards, listen.backlog {}, {} sessions ({})",
        profile.name, needs.shards, needs.backlog, needs.sessions, needs.sessions_from
    );
    for f in findings {
        let tag = match f.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Off => "off ",
        };
        let _ = writeln!(out, "{tag} {}: {}", f.what, f.detail);
        if let Some(fix) = &f.fix {
            let _ = writeln!(out, "     fix: {fix}");
        }
    }
    let off = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Off)
        .count();
    if off == 0 {
        let _ = writeln!(out, "all {} checks ok", findings.len());
    } else {
        let _ = writeln!(
            out,
            "{off} of {} checks off; sysctl -w lasts until reboot: keep the profile in /etc/sysctl.d/60-eval-proxy.conf (tuning/apply.sh applies it now)",
            findings.len()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn needs(sessions: u64) -> Needs {
        Needs {
            shards: 2,
            backlog: 4096,
            sessions,
            sessions_from: "test".into(),
        }
    }

    #[test]
    fn built_in_profiles_parse_and_state_their_sessions() {
        for (name, _) in BUILT_IN {
            let p = Profile::load(name).unwrap();
            assert!(!p.sysctls.is_empty(), "{name}");
            assert!(
                p.sessions.is_some(),
                "{name} has no `{SESSIONS_MARKER}` line"
            );
        }
        let p = Profile::load("eval-proxy").unwrap();
        assert_eq!(p.sessions, Some(1_000_000));
        assert!(p
            .sysctls
            .contains(&("net.ipv4.ip_local_port_range".into(), "10240 65535".into())));
    }

    #[test]
    fn the_service_unit_fits_the_profile_it_is_sized_for() {
        let unit = include_str!("../tuning/eval-proxy.service");
        let limit: u64 = unit
            .lines()
            .find_map(|l| l.strip_prefix("LimitNOFILE="))
            .unwrap()
            .parse()
            .unwrap();
        let p = Profile::load("eval-proxy").unwrap();
        let n = needs(p.sessions.unwrap());
        assert!(n.fds() <= limit, "{} > LimitNOFILE {limit}", n.fds());
        let nr_open: u64 = p
            .sysctls
            .iter()
            .find(|(k, _)| k == NR_OPEN)
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert!(limit <= nr_open, "LimitNOFILE above fs.nr_open");
    }

    #[test]
    fn profile_syntax_errors_name_the_line() {
        let e = Profile::parse("p", "a = 1\n\nnot a line\n").unwrap_err();
        assert_eq!(e, "p:3: expected `key = value`");
        let e = Profile::parse("p", "# eval-proxy doctor: sessions = many\n").unwrap_err();
        assert!(e.starts_with("p:1:"), "{e}");
        let p = Profile::parse("p", "; c\nk =  a\t b \n").unwrap();
        assert_eq!(p.sysctls, [("k".to_string(), "a b".to_string())]);
        assert_eq!(p.sessions, None);
    }

    #[rstest]
    #[case("net.core.somaxconn", "65535", "65535", true)]
    #[case("net.core.somaxconn", "65535", "100000", true)]
    #[case("net.core.somaxconn", "65535", "4096", false)]
    #[case("net.ipv4.tcp_keepalive_time", "600", "7200", false)]
    #[case("net.ipv4.tcp_keepalive_time", "600", "300", true)]
    #[case("net.ipv4.ip_local_port_range", "10240 65535", "10240 65535", true)]
    #[case("net.ipv4.ip_local_port_range", "10240 65535", "1024 65535", true)]
    #[case("net.ipv4.ip_local_port_range", "10240 65535", "32768 60999", false)]
    #[case("net.ipv4.tcp_tw_reuse", "1", "2", false)]
    #[case("net.ipv4.tcp_rmem", "4096 16384 4194304", "4096 16384 4194304", true)]
    #[case(
        "net.ipv4.tcp_rmem",
        "4096 16384 4194304",
        "4096 131072 33554432",
        false
    )]
    #[case("net.ipv4.tcp_congestion_control", "bbr", "cubic", false)]
    fn sysctl_rules(#[case] key: &str, #[case] want: &str, #[case] live: &str, #[case] ok: bool) {
        let f = check_sysctl("p", key, want, Some(live));
        assert_eq!(f.verdict == Verdict::Ok, ok, "{f:?}");
        assert_eq!(f.fix.is_none(), ok);
    }

    #[test]
    fn an_off_sysctl_says_the_exact_command() {
        let f = check_sysctl(
            "p",
            "net.ipv4.ip_local_port_range",
            "10240 65535",
            Some("32768 60999"),
        );
        assert_eq!(
            f.fix.as_deref(),
            Some("sysctl -w net.ipv4.ip_local_port_range=\"10240 65535\"")
        );
        let f = check_sysctl("p", "net.ipv4.tcp_migrate_req", "1", None);
        assert_eq!(f.verdict, Verdict::Off);
    }

    #[rstest]
    #[case("6.18.44-fc-v657", Some((6, 18)), true)]
    #[case("6.1.0-28-amd64", Some((6, 1)), true)]
    #[case("6.0.12", Some((6, 0)), false)]
    #[case("5.15.0-91-generic", Some((5, 15)), false)]
    #[case("", None, false)]
    fn kernels(#[case] release: &str, #[case] v: Option<(u32, u32)>, #[case] ok: bool) {
        assert_eq!(kernel_version(release), v);
        assert_eq!(check_kernel(release).verdict == Verdict::Ok, ok);
    }

    #[test]
    fn io_uring_disabled_or_failing_is_off_with_the_fix() {
        let ok = check_io_uring(Some("0"), &Ok(()));
        assert!(ok.iter().all(|f| f.verdict == Verdict::Ok), "{ok:?}");
        let old = check_io_uring(None, &Ok(()));
        assert!(old.iter().all(|f| f.verdict == Verdict::Ok), "{old:?}");
        let off = check_io_uring(Some("2"), &Err("Operation not permitted".into()));
        assert!(off.iter().all(|f| f.verdict == Verdict::Off));
        assert!(off
            .iter()
            .all(|f| f.fix.as_deref() == Some("sysctl -w kernel.io_uring_disabled=0")));
        let seccomp = check_io_uring(Some("0"), &Err("Operation not permitted".into()));
        assert_eq!(seccomp[0].verdict, Verdict::Ok);
        assert!(seccomp[1].fix.as_deref().unwrap().contains("seccomp"));
    }

    #[test]
    fn descriptors_are_held_to_two_per_session() {
        let n = needs(1000);
        assert_eq!(n.fds(), 2000 + FD_RESERVE);
        let lim = |soft| {
            Some(Limit {
                soft,
                hard: u64::MAX,
            })
        };
        let f = check_fds(&n, lim(n.fds()), "x", Some(n.fds()), Some(u64::MAX));
        assert!(f.iter().all(|f| f.verdict == Verdict::Ok), "{f:?}");
        let f = check_fds(&n, lim(1024), "x", Some(1024), Some(n.fds()));
        assert_eq!(f[0].verdict, Verdict::Off);
        assert_eq!(
            f[0].fix.as_deref(),
            Some("LimitNOFILE=4096 in [Service] of eval-proxy.service (a shell: ulimit -n 4096)")
        );
        assert_eq!(f[1].fix.as_deref(), Some("sysctl -w fs.nr_open=4096"));
        assert_eq!(f[2].verdict, Verdict::Ok);
    }

    #[test]
    fn memlock_needs_512_kib_soft_or_room_to_raise_it() {
        let l = |soft, hard| Some(Limit { soft, hard });
        assert_eq!(
            check_memlock(l(8 << 20, 8 << 20), "x", false).verdict,
            Verdict::Ok
        );
        assert_eq!(
            check_memlock(l(64 << 10, 1 << 20), "x", false).verdict,
            Verdict::Ok
        );
        assert_eq!(
            check_memlock(l(64 << 10, 64 << 10), "x", true).verdict,
            Verdict::Ok
        );
        let off = check_memlock(l(64 << 10, 64 << 10), "x", false);
        assert_eq!(off.verdict, Verdict::Off);
        assert!(off.fix.unwrap().starts_with("LimitMEMLOCK=512K"));
    }

    #[test]
    fn somaxconn_below_the_backlog_is_off() {
        assert_eq!(check_backlog(&needs(1), Some(4096)).verdict, Verdict::Ok);
        let f = check_backlog(&needs(1), Some(128));
        assert_eq!(f.fix.as_deref(), Some("sysctl -w net.core.somaxconn=4096"));
    }

    #[test]
    fn proc_limits_and_caps_parse() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n\
                      Max locked memory         unlimited            unlimited            bytes     \n";
        assert_eq!(
            parse_limit(limits, "Max open files"),
            Some(Limit {
                soft: 1024,
                hard: 524288
            })
        );
        assert_eq!(
            parse_limit(limits, "Max locked memory"),
            Some(Limit {
                soft: u64::MAX,
                hard: u64::MAX
            })
        );
        assert_eq!(parse_limit(limits, "Max processes"), None);
        assert!(has_cap("CapEff:\t000001ffffffffff\n", CAP_SYS_RESOURCE));
        assert!(!has_cap("CapEff:\t0000000000000000\n", CAP_SYS_RESOURCE));
    }

    /// A host exactly as the profile wants it passes every check; one
    /// value off is the one finding, and the report's fix line says it.
    #[test]
    fn a_host_tuned_to_the_profile_is_all_ok_and_one_change_is_one_finding() {
        let p = Profile::load("eval-proxy").unwrap();
        let n = needs(p.sessions.unwrap());
        let mut host = Host {
            sysctls: p
                .sysctls
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            limits_of: "test".into(),
            nofile: Some(Limit {
                soft: 2097152,
                hard: 2097152,
            }),
            memlock: Some(Limit {
                soft: 8 << 20,
                hard: 8 << 20,
            }),
            cap_sys_resource: false,
            kernel: "6.1.0-28-amd64".into(),
            io_uring: Ok(()),
        };
        host.sysctls.insert(MIGRATE_REQ.into(), Some("1".into()));
        host.sysctls
            .insert(IO_URING_DISABLED.into(), Some("0".into()));
        let all = check(&p, &host, &n);
        let off: Vec<_> = all.iter().filter(|f| f.verdict == Verdict::Off).collect();
        assert!(off.is_empty(), "{off:?}");
        assert!(render(&p, &n, &all).ends_with(&format!("all {} checks ok\n", all.len())));

        host.sysctls
            .insert("net.ipv4.tcp_keepalive_time".into(), Some("7200".into()));
        let all = check(&p, &host, &n);
        let off: Vec<_> = all.iter().filter(|f| f.verdict == Verdict::Off).collect();
        assert_eq!(off.len(), 1, "{off:?}");
        let report = render(&p, &n, &all);
        assert!(
            report.contains("off  net.ipv4.tcp_keepalive_time: 7200 (profile eval-proxy: <= 600)\n     fix: sysctl -w net.ipv4.tcp_keepalive_time=600\n"),
            "{report}"
        );
        assert!(report.contains(&format!("1 of {} checks off", all.len())));
    }
}
