//! `eval-proxy doctor` on this machine: the report's format, its exit code
//! against its own findings, and the values it prints against what the
//! test reads from /proc/sys itself.

mod support;

use std::process::{Command, Output};

use support::{bin, tempdir};

fn doctor(args: &[&str]) -> Output {
    Command::new(bin())
        .arg("doctor")
        .args(args)
        .output()
        .expect("run eval-proxy doctor")
}

fn proc_sys(key: &str) -> Option<String> {
    let v = std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/"))).ok()?;
    Some(v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// A parsed report: (is ok, what, detail, fix) per finding, and the
/// summary line.
struct Report {
    header: String,
    findings: Vec<(bool, String, String, Option<String>)>,
    summary: String,
}

/// Holds the report to its format: a header, then `ok   WHAT: DETAIL` or
/// `off  WHAT: DETAIL` followed by `     fix: LINE`, then one summary line
/// whose counts match the findings.
fn parse(out: &Output) -> Report {
    let text = String::from_utf8(out.stdout.clone()).expect("utf-8 report");
    let mut lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 3, "{text}");
    let header = lines.remove(0).to_string();
    assert!(
        header.starts_with("eval-proxy doctor: profile "),
        "{header}"
    );
    let summary = lines.pop().unwrap().to_string();
    let mut findings: Vec<(bool, String, String, Option<String>)> = Vec::new();
    for l in lines {
        if let Some(fix) = l.strip_prefix("     fix: ") {
            let last = findings.last_mut().expect("a fix follows a finding");
            assert!(!last.0, "a fix under an ok finding: {l}");
            assert!(last.3.is_none(), "two fixes for one finding: {l}");
            assert!(!fix.trim().is_empty());
            last.3 = Some(fix.to_string());
            continue;
        }
        let (ok, rest) = match (l.strip_prefix("ok   "), l.strip_prefix("off  ")) {
            (Some(r), _) => (true, r),
            (_, Some(r)) => (false, r),
            _ => panic!("not a finding, nor a fix: {l:?}\n{text}"),
        };
        let (what, detail) = rest.split_once(": ").expect("WHAT: DETAIL");
        findings.push((ok, what.to_string(), detail.to_string(), None));
    }
    for f in &findings {
        assert_eq!(
            f.0,
            f.3.is_none(),
            "every off finding, and only those, has a fix: {f:?}"
        );
    }
    let off = findings.iter().filter(|f| !f.0).count();
    let want = if off == 0 {
        format!("all {} checks ok", findings.len())
    } else {
        format!("{off} of {} checks off; ", findings.len())
    };
    assert!(summary.starts_with(&want), "{summary:?} vs {want:?}");
    Report {
        header,
        findings,
        summary,
    }
}

#[test]
fn doctor_reports_this_machine_and_exits_by_its_findings() {
    let out = doctor(&[]);
    let r = parse(&out);
    let off = r.findings.iter().any(|f| !f.0);
    assert_eq!(
        out.status.code(),
        Some(if off { 1 } else { 0 }),
        "{}",
        r.summary
    );
    assert!(
        r.header
            .starts_with("eval-proxy doctor: profile eval-proxy,"),
        "{}",
        r.header
    );
    assert!(
        r.header.ends_with("1000000 sessions (profile eval-proxy)"),
        "{}",
        r.header
    );
    // Every sysctl the report names shows the value /proc/sys has now.
    let mut sysctls = 0;
    for (_, what, detail, fix) in &r.findings {
        if !what.contains('.') || what.contains(' ') {
            continue;
        }
        let live = proc_sys(what);
        match &live {
            Some(v) => assert!(
                detail == v
                    || detail.starts_with(&format!("{v} "))
                    || detail.starts_with(&format!("{v},"))
                    || detail.starts_with(&format!("{v};")),
                "{what}: reported {detail:?}, /proc/sys has {v:?}"
            ),
            None => assert!(detail.starts_with("absent"), "{what}: {detail}"),
        }
        if let Some(fix) = fix {
            assert!(fix.starts_with(&format!("sysctl -w {what}=")), "{fix}");
        }
        sysctls += 1;
    }
    assert!(sysctls >= 15, "only {sysctls} sysctls in the report");
    let kernel = proc_sys("kernel.osrelease").unwrap();
    let k = r
        .findings
        .iter()
        .find(|f| f.1 == "kernel")
        .expect("a kernel line");
    assert!(k.2.starts_with(&kernel), "{k:?}");
    for what in [
        "io_uring",
        "open files",
        "locked memory",
        "listen backlog",
        "net.ipv4.tcp_migrate_req",
    ] {
        assert!(r.findings.iter().any(|f| f.1 == what), "no {what} line");
    }
}

/// A profile written from this machine's own values passes those lines;
/// one stricter value is the one sysctl finding, with its exact fix.
#[test]
fn a_profile_file_is_checked_line_by_line() {
    let somaxconn = proc_sys("net.core.somaxconn").unwrap();
    let fin: u64 = proc_sys("net.ipv4.tcp_fin_timeout")
        .unwrap()
        .parse()
        .unwrap();
    let dir = tempdir::Dir::new("doctor");
    let profile = dir.path().join("p.conf");
    std::fs::write(
        &profile,
        format!(
            "# eval-proxy doctor: sessions = 10\nnet.core.somaxconn = {somaxconn}\nnet.ipv4.tcp_fin_timeout = {}\n",
            fin - 1
        ),
    )
    .unwrap();
    let config = dir.path().join("eval.toml");
    std::fs::write(
        &config,
        "[listen]\nshards = 2\nbacklog = 16\n\n[limits]\nmax_sessions_per_shard = 3\n\n[placement]\ndefault = \"ws://127.0.0.1:7000/\"\n\n[token]\nallow_dev_key = true\n",
    )
    .unwrap();
    let out = doctor(&[
        "--profile",
        profile.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let r = parse(&out);
    assert!(r.header.contains(", 2 shards, listen.backlog 16, 6 sessions (limits.max_sessions_per_shard 3 × 2 shards)"), "{}", r.header);
    let line = |what: &str| {
        r.findings
            .iter()
            .find(|f| f.1 == what)
            .unwrap_or_else(|| panic!("no {what} line"))
            .clone()
    };
    assert!(line("net.core.somaxconn").0);
    let fin_line = line("net.ipv4.tcp_fin_timeout");
    assert!(!fin_line.0);
    assert_eq!(
        fin_line.3.as_deref(),
        Some(format!("sysctl -w net.ipv4.tcp_fin_timeout={}", fin - 1).as_str())
    );
    assert!(line("listen backlog").0, "backlog 16 fits any somaxconn");
    assert!(
        line("open files").2.contains("needs 1036: 6 sessions"),
        "{:?}",
        line("open files")
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn usage_errors_exit_2() {
    let out = doctor(&["--profile", "no-such-profile"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("eval-proxy, loopback-bench"), "{err}");
    assert!(out.stdout.is_empty());

    let out = doctor(&["--bogus"]);
    assert_eq!(out.status.code(), Some(2));

    let dir = tempdir::Dir::new("doctor");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[listen]\nnope = 1\n").unwrap();
    let out = doctor(&["--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn help_documents_doctor_and_its_exit_codes() {
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&out.stdout);
    assert!(top.contains("doctor"), "{top}");
    let out = doctor(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--profile",
        "loopback-bench",
        "Exit 0 when all is well, 1 when something is off, 2",
    ] {
        assert!(help.contains(want), "{want} missing in\n{help}");
    }
}
