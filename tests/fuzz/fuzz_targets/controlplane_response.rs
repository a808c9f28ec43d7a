#![no_main]

#[path = "../harness/chunks.rs"]
mod chunks;
#[path = "../harness/controlplane_response.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
