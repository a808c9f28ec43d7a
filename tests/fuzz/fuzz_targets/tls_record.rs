#![no_main]

#[path = "../harness/chunks.rs"]
mod chunks;
#[path = "../harness/tls_record.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
