//! `eval-proxy --dev --tls`: a throwaway CA and a certificate it signed for
//! `localhost` and the loopback addresses, so a browser or a client that
//! trusts the CA can open `wss://` at once. Never for production: the files
//! go to a scratch directory, and the CA's private key is never written.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::config::TlsCert;

/// The files made: the CA to trust, and the `[[tls.certs]]` entry.
pub struct DevTls {
    pub ca: PathBuf,
    pub cert: TlsCert,
}

/// Writes `ca.pem`, `cert.pem` and `key.pem` (mode 0600) into `dir`.
pub fn generate(dir: &Path) -> Result<DevTls, String> {
    let err = |e: rcgen::Error| format!("generating the dev certificate: {e}");
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "eval-proxy --dev throwaway CA");
    let ca = ca.self_signed(&ca_key).map_err(err)?;
    let key = KeyPair::generate().map_err(err)?;
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let mut leaf = CertificateParams::new(names).map_err(err)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf = leaf.signed_by(&key, &ca, &ca_key).map_err(err)?;
    let write = |name: &str, text: String, private: bool| -> Result<PathBuf, String> {
        let path = dir.join(name);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if private {
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        }
        std::io::Write::write_all(
            &mut opts
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?,
            text.as_bytes(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    };
    Ok(DevTls {
        ca: write("ca.pem", ca.pem(), false)?,
        cert: TlsCert {
            cert: write("cert.pem", leaf.pem(), false)?,
            key: write("key.pem", key.serialize_pem(), true)?,
            names: vec!["localhost".into()],
        },
    })
}
