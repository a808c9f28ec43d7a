//! Stand-in control shard for static placement until the glommio control
//! shard lands: one thread, poll(2) over the shard sockets.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use crate::config::StaticPlacement;
use crate::control::wire::{Found, PlacementResult, ToControl, ToShard};

pub fn spawn(
    placement: StaticPlacement,
    fds: Vec<OwnedFd>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            let mut socks: Vec<(UnixStream, Vec<u8>)> = fds
                .into_iter()
                .map(|fd| (UnixStream::from(fd), Vec::new()))
                .collect();
            let mut buf = [0u8; 4096];
            while !socks.is_empty() {
                let mut pfds: Vec<libc::pollfd> = socks
                    .iter()
                    .map(|(s, _)| libc::pollfd {
                        fd: s.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    })
                    .collect();
                // SAFETY: valid pollfd array.
                unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as _, -1) };
                let mut dead = Vec::new();
                for (i, p) in pfds.iter().enumerate() {
                    if p.revents == 0 {
                        continue;
                    }
                    let (s, inbuf) = &mut socks[i];
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => {
                            dead.push(i);
                            continue;
                        }
                        Ok(n) => inbuf.extend_from_slice(&buf[..n]),
                    }
                    let mut out = Vec::new();
                    while let Ok(Some((msg, used))) = ToControl::decode(inbuf) {
                        inbuf.drain(..used);
                        let ToControl::Placement { id, repl, .. } = msg;
                        let result = match placement.lookup(&repl) {
                            Some(p) => PlacementResult::Found(Found {
                                vm: "static".into(),
                                addr: p.addr,
                                host: p.url.host_header(),
                                path: p.url.path.clone(),
                            }),
                            None => PlacementResult::Failed {
                                reason: "unknown_repl".into(),
                                retry_after_ms: None,
                            },
                        };
                        ToShard::Placement { id, result }.encode(&mut out);
                    }
                    if s.write_all(&out).is_err() {
                        dead.push(i);
                    }
                }
                for i in dead.into_iter().rev() {
                    socks.remove(i);
                }
            }
        })
}
