//! Messages between a data shard and the control shard, over one
//! `SOCK_STREAM` socketpair per shard (both runtimes can wait on a socket:
//! io_uring on the shard side, glommio on the control side).
//!
//! Framing: `u32` little-endian length of the body, then the body. Bodies
//! start with a kind byte. Strings are `u16` LE length + UTF-8 bytes; a
//! list of strings is a `u8` count, then the strings; an optional string is
//! a `0` byte, or `1` and the string; a
//! [`PlacementFailure`] is one tag byte. The decoder is sans-IO: `decode(buf)` returns `Ok(None)` until a whole
//! message is there and consumes nothing.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Largest body either side accepts; a larger length is a protocol error.
pub const MAX_BODY: usize = 64 * 1024;

/// Shard → control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToControl {
    /// Where does `repl` live? `exclude` names every VM that failed in the
    /// session's attempts (at most `limits.max_attempts`, so a `u8` count
    /// suffices); the control shard also drops its cached placement for
    /// the repl if it points at one of them. `id` is echoed in the reply. `attempt` is 0 for a new
    /// session (admission control applies) and counts retries after it.
    Placement {
        id: u64,
        repl: String,
        cluster: String,
        attempt: u8,
        exclude: Vec<String>,
    },
}

/// Control → shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToShard {
    Placement { id: u64, result: PlacementResult },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementResult {
    /// Shared, not copied: a static placement hands out the same answer
    /// for every session of a repl, three strings each.
    Found(Arc<Found>),
    /// No placement: `retry_after_ms` is a hint for the client's Close
    /// reason.
    Failed {
        reason: PlacementFailure,
        retry_after_ms: Option<u64>,
    },
}

/// Why a placement could not be had. [`as_str`](Self::as_str) is the
/// metric label and the Close reason word. On the wire it is one tag byte,
/// the variant's position in [`ALL`](Self::ALL); both ends are this
/// program, so an unknown tag is a bug and decodes as
/// [`WireError::Malformed`] rather than as some catch-all reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementFailure {
    /// The Controlplane does not know the repl (404).
    UnknownRepl,
    /// No VM can take it (503, or static placement with every VM excluded).
    NoCapacity,
    Timeout,
    /// The Controlplane could not be reached, or answered 5xx.
    Unavailable,
    /// The breaker fails placements fast while the Controlplane is down.
    CircuitOpen,
    BadResponse,
    /// Admission control refused a new session.
    Admission,
}

impl PlacementFailure {
    /// Every variant, in tag order (`ALL[i] as usize == i`, which the
    /// control shard's per-reason counters also index by).
    pub const ALL: [PlacementFailure; 7] = [
        PlacementFailure::UnknownRepl,
        PlacementFailure::NoCapacity,
        PlacementFailure::Timeout,
        PlacementFailure::Unavailable,
        PlacementFailure::CircuitOpen,
        PlacementFailure::BadResponse,
        PlacementFailure::Admission,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PlacementFailure::UnknownRepl => "unknown_repl",
            PlacementFailure::NoCapacity => "no_capacity",
            PlacementFailure::Timeout => "timeout",
            PlacementFailure::Unavailable => "unavailable",
            PlacementFailure::CircuitOpen => "circuit_open",
            PlacementFailure::BadResponse => "bad_response",
            PlacementFailure::Admission => "admission",
        }
    }

    fn tag(self) -> u8 {
        self as u8
    }

    fn from_tag(tag: u8) -> Option<PlacementFailure> {
        Self::ALL.get(usize::from(tag)).copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub vm: String,
    /// Resolved address of Conman (the control shard resolves names).
    pub addr: SocketAddr,
    /// Host header value and request path for the upgrade to Conman.
    pub host: String,
    pub path: String,
    /// `wss://`: the name Conman's certificate must be valid for (the URL's
    /// host; sent as SNI unless it is an IP literal).
    pub tls: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message body too large")]
    TooLarge,
    #[error("malformed message")]
    Malformed,
}

const K_PLACEMENT_REQ: u8 = 1;
const K_PLACEMENT_FOUND: u8 = 2;
const K_PLACEMENT_FAILED: u8 = 3;

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&b[..n]);
}

/// At most 255 strings: the count is one byte.
fn put_strs(out: &mut Vec<u8>, list: &[String]) {
    let n = list.len().min(usize::from(u8::MAX));
    out.push(n as u8);
    for s in &list[..n] {
        put_str(out, s);
    }
}

fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, WireError> {
        let (&v, rest) = self.b.split_first().ok_or(WireError::Malformed)?;
        self.b = rest;
        Ok(v)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Malformed);
        }
        let (v, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(v)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Malformed)
    }
    /// A `u8` count bounds the list whatever the body says.
    fn strs(&mut self) -> Result<Vec<String>, WireError> {
        let n = self.u8()?;
        (0..n).map(|_| self.str()).collect()
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed)
        }
    }
}

/// Splits one framed body off `buf`: `Ok(None)` until it is complete.
fn body(buf: &[u8]) -> Result<Option<(&[u8], usize)>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    if len > MAX_BODY {
        return Err(WireError::TooLarge);
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + len], 4 + len)))
}

impl ToControl {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ToControl::Placement {
                id,
                repl,
                cluster,
                attempt,
                exclude,
            } => frame(out, |o| {
                o.push(K_PLACEMENT_REQ);
                o.extend_from_slice(&id.to_le_bytes());
                put_str(o, repl);
                put_str(o, cluster);
                o.push(*attempt);
                put_strs(o, exclude);
            }),
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Option<(ToControl, usize)>, WireError> {
        let Some((b, used)) = body(buf)? else {
            return Ok(None);
        };
        let mut r = Reader { b };
        let msg = match r.u8()? {
            K_PLACEMENT_REQ => {
                let id = r.u64()?;
                let repl = r.str()?;
                let cluster = r.str()?;
                let attempt = r.u8()?;
                let exclude = r.strs()?;
                ToControl::Placement {
                    id,
                    repl,
                    cluster,
                    attempt,
                    exclude,
                }
            }
            _ => return Err(WireError::Malformed),
        };
        r.end()?;
        Ok(Some((msg, used)))
    }
}

