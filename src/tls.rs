//! TLS on the public listener: certificates from `[[tls.certs]]`, chosen by
//! SNI, and the one rustls server config every shard shares. The bytes of
//! each connection go through a per-session transport
//! (`session/tls.rs`), driven sans-IO by the session machine.
//!
//! Crypto provider: *ring* by default; the `aws-lc` cargo feature swaps in
//! aws-lc-rs. The choice was measured (bench/README.md, "Crypto provider").

use std::fmt;
use std::path::Path;
use std::sync::Arc;

#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as provider;
#[cfg(not(feature = "aws-lc"))]
use rustls::crypto::ring as provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::TlsCert;

/// The only application protocol spoken over TLS: WebSocket upgrades are
/// HTTP/1.1 requests.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Ciphertext plus plaintext rustls may hold outgoing per connection. The
/// session seals at most `SEAL_MAX` bytes and takes the records out at
/// once, so this is only reached inside one large write, which is then
/// done in steps.
pub const BUFFER_LIMIT: usize = 64 * 1024;

/// The crypto provider every TLS config of this build uses (the load
/// generator's client too, so both ends of a benchmark agree).
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    provider::default_provider()
}

/// TLS 1.2 session-id cache (clients without tickets), per process.
const SESSION_CACHE: usize = 4096;

/// Builds the server config, or says which entry failed and why.
pub fn server_config(certs: &[TlsCert]) -> Result<Arc<ServerConfig>, (usize, String)> {
    let mut resolver = SniResolver::default();
    for (i, c) in certs.iter().enumerate() {
        let key = load_certified_key(&c.cert, &c.key).map_err(|m| (i, m))?;
        let names = c
            .names
            .iter()
            .map(|n| n.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        resolver.entries.push(SniEntry {
            names,
            key: Arc::new(key),
        });
    }
    build(resolver).map_err(|m| (0, m))
}

fn build(resolver: SniResolver) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(crypto_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // Stateless tickets whose keys rotate (every 6 h, the previous key
    // still accepted): one ticketer in the one config all shards share, so
    // a ticket from any shard resumes on any other.
    cfg.ticketer = provider::Ticketer::new().map_err(|e| e.to_string())?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    let cfg = Arc::new(cfg);
    // A config that cannot make a connection would fail every client; find
    // out now rather than at the first accept.
    rustls::ServerConnection::new(cfg.clone()).map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// A server config with a fresh self-signed certificate for `eval.test`,
/// and a client config that trusts it (and offers http/1.1), for the
/// sans-IO tests.
#[cfg(test)]
pub mod testkit {
    use super::*;

    pub fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["eval.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signer = provider::sign::any_supported_type(&der).unwrap();
        let server = build(SniResolver {
            entries: vec![SniEntry {
                names: vec!["eval.test".into()],
                key: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)),
            }],
        })
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client =
            rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        (server, Arc::new(client))
    }

    pub fn client(cfg: &Arc<rustls::ClientConfig>) -> rustls::ClientConnection {
        let name = rustls::pki_types::ServerName::try_from("eval.test").unwrap();
        rustls::ClientConnection::new(cfg.clone(), name).unwrap()
    }
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let pem = std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let chain = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let pem = std::fs::read(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let der = rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key in it", key.display()))?;
    let signer =
        provider::sign::any_supported_type(&der).map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    Ok(ck)
}

struct SniEntry {
    /// Lowercase, no trailing dot; `*.suffix` matches one label.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// Picks a certificate by the name the client asked for: an exact name
/// first, then a wildcard, else the first certificate (clients without SNI,
/// or asking for a name nobody lists: they get a certificate they can
/// check and refuse, rather than a bare handshake failure).
#[derive(Default)]
pub struct SniResolver {
    entries: Vec<SniEntry>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&Vec<String>> = self.entries.iter().map(|e| &e.names).collect();
        f.debug_struct("SniResolver")
            .field("names", &names)
            .finish()
    }
}

impl SniResolver {
    /// The index of the entry for `sni` (already lowercase, per rustls).
    fn pick(&self, sni: Option<&str>) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let Some(sni) = sni.map(|s| s.trim_end_matches('.')) else {
            return Some(0);
        };
        let exact = self
            .entries
            .iter()
            .position(|e| e.names.iter().any(|n| n == sni));
        let wild = || {
            let (_, parent) = sni.split_once('.')?;
            self.entries
                .iter()
                .position(|e| e.names.iter().any(|n| n.strip_prefix("*.") == Some(parent)))
        };
        exact.or_else(wild).or(Some(0))
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let i = self.pick(hello.server_name())?;
        Some(self.entries[i].key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(names: &[&[&str]]) -> SniResolver {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signer = provider::sign::any_supported_type(&der).unwrap();
        let ck = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer));
        SniResolver {
            entries: names
                .iter()
                .map(|ns| SniEntry {
                    names: ns.iter().map(|n| n.to_string()).collect(),
                    key: ck.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first() {
        let r = resolver(&[
            &["default.test"],
            &["*.apps.test"],
            &["a.apps.test", "b.test"],
        ]);
        assert_eq!(r.pick(Some("a.apps.test")), Some(2), "exact beats wildcard");
        assert_eq!(r.pick(Some("z.apps.test")), Some(1));
        assert_eq!(r.pick(Some("b.test.")), Some(2), "trailing dot");
        assert_eq!(
            r.pick(Some("x.z.apps.test")),
            Some(0),
            "a wildcard is one label"
        );
        assert_eq!(r.pick(Some("apps.test")), Some(0));
        assert_eq!(r.pick(Some("nobody.test")), Some(0));
        assert_eq!(r.pick(None), Some(0));
        assert_eq!(resolver(&[]).pick(Some("a.test")), None);
    }

    #[test]
    fn loading_says_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("eval-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k, o) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("o.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(&o, other.serialize_pem()).unwrap();
        let entry = |cert: &Path, key: &Path| TlsCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            names: vec!["a.test".into()],
        };
        assert!(server_config(&[entry(&c, &k)]).is_ok());
        let (i, m) = server_config(&[entry(&c, &k), entry(&c, &o)]).unwrap_err();
        assert_eq!(i, 1);
        assert!(m.contains("does not match"), "{m}");
        let (_, m) = server_config(&[entry(&k, &k)]).unwrap_err();
        assert!(m.contains("no certificate"), "{m}");
        let (_, m) = server_config(&[entry(&c, &c)]).unwrap_err();
        assert!(m.contains("no private key"), "{m}");
        let (_, m) = server_config(&[entry(&dir.join("none"), &k)]).unwrap_err();
        assert!(m.contains("cannot read"), "{m}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
