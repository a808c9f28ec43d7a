//! End-to-end relay through the real binary: echo, fragmentation, large
//! messages, close handshakes, Conman failures.

mod support;

use support::*;
use tungstenite::Message;

#[test]
fn echo_text_and_binary() {
    let conman = echo_conman();
    let proxy = Proxy::start(&config_for(conman.local_addr, ""), &["--shards", "1"]);
    let mut ws = connect(&proxy.url(&dev_token("r1")));
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    let bin: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(bin.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(bin));
    ws.close(None).unwrap();
}
