//! The two URL shapes the proxy reads: `ws[s]://HOST[:PORT][/PATH]` for
//! Conman and `http://HOST[:PORT][/PREFIX]` for the Controlplane. Conman
//! may speak TLS (`wss://`, port 443 by default; see `conman.tls`); the
//! Controlplane client does not, so `https://` is refused by name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("TLS not supported")]
    TlsNotSupported,
    #[error("unsupported scheme")]
    Scheme,
    #[error("invalid host")]
    Host,
    #[error("invalid port")]
    Port,
    #[error("invalid path")]
    Path,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// A name or an IP literal, without brackets.
    pub host: String,
    pub port: u16,
    /// Origin-form, query included; "/" when the URL has none. For the
    /// Controlplane it is a prefix put before `/v1/placement`.
    pub path: String,
    /// `wss://`: TLS to Conman, verified against `host`.
    pub tls: bool,
}

impl Url {
    /// The Host header value: brackets back on an IPv6 literal, and the port
    /// unless it is the scheme's default.
    pub fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default_port(self.tls) {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The host as an address when it is an IP literal, so that no resolver
    /// is needed.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

pub fn parse_ws(s: &str) -> Result<Url, UrlError> {
    parse(s, "ws", true)
}

pub fn parse_http(s: &str) -> Result<Url, UrlError> {
    parse(s, "http", false)
}

fn parse(s: &str, want: &str, tls_ok: bool) -> Result<Url, UrlError> {
    let (scheme, rest) = s.split_once("://").ok_or(UrlError::Scheme)?;
    let tls = !scheme.eq_ignore_ascii_case(want);
    if tls {
        let secure = format!("{want}s");
        if !scheme.eq_ignore_ascii_case(&secure) {
            return Err(UrlError::Scheme);
        }
        if !tls_ok {
            return Err(UrlError::TlsNotSupported);
        }
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']').ok_or(UrlError::Host)?;
        v6.parse::<Ipv6Addr>().map_err(|_| UrlError::Host)?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or(UrlError::Host)?),
        };
        (v6, port)
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if !authority.starts_with('[') && !valid_name_or_ipv4(host) {
        return Err(UrlError::Host);
    }
    let port = match port {
        None => default_port(tls),
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => return Err(UrlError::Port),
                Ok(port) => port,
            }
        }
        Some(_) => return Err(UrlError::Port),
    };
    // The path goes into a request line verbatim; a fragment never does.
    if !path.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
        return Err(UrlError::Path);
    }
    let path = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    Ok(Url {
        host: host.to_owned(),
        port,
        path,
        tls,
    })
}

/// DNS-style names (underscores allowed, as internal names have them) and
/// dotted IPv4; digits-and-dots must be a real address so that `999.1.1.1`
/// is never sent to a resolver.
fn valid_name_or_ipv4(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host.parse::<Ipv4Addr>().is_ok();
    }
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Percent-encodes a query value: RFC 3986 unreserved bytes pass, every
/// other byte becomes `%XX`.
pub fn encode_query_value(out: &mut String, v: &str) {
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
}

/// Decodes a query value ([`encode_query_value`]'s inverse; `+` is a
/// space, as HTML forms and curl's `--data-urlencode` write it). `None`
/// for a bad escape or bytes that are not UTF-8.
pub fn decode_query_value(v: &str) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut bytes = v.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls() {
        let u = parse_ws("ws://10.0.0.5:8080/conman?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("10.0.0.5", 8080, "/conman?x=1")
        );
        assert_eq!(u.host_header(), "10.0.0.5:8080");
        assert_eq!(u.ip(), Some("10.0.0.5".parse().unwrap()));

        let u = parse_ws("WS://conman-3.internal").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert_eq!(u.host_header(), "conman-3.internal");
        assert_eq!(u.ip(), None);

        let u = parse_ws("ws://[::1]:7000?a").unwrap();
        assert_eq!((u.host.as_str(), u.path.as_str()), ("::1", "/?a"));
        assert_eq!(u.host_header(), "[::1]:7000");
        assert!(!u.tls);

        let u = parse_ws("WSS://conman-3.internal/x").unwrap();
        assert!(u.tls);
        assert_eq!(
            (u.port, u.host_header().as_str()),
            (443, "conman-3.internal")
        );
        let u = parse_ws("wss://10.0.0.5:8443").unwrap();
        assert_eq!(u.host_header(), "10.0.0.5:8443");
        assert_eq!(parse_ws("ws://a:443/").unwrap().host_header(), "a:443");
    }

    #[test]
    fn bad_urls() {
        assert_eq!(parse_http("https://a/"), Err(UrlError::TlsNotSupported));
        assert_eq!(parse_ws("http://a/"), Err(UrlError::Scheme));
        assert_eq!(parse_ws("a:1"), Err(UrlError::Scheme));
        assert_eq!(parse_ws("ws://a:0/"), Err(UrlError::Port));
        assert_eq!(parse_ws("ws://a:99999/"), Err(UrlError::Port));
        assert_eq!(parse_ws("ws://a:/"), Err(UrlError::Port));
        assert_eq!(parse_ws("ws://999.1.1.1/"), Err(UrlError::Host));
        assert_eq!(parse_ws("ws://a b/"), Err(UrlError::Host));
        assert_eq!(parse_ws("ws:///x"), Err(UrlError::Host));
        assert_eq!(parse_ws("ws://[::1/"), Err(UrlError::Host));
        assert_eq!(parse_ws("ws://a/x y"), Err(UrlError::Path));
        assert_eq!(parse_ws("ws://a/x#f"), Err(UrlError::Path));
    }

    #[test]
    fn http_base_urls_keep_their_prefix() {
        let u = parse_http("http://127.0.0.1:9000").unwrap();
        assert_eq!(u.path, "/");
        let u = parse_http("http://cp.internal/api").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/api"));
    }

    #[test]
    fn query_values_round_trip() {
        for v in ["repl-1", "a b&c=d/é", "%", ""] {
            let mut s = String::new();
            encode_query_value(&mut s, v);
            assert!(s.bytes().all(|b| b.is_ascii_graphic()), "{s}");
            assert!(!s.contains(['&', '=', ' ']), "{s}");
            assert_eq!(decode_query_value(&s).as_deref(), Some(v));
        }
        assert_eq!(decode_query_value("a+b%2B").as_deref(), Some("a b+"));
        for bad in ["%", "%4", "%zz", "%ff"] {
            assert_eq!(decode_query_value(bad), None, "{bad}");
        }
    }
}
