//! TLS on the public listener: certificates from `[[tls.certs]]`, chosen by
//! SNI, and the one rustls server config every shard shares; and TLS to
//! Conman (`wss://` URLs, `[conman.tls]`): the client config, its CAs and
//! the proxy's own certificate. The bytes of each connection go through a
//! per-session transport (`session/tls.rs`), driven sans-IO by the session
//! machine.
//!
//! Crypto provider: *ring* by default; the `aws-lc` cargo feature swaps in
//! aws-lc-rs. The choice was measured (bench/README.md, "Crypto provider").

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as provider;
#[cfg(not(feature = "aws-lc"))]
use rustls::crypto::ring as provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

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

/// Conman sessions remembered for resumption (one per VM is enough to
/// resume; a few per VM covers both TLS versions and ticket reuse rules).
const CONMAN_SESSION_CACHE: usize = 4096;

/// The client config for `wss://` Conman URLs: Conman's certificate must
/// chain to a CA in `ca_file` and be valid for the URL's host (a DNS name,
/// sent as SNI; or an IP literal, matched against IP SANs, no SNI: rustls
/// does both from the `ServerName`). With `client`, the proxy presents
/// that certificate to a Conman that asks for one.
pub fn conman_client_config(
    ca_file: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = load_roots(ca_file)?;
    let builder = ClientConfig::builder_with_provider(Arc::new(crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder.with_client_cert_resolver(Arc::new(ClientCert(Arc::new(
            load_certified_key(cert, key)?,
        )))),
    };
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(CONMAN_SESSION_CACHE);
    Ok(Arc::new(cfg))
}

/// The CAs of a PEM bundle; one that holds none is an error (it would
/// refuse every peer).
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = RootCertStore::empty();
    for der in rustls_pemfile::certs(&mut &pem[..]) {
        let der = der.map_err(|e| format!("{}: {e}", path.display()))?;
        roots
            .add(der)
            .map_err(|e| format!("{}: a CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate in it", path.display()));
    }
    Ok(roots)
}

/// Verifies client certificates against the CAs in `ca_file`; with
/// `optional`, a client may also send none.
pub fn client_verifier(ca_file: &Path, optional: bool) -> Result<ClientVerifier, String> {
    let roots = Arc::new(load_roots(ca_file)?);
    let b = WebPkiClientVerifier::builder_with_provider(roots, Arc::new(crypto_provider()));
    let b = if optional {
        b.allow_unauthenticated()
    } else {
        b
    };
    b.build().map_err(|e| format!("{}: {e}", ca_file.display()))
}

/// Longest client subject logged; a longer one is cut.
const SUBJECT_MAX: usize = 128;

/// What the access log says of a verified client certificate: its
/// subject's common name, else its first DNS name; bytes outside printable
/// ASCII become `?`, so a certificate cannot forge log fields.
pub fn peer_subject(der: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    let name =
        common_name(cert.subject()).or_else(|| cert.valid_dns_names().next().map(str::as_bytes))?;
    Some(
        name.iter()
            .take(SUBJECT_MAX)
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '?'
                }
            })
            .collect(),
    )
}

/// The value of the first CN attribute of a DER `Name` (its content: a
/// sequence of SETs of `SEQUENCE { OID, value }`).
fn common_name(mut name: &[u8]) -> Option<&[u8]> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (set, rest) = der_item(name, 0x31)?;
        name = rest;
        let mut set = set;
        while !set.is_empty() {
            let (atv, rest) = der_item(set, 0x30)?;
            set = rest;
            let (oid, value) = der_item(atv, 0x06)?;
            if oid == CN {
                // Any string type: UTF8String, PrintableString, IA5String…
                let tag = *value.first()?;
                return der_item(value, tag).map(|(v, _)| v);
            }
        }
    }
    None
}

