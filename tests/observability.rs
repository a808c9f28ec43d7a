//! What the operator's tools read: the Prometheus rules (checked and unit
//! tested by promtool), the Grafana dashboard (every expression names only
//! metrics the proxy exports), and `/metrics` itself after a scripted mix of
//! sessions, asserted to the exact count.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use eval_proxy::dev::conman::Behavior;
use eval_proxy::metrics::names::{self, Kind};
use eval_proxy::token;
use support::*;

fn tuning(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tuning")
        .join(file)
}

// ---------------------------------------------------------------------------
// Metric names in PromQL.

/// Words of PromQL that are not metric names. Functions need no entry:
/// whatever is followed by `(` is one.
const PROMQL_WORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "inf",
    "nan",
];

/// Keywords whose parenthesised list holds label names, not series.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The metric names an expression selects: identifiers outside label
/// matchers, ranges, strings and label lists that are neither PromQL words
/// nor functions. Grafana's `$variables` are skipped.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    // Index just past the group that opens at `open` (quotes respected).
    let skip_group = |mut i: usize, open: u8, close: u8| -> usize {
        let mut depth = 0;
        let mut quote = None;
        while i < b.len() {
            let c = b[i];
            match quote {
                Some(_) if c == b'\\' => i += 1,
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None if c == b'"' || c == b'\'' || c == b'`' => quote = Some(c),
                None if c == open => depth += 1,
                None if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                None => {}
            }
            i += 1;
        }
        panic!("unbalanced {} in {expr:?}", open as char);
    };
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            i = skip_group(i, b'{', b'}');
        } else if c == b'[' {
            i = skip_group(i, b'[', b']');
        } else if c == b'"' || c == b'\'' || c == b'`' {
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == b'$' || c.is_ascii_digit() || c == b'.' {
            // A variable, a number or a duration: one token of word chars.
            i += 1;
            while i < b.len() && (is_ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if is_ident(c) {
            let start = i;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            let call = j < b.len() && b[j] == b'(';
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) && call {
                i = skip_group(j, b'(', b')');
            } else if !call && !PROMQL_WORDS.contains(&lower.as_str()) {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn metric_names_are_found_and_nothing_else() {
    let e = r#"sum by (job, le) (rate(eval_a_total{job=~"$job",x="}"}[$__rate_interval]))
        / on (job) group_left (le) (1 - eval:b:rate5m offset 5m) > bool 0.05 * count(up) unless label_x
        or label_replace(z, "dst", "$1", "src", "(.*)")"#;
    assert_eq!(
        metric_names(e),
        ["eval_a_total", "eval:b:rate5m", "up", "label_x", "z"]
    );
    assert_eq!(
        metric_names("histogram_quantile(0.99, sum by (stage, le) (rate(m_bucket[5m])))"),
        ["m_bucket"]
    );
}

/// Every series name `/metrics` can hold: the declared names, and a
/// histogram's `_bucket`, `_sum` and `_count`.
fn exported_series() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for &(name, kind) in names::ALL {
        out.insert(name.to_string());
        if kind == Kind::Histogram {
            for sfx in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{sfx}"));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Prometheus rules.

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool {args:?}: {e} (Debian package `prometheus`; .ci/install-deps.sh installs it)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let rules = tuning("prometheus-rules.yml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(out.contains("SUCCESS: 14 rules found"), "{out}");
    let tests = tuning("prometheus-rules.test.yml");
    let out = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The `expr:` of every rule, folded or literal blocks included.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" && rest != ">" {
            out.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let ni = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && ni <= indent {
                break;
            }
            block.push_str(next.trim());
            block.push('\n');
            lines.next();
        }
        out.push(block);
    }
    out
}

#[test]
fn rules_name_only_exported_metrics_their_own_records_and_up() {
    let yaml = std::fs::read_to_string(tuning("prometheus-rules.yml")).unwrap();
    let mut known = exported_series();
    for l in yaml.lines() {
        if let Some(r) = l.trim_start().strip_prefix("- record:") {
            known.insert(r.trim().to_string());
        }
    }
    // Prometheus's own per-target series, for the proxies that are down.
    known.insert("up".into());
    let exprs = rule_exprs(&yaml);
    assert_eq!(exprs.len(), 14, "one expr per rule");
    let mut used = BTreeSet::new();
    for e in &exprs {
        let found = metric_names(e);
        assert!(!found.is_empty(), "no metric in {e:?}");
        for n in found {
            assert!(known.contains(&n), "{n} (in {e:?}) is not exported");
            used.insert(n);
        }
    }
    // The SLI reads the three series of the README's formula.
    for n in [
        names::SESSIONS_ESTABLISHED,
        names::SESSION_ATTEMPTS,
        names::CLIENT_FAULT_REJECTIONS,
        names::CONTROLPLANE_BREAKER_STATE,
        names::CONMAN_ATTEMPT_FAILURES,
        names::CONNECTIONS_ACCEPTED,
        names::DRAINING,
    ] {
        assert!(used.contains(n), "no rule reads {n}");
    }
}

// ---------------------------------------------------------------------------
// Grafana dashboard.

/// Every panel, rows' nested panels included.
fn panels(v: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

/// (panel title, expression) for every query of the dashboard, template
/// variables' `label_values(EXPR, LABEL)` reduced to EXPR.
fn dashboard_exprs(v: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(v) {
        let title = p["title"].as_str().unwrap_or("").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().expect("every target has an expr");
            out.push((title.clone(), e.to_string()));
        }
    }
    for var in v["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or(var["query"].as_str())
            .expect("a query variable has a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.rsplit_once(','))
            .map(|(e, _)| e)
            .expect("variables are label_values(EXPR, LABEL)");
        out.push((format!("variable {}", var["name"]), inner.to_string()));
    }
    out
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(tuning("grafana-dashboard.json")).unwrap();
    serde_json::from_str(&text).expect("grafana-dashboard.json is JSON")
}

#[test]
fn dashboard_names_only_exported_metrics_and_covers_what_on_call_needs() {
    let d = dashboard();
    let exported = exported_series();
    let exprs = dashboard_exprs(&d);
    assert!(exprs.len() >= 8, "{exprs:?}");
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (title, e) in &exprs {
        let found = metric_names(e);
        assert!(!found.is_empty(), "{title}: no metric in {e:?}");
        for n in found {
            assert!(exported.contains(&n), "{title}: {n} is not exported");
            used.entry(n).or_default().push(e.clone());
        }
    }
    let ids: BTreeSet<u64> = panels(&d).iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels(&d).len(), "panel ids are unique");
    // Each topic of the issue, as the metric and the labels that show it.
    let needs: &[(&str, &[&str])] = &[
        (names::SESSIONS_ACTIVE, &["shard"]),
        (names::SESSIONS_ESTABLISHED, &[]),
        (names::SESSION_ATTEMPTS, &[]),
        (names::CLIENT_FAULT_REJECTIONS, &[]),
        (names::SETUP_FAILURES, &["stage", "reason"]),
        ("eval_setup_duration_seconds_bucket", &["stage", "le"]),
        (names::CONMAN_ATTEMPT_FAILURES, &["vm"]),
        (names::DRAIN_PHASE, &[]),
        (names::DRAIN_SESSIONS_LEFT, &[]),
    ];
    for (name, labels) in needs {
        let exprs = used
            .get(*name)
            .unwrap_or_else(|| panic!("no panel reads {name}"));
        assert!(
            exprs
                .iter()
                .any(|e| labels.iter().all(|l| e.contains(&format!("{l})"))
                    || e.contains(&format!("{l},"))
                    || e.contains(&format!(", {l}")))),
            "no panel shows {name} by {labels:?}: {exprs:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// The scripted scenario.

/// One sample's value, by its exact series (name and label text).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(k, _)| *k == series))
        .map(|(_, v)| v.parse().expect("a number"))
}

/// Every sample of a metric: label text → value.
fn samples(text: &str, name: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| {
            let labels = match k.strip_prefix(name)? {
                "" => "",
                l if l.starts_with('{') => l,
                _ => return None,
            };
            Some((labels.to_string(), v.parse().expect("a number")))
        })
        .collect()
}

fn expect_exact(text: &str, name: &str, want: &[(&str, f64)]) {
    let got = samples(text, name);
    let want: BTreeMap<String, f64> = want.iter().map(|(l, v)| (l.to_string(), *v)).collect();
    assert_eq!(got, want, "{name}");
}

/// The client's side of a session the proxy refuses with a Close: the
/// upgrade succeeds (client-first mode), then the Close names the stage.
/// A raw client, since tungstenite turns a received 1014 into 1002.
fn refused_with_close(proxy: &Proxy, token: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = raw_client(proxy.listen, token);
    let (code, reason) = read_close(&mut s);
    // Complete the closing handshake, so the session ends at once.
    s.write_all(&frame(true, 8, &code.to_be_bytes(), Some([7, 7, 7, 7])))
        .unwrap();
    (code, reason)
}

/// 5 sessions relay; then 1 bad request, 2 expired tokens, 3 sessions whose
/// Conman refuses the connection and 2 whose Conman answers 500. With one
/// attempt per session, every counter and histogram count is known
/// exactly, and so is the per-shard gauge while the 5 are open.
#[test]
fn scripted_sessions_give_exact_counters_histograms_and_shard_gauges() {
    const OK: usize = 5;
    const BAD_REQUEST: usize = 1;
    const EXPIRED: usize = 2;
    const REFUSED: usize = 3;
    const BAD_HANDSHAKE: usize = 2;

    let ok = fake_conman(Behavior {
        vm_id: "vm-ok".into(),
        ..Default::default()
    });
    let refusing = refusing_addr();
    let bad = fake_conman(Behavior {
        vm_id: "vm-bad".into(),
        reject_status: Some(500),
        ..Default::default()
    });
    // One attempt per session, and no VM is avoided after a failure, so
    // each repl reaches exactly its pinned VM every time.
    let cfg = format!(
        r#"[token]
allow_dev_key = true

[limits]
max_attempts = 1

[placement]
fail_timeout_ms = 0

[placement.vms]
vm-ok = "ws://{}/"
vm-refused = "ws://{}/"
vm-bad = "ws://{}/"

[placement.repls]
repl-ok = "vm-ok"
repl-refused = "vm-refused"
repl-bad = "vm-bad"
"#,
        ok.local_addr, refusing.addr, bad.local_addr
    );
    let proxy = Proxy::start(&cfg, &["--shards", "2"]);

    let mut held: Vec<Client> = (0..OK)
        .map(|i| {
            let mut ws = connect(&proxy.url(&dev_token("repl-ok")));
            let msg = format!("hello {i}");
            ws.send(tungstenite::Message::text(msg.clone())).unwrap();
            assert_eq!(ws.read().unwrap(), tungstenite::Message::text(msg));
            ws
        })
        .collect();

    // Only the relaying sessions have connected so far: each shard's gauge
    // is exactly the connections it accepted.
    let m = proxy.metrics();
    let accepted = samples(&m, names::CONNECTIONS_ACCEPTED);
    let active = samples(&m, names::SESSIONS_ACTIVE);
    assert_eq!(
        accepted.keys().collect::<Vec<_>>(),
        ["{shard=\"0\"}", "{shard=\"1\"}"]
    );
    assert_eq!(active, accepted, "per-shard active vs accepted:\n{m}");
    assert_eq!(active.values().sum::<f64>(), OK as f64);

    for _ in 0..BAD_REQUEST {
        let resp = raw_exchange(
            proxy.listen,
            b"GET /wsv2/x HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert_eq!(status_of(&resp), 400);
    }
    for _ in 0..EXPIRED {
        let mut c = claims("repl-ok");
        c.exp = unix_now() - 3600;
        let t = token::mint(&c, token::DEV_KID, &token::dev_signing_key());
        let (code, reason) = refused_with_close(&proxy, &t);
        assert_eq!(
            (code, reason.as_str()),
            (1008, "stage=token;reason=expired")
        );
    }
    for _ in 0..REFUSED {
        let (code, reason) = refused_with_close(&proxy, &dev_token("repl-refused"));
        assert_eq!(
            (code, reason.as_str()),
            (1014, "stage=conman_connect;reason=refused")
        );
    }
    for _ in 0..BAD_HANDSHAKE {
        let (code, reason) = refused_with_close(&proxy, &dev_token("repl-bad"));
        assert_eq!(
            (code, reason.as_str()),
            (1014, "stage=conman_handshake;reason=status")
        );
    }
    for mut ws in held.drain(..) {
        ws.close(None).unwrap();
        // Until the proxy's Close reply and the end of the stream.
        while ws.read().is_ok() {}
    }
    wait_until("every session to end", WAIT, || {
        samples(&proxy.metrics(), names::SESSIONS_ACTIVE)
            .values()
            .all(|v| *v == 0.0)
    });

    let m = proxy.metrics();
    let f = |n: usize| n as f64;
    let attempts = OK + BAD_REQUEST + EXPIRED + REFUSED + BAD_HANDSHAKE;
    expect_exact(&m, names::SESSION_ATTEMPTS, &[("", f(attempts))]);
    expect_exact(&m, names::SESSIONS_ESTABLISHED, &[("", f(OK))]);
    expect_exact(
        &m,
        names::CLIENT_FAULT_REJECTIONS,
        &[("", f(BAD_REQUEST + EXPIRED))],
    );
    expect_exact(
        &m,
        names::SETUP_FAILURES,
        &[
            ("{stage=\"conman_connect\",reason=\"refused\"}", f(REFUSED)),
            (
                "{stage=\"conman_handshake\",reason=\"status\"}",
                f(BAD_HANDSHAKE),
            ),
            ("{stage=\"request\",reason=\"missing_key\"}", f(BAD_REQUEST)),
            ("{stage=\"token\",reason=\"expired\"}", f(EXPIRED)),
        ],
    );
    expect_exact(
        &m,
        names::CONMAN_ATTEMPT_FAILURES,
        &[
            (
                "{stage=\"conman_connect\",reason=\"refused\",vm=\"vm-refused\"}",
                f(REFUSED),
            ),
            (
                "{stage=\"conman_handshake\",reason=\"status\",vm=\"vm-bad\"}",
                f(BAD_HANDSHAKE),
            ),
        ],
    );
    expect_exact(
        &m,
        names::HTTP_RESPONSES,
        &[("{status=\"400\"}", f(BAD_REQUEST))],
    );
    let accepted = samples(&m, names::CONNECTIONS_ACCEPTED);
    assert_eq!(accepted.values().sum::<f64>(), f(attempts), "{m}");
    expect_exact(
        &m,
        names::SESSIONS_ACTIVE,
        &[("{shard=\"0\"}", 0.0), ("{shard=\"1\"}", 0.0)],
    );
    let sent_by_proxy = |code: u16| {
        sample(
            &m,
            &format!(
                "{}{{side=\"proxy_to_client\",code=\"{code}\"}}",
                names::CLOSE_CODES
            ),
        )
    };
    assert_eq!(sent_by_proxy(1008), Some(f(EXPIRED)));
    assert_eq!(sent_by_proxy(1014), Some(f(REFUSED + BAD_HANDSHAKE)));

    // Each stage's histogram counts what reached it: every token checked;
    // a placement for every valid token; a finished TCP connect for every
    // Conman that did not refuse; an upgrade and a whole setup per relay.
    let count = |stage: &str| {
        sample(
            &m,
            &format!("{}_count{{stage=\"{stage}\"}}", names::SETUP_DURATION),
        )
    };
    let inf_bucket = |stage: &str| {
        sample(
            &m,
            &format!(
                "{}_bucket{{stage=\"{stage}\",le=\"+Inf\"}}",
                names::SETUP_DURATION
            ),
        )
    };
    for (stage, n) in [
        ("token", OK + EXPIRED + REFUSED + BAD_HANDSHAKE),
        ("controlplane", OK + REFUSED + BAD_HANDSHAKE),
        ("conman_dial", OK + BAD_HANDSHAKE),
        ("conman_upgrade", OK),
        ("total", OK),
    ] {
        assert_eq!(count(stage), Some(f(n)), "{stage} count\n{m}");
        assert_eq!(inf_bucket(stage), Some(f(n)), "{stage} +Inf bucket");
    }

    // The SLI as README and the recording rules define it.
    let get = |n: &str| sample(&m, n).unwrap();
    let rate = get(names::SESSIONS_ESTABLISHED)
        / (get(names::SESSION_ATTEMPTS) - get(names::CLIENT_FAULT_REJECTIONS));
    assert_eq!(rate, f(OK) / f(OK + REFUSED + BAD_HANDSHAKE));

    // After this traffic, every series the dashboard reads is in /metrics
    // (some appear only once something happened).
    let present: BTreeSet<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for (title, e) in dashboard_exprs(&dashboard()) {
        for n in metric_names(&e) {
            assert!(present.contains(n.as_str()), "{title}: {n} not in /metrics");
        }
    }
}

/// In Controlplane mode any VM id can come back: the first 64 that fail
/// keep their own label, the rest share `vm="other"`, so the series stay
/// bounded whatever the Controlplane names.
#[test]
fn controlplane_vm_labels_are_capped() {
    use eval_proxy::dev::controlplane::{self, FakeControlplaneConfig};
    use eval_proxy::metrics::vm_label::{MAX_CONTROLPLANE_VMS, OTHER};
    const VMS: usize = MAX_CONTROLPLANE_VMS + 2;
    let refusing = refusing_addr();
    // The fake places each new repl on the least loaded VM, lowest index
    // first: session i on cp-vm-i.
    let cp = controlplane::spawn(FakeControlplaneConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        conmans: (0..VMS)
            .map(|i| (format!("cp-vm-{i}"), format!("ws://{}/", refusing.addr)))
            .collect(),
        ttl_ms: 60_000,
        pins: Vec::new(),
    })
    .expect("fake controlplane");
    let cfg = format!(
        "[token]\nallow_dev_key = true\n[limits]\nmax_attempts = 1\n[placement]\nmode = \"controlplane\"\n[controlplane]\nurls = [\"http://{}\"]\n",
        cp.local_addr
    );
    let proxy = Proxy::start(&cfg, &["--shards", "1"]);
    for i in 0..VMS {
        let (code, reason) = refused_with_close(&proxy, &dev_token(&format!("repl-{i}")));
        assert_eq!(
            (code, reason.as_str()),
            (1014, "stage=conman_connect;reason=refused")
        );
    }
    let m = proxy.metrics();
    let series = |vm: &str| format!("{{stage=\"conman_connect\",reason=\"refused\",vm=\"{vm}\"}}");
    let mut want: Vec<(String, f64)> = (0..MAX_CONTROLPLANE_VMS)
        .map(|i| (series(&format!("cp-vm-{i}")), 1.0))
        .collect();
    want.push((series(OTHER), (VMS - MAX_CONTROLPLANE_VMS) as f64));
    let want: Vec<(&str, f64)> = want.iter().map(|(s, v)| (s.as_str(), *v)).collect();
    expect_exact(&m, names::CONMAN_ATTEMPT_FAILURES, &want);
}