impl ToShard {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ToShard::Placement {
                id,
                result: PlacementResult::Found(f),
            } => frame(out, |o| {
                o.push(K_PLACEMENT_FOUND);
                o.extend_from_slice(&id.to_le_bytes());
                put_str(o, &f.vm);
                match f.addr.ip() {
                    IpAddr::V4(ip) => {
                        o.push(4);
                        o.extend_from_slice(&ip.octets());
                    }
                    IpAddr::V6(ip) => {
                        o.push(6);
                        o.extend_from_slice(&ip.octets());
                    }
                }
                o.extend_from_slice(&f.addr.port().to_le_bytes());
                put_str(o, &f.host);
                put_str(o, &f.path);
                match &f.tls {
                    None => o.push(0),
                    Some(name) => {
                        o.push(1);
                        put_str(o, name);
                    }
                }
            }),
            ToShard::Placement {
                id,
                result:
                    PlacementResult::Failed {
                        reason,
                        retry_after_ms,
                    },
            } => frame(out, |o| {
                o.push(K_PLACEMENT_FAILED);
                o.extend_from_slice(&id.to_le_bytes());
                o.push(reason.tag());
                o.extend_from_slice(&retry_after_ms.unwrap_or(u64::MAX).to_le_bytes());
            }),
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Option<(ToShard, usize)>, WireError> {
        let Some((b, used)) = body(buf)? else {
            return Ok(None);
        };
        let mut r = Reader { b };
        let msg = match r.u8()? {
            K_PLACEMENT_FOUND => {
                let id = r.u64()?;
                let vm = r.str()?;
                let ip: IpAddr = match r.u8()? {
                    4 => {
                        let o: [u8; 4] = r.bytes(4)?.try_into().unwrap();
                        o.into()
                    }
                    6 => {
                        let o: [u8; 16] = r.bytes(16)?.try_into().unwrap();
                        o.into()
                    }
                    _ => return Err(WireError::Malformed),
                };
                let port = r.u16()?;
                let host = r.str()?;
                let path = r.str()?;
                let tls = match r.u8()? {
                    0 => None,
                    1 => Some(r.str()?),
                    _ => return Err(WireError::Malformed),
                };
                ToShard::Placement {
                    id,
                    result: PlacementResult::Found(Arc::new(Found {
                        vm,
                        addr: SocketAddr::new(ip, port),
                        host,
                        path,
                        tls,
                    })),
                }
            }
            K_PLACEMENT_FAILED => {
                let id = r.u64()?;
                let reason = PlacementFailure::from_tag(r.u8()?).ok_or(WireError::Malformed)?;
                let ra = r.u64()?;
                ToShard::Placement {
                    id,
                    result: PlacementResult::Failed {
                        reason,
                        retry_after_ms: (ra != u64::MAX).then_some(ra),
                    },
                }
            }
            _ => return Err(WireError::Malformed),
        };
        r.end()?;
        Ok(Some((msg, used)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_shard(m: ToShard) {
        let mut out = Vec::new();
        m.encode(&mut out);
        for cut in 0..out.len() {
            assert_eq!(ToShard::decode(&out[..cut]), Ok(None));
        }
        assert_eq!(ToShard::decode(&out), Ok(Some((m, out.len()))));
    }

    fn roundtrip_control(m: ToControl) {
        let mut out = Vec::new();
        m.encode(&mut out);
        for cut in 0..out.len() {
            assert_eq!(ToControl::decode(&out[..cut]), Ok(None));
        }
        assert_eq!(ToControl::decode(&out), Ok(Some((m, out.len()))));
    }

    #[test]
    fn messages_round_trip_and_wait_for_whole_frames() {
        for exclude in [vec![], vec!["vm-2"], vec!["vm-2", "", "vm-0 é"]] {
            roundtrip_control(ToControl::Placement {
                id: 7,
                repl: "repl-1".into(),
                cluster: "us-east".into(),
                attempt: 2,
                exclude: exclude.into_iter().map(Into::into).collect(),
            });
        }
        for tls in [
            None,
            Some("::1".to_string()),
            Some("conman.internal".into()),
        ] {
            roundtrip_shard(ToShard::Placement {
                id: u64::MAX - 1,
                result: PlacementResult::Found(Arc::new(Found {
                    vm: "vm-1".into(),
                    addr: "[::1]:7000".parse().unwrap(),
                    host: "[::1]:7000".into(),
                    path: "/conman".into(),
                    tls,
                })),
            });
        }
        for (i, reason) in PlacementFailure::ALL.into_iter().enumerate() {
            for retry_after_ms in [None, Some(0), Some(1500), Some(u64::MAX - 1)] {
                roundtrip_shard(ToShard::Placement {
                    id: i as u64,
                    result: PlacementResult::Failed {
                        reason,
                        retry_after_ms,
                    },
                });
            }
        }
    }

    #[test]
    fn exclude_list_is_counted_and_bounded() {
        let req = |exclude: Vec<String>| ToControl::Placement {
            id: 1,
            repl: "r".into(),
            cluster: "c".into(),
            attempt: 3,
            exclude,
        };
        // Encoding keeps the first 255; the count byte cannot say more.
        let many: Vec<String> = (0..300).map(|i| format!("vm-{i}")).collect();
        let mut out = Vec::new();
        req(many.clone()).encode(&mut out);
        let (got, used) = ToControl::decode(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(got, req(many[..255].to_vec()));
        // A count larger than the strings that follow is malformed, and so
        // is a string left over after the count.
        let mut out = Vec::new();
        req(vec!["vm-1".into()]).encode(&mut out);
        let count_at = out.len() - (2 + 4) - 1;
        assert_eq!(out[count_at], 1);
        let mut more = out.clone();
        more[count_at] = 2;
        assert_eq!(ToControl::decode(&more), Err(WireError::Malformed));
        let mut fewer = out;
        fewer[count_at] = 0;
        assert_eq!(ToControl::decode(&fewer), Err(WireError::Malformed));
    }

    #[test]
    fn failure_tags_and_labels_are_stable() {
        let labels: Vec<&str> = PlacementFailure::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "unknown_repl",
                "no_capacity",
                "timeout",
                "unavailable",
                "circuit_open",
                "bad_response",
                "admission",
            ]
        );
        for (i, reason) in PlacementFailure::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i);
            assert_eq!(PlacementFailure::from_tag(reason.tag()), Some(reason));
        }
    }

    #[test]
    fn unknown_failure_tag_is_malformed() {
        let mut out = Vec::new();
        ToShard::Placement {
            id: 9,
            result: PlacementResult::Failed {
                reason: PlacementFailure::Admission,
                retry_after_ms: Some(5),
            },
        }
        .encode(&mut out);
        // Kind byte, 8 bytes of id, then the tag.
        let tag_at = 4 + 1 + 8;
        assert_eq!(out[tag_at], PlacementFailure::Admission.tag());
        for bad in [PlacementFailure::ALL.len() as u8, 0x80, u8::MAX] {
            out[tag_at] = bad;
            assert_eq!(ToShard::decode(&out), Err(WireError::Malformed), "{bad}");
        }
    }

    #[test]
    fn oversized_and_garbage_are_errors() {
        assert_eq!(
            ToShard::decode(&(MAX_BODY as u32 + 1).to_le_bytes()),
            Err(WireError::TooLarge)
        );
        assert_eq!(
            ToControl::decode(&[1, 0, 0, 0, 99]),
            Err(WireError::Malformed)
        );
    }
}
