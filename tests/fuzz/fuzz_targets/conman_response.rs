#![no_main]

#[path = "../harness/chunks.rs"]
mod chunks;
#[path = "../harness/conman_response.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
