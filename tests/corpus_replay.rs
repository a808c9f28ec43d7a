//! Replays every fuzz corpus file (tests/fuzz/corpus/<target>/) through the
//! fuzz targets' own harness on each `cargo test`, so named regression seeds
//! and anything a fuzzing run saved keep passing without nightly or
//! cargo-fuzz. A missing corpus fails the test instead of skipping it.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "fuzz/harness/chunks.rs"]
mod chunks;
#[path = "fuzz/harness/conman_response.rs"]
mod conman_response;
#[path = "fuzz/harness/controlplane_response.rs"]
mod controlplane_response;
#[path = "fuzz/harness/frame_header.rs"]
mod frame_header;
#[path = "fuzz/harness/http_request.rs"]
mod http_request;
#[path = "fuzz/harness/proxy_header.rs"]
mod proxy_header;
#[path = "fuzz/harness/relay_tracker.rs"]
mod relay_tracker;
#[path = "fuzz/harness/tls_record.rs"]
mod tls_record;
#[path = "fuzz/harness/token.rs"]
mod token;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target);
    let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    let failed: Vec<String> = corpus(target)
        .into_iter()
        .filter(|path| {
            let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            panic::catch_unwind(AssertUnwindSafe(|| run(&data))).is_err()
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{target} corpus files failed: {failed:#?}"
    );
}

#[test]
fn frame_header_corpus() {
    replay("frame_header", frame_header::run);
}

#[test]
fn relay_tracker_corpus() {
    replay("relay_tracker", relay_tracker::run);
}

#[test]
fn http_request_corpus() {
    replay("http_request", http_request::run);
}

#[test]
fn conman_response_corpus() {
    replay("conman_response", conman_response::run);
}

#[test]
fn controlplane_response_corpus() {
    replay("controlplane_response", controlplane_response::run);
}

#[test]
fn token_corpus() {
    replay("token", token::run);
}

#[test]
fn tls_record_corpus() {
    replay("tls_record", tls_record::run);
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header", proxy_header::run);
}