/// One DER item with `tag`: its content and what follows it.
fn der_item(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    let (&len, rest) = rest.split_first()?;
    if t != tag {
        return None;
    }
    let (len, rest) = match len {
        0..=0x7f => (usize::from(len), rest),
        0x81 => (usize::from(*rest.first()?), &rest[1..]),
        0x82 => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            &rest[2..],
        ),
        _ => return None,
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The proxy's one client certificate, whatever Conman hints at: a Conman
/// that does not accept it says so with an alert.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client certificate verifier (see [`client_verifier`]).
pub type ClientVerifier = Arc<dyn rustls::server::danger::ClientCertVerifier>;

/// Builds the server config, or says which entry failed and why; with
/// `clients`, clients are asked for a certificate that it verifies.
pub fn server_config(
    certs: &[TlsCert],
    clients: Option<ClientVerifier>,
) -> Result<Arc<ServerConfig>, (usize, String)> {
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
    build(resolver, clients).map_err(|m| (0, m))
}

fn build(
    resolver: SniResolver,
    clients: Option<ClientVerifier>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(crypto_provider());
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(v) => builder.with_client_cert_verifier(v),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    // Stateless tickets whose keys rotate (every 6 h, the previous key
    // still accepted): one ticketer in the one config all shards share, so
    // a ticket from any shard resumes on any other.
    cfg.ticketer = provider::Ticketer::new().map_err(|e| e.to_string())?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    // After a TLS 1.3 handshake the session seals and opens records itself
    // (`proto::tls_record`): rustls hands over the keys, and logs the
    // traffic secrets KeyUpdate derives the next keys from, to a catcher
    // that keeps them in memory only.
    cfg.enable_secret_extraction = true;
    cfg.key_log = crate::proto::tls_record::capture::key_log();
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
        pair_with(versions, crypto_provider())
    }

    /// A server config and a client offering only `suites` (TLS 1.3).
    pub fn pair_offering(
        suites: &[rustls::SupportedCipherSuite],
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: suites.to_vec(),
            ..crypto_provider()
        };
        pair_with(&[&rustls::version::TLS13], provider)
    }

    fn pair_with(
        versions: &[&'static rustls::SupportedProtocolVersion],
        client_provider: rustls::crypto::CryptoProvider,
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["eval.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let signer = provider::sign::any_supported_type(&der).unwrap();
        let server = build(
            SniResolver {
                entries: vec![SniEntry {
                    names: vec!["eval.test".into()],
                    key: Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer)),
                }],
            },
            None,
        )
        .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
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
    let (chain, der) = read_pem_pair(cert, key)?;
    let signer =
        provider::sign::any_supported_type(&der).map_err(|e| format!("{}: {e}", key.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    Ok(ck)
}

/// A certificate chain and its private key, from PEM files.
pub fn read_pem_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
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
    Ok((chain, der))
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
    fn peer_subject_is_the_common_name_else_the_first_dns_name() {
        let key = rcgen::KeyPair::generate().unwrap();
        let make = |cn: Option<&str>, sans: &[&str]| {
            let mut p = rcgen::CertificateParams::new(
                sans.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
            .unwrap();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, "Org");
            if let Some(cn) = cn {
                p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            }
            p.self_signed(&key).unwrap().der().clone()
        };
        let subject = |cn, sans: &[&str]| peer_subject(&make(cn, sans));
        assert_eq!(
            subject(Some("alice"), &["a.test"]).as_deref(),
            Some("alice")
        );
        assert_eq!(
            subject(None, &["a.test", "b.test"]).as_deref(),
            Some("a.test")
        );
        assert_eq!(subject(None, &[]), None);
        assert_eq!(
            subject(Some("bad\nline \"x\""), &[]).as_deref(),
            Some("bad?line \"x\"")
        );
        let long = "x".repeat(300);
        assert_eq!(subject(Some(&long), &[]).unwrap().len(), SUBJECT_MAX);
        assert_eq!(
            peer_subject(&CertificateDer::from(vec![0x30, 0x03, 1])),
            None
        );
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
        assert!(server_config(&[entry(&c, &k)], None).is_ok());
        let (i, m) = server_config(&[entry(&c, &k), entry(&c, &o)], None).unwrap_err();
        assert_eq!(i, 1);
        assert!(m.contains("does not match"), "{m}");
        let (_, m) = server_config(&[entry(&k, &k)], None).unwrap_err();
        assert!(m.contains("no certificate"), "{m}");
        let (_, m) = server_config(&[entry(&c, &c)], None).unwrap_err();
        assert!(m.contains("no private key"), "{m}");
        let (_, m) = server_config(&[entry(&dir.join("none"), &k)], None).unwrap_err();
        assert!(m.contains("cannot read"), "{m}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
