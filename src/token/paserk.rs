//! Keys: the PASERK-style text forms (`k4.public.`, `k4.secret.`), key
//! files, and [`KeySet`], the public keys a proxy trusts, by kid.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey, KEYPAIR_LENGTH, PUBLIC_KEY_LENGTH};

const PASERK_PUBLIC: &str = "k4.public.";
const PASERK_SECRET: &str = "k4.secret.";

/// What is wrong with a key's text form. Never includes the key text (a
/// secret key must not reach a log either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("expected a `{0}<base64url>` key")]
    WrongPrefix(&'static str),
    #[error("key is not unpadded base64url")]
    Base64,
    #[error("key has the wrong length")]
    Length,
    #[error("not a usable Ed25519 public key (invalid or small-order point)")]
    InvalidPublicKey,
    #[error("public half of the secret key does not match its seed")]
    KeypairMismatch,
    #[error("file name is not `<kid>.pub`")]
    FileName,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        reason: KeyFormatError,
    },
    #[error("{}: no `<kid>.pub` key files", path.display())]
    NoKeys { path: PathBuf },
    #[error(transparent)]
    Format(#[from] KeyFormatError),
}

impl KeyFileError {
    fn io(path: &Path) -> impl FnOnce(io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Public keys by kid. A handful of keys at most (current + next during a
/// rotation), so a linear scan beats hashing the kid.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<(Box<str>, VerifyingKey)>,
}

impl KeySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key, replacing any key that already has this kid.
    pub fn insert(&mut self, kid: &str, key: VerifyingKey) {
        match self.keys.iter_mut().find(|(k, _)| &**k == kid) {
            Some(slot) => slot.1 = key,
            None => self.keys.push((kid.into(), key)),
        }
    }

    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| &**k == kid).map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Reads a key directory or a single key file: one public key per file
    /// `<kid>.pub` containing `k4.public.<base64url 32 bytes>` (PASERK public
    /// form; surrounding whitespace ignored). In a directory, files without
    /// the `.pub` extension are skipped so secrets or notes can sit beside
    /// them; finding no key at all is an error, since a proxy without keys
    /// would refuse every session. Errors name the offending file.
    pub fn load_dir(path: &Path) -> Result<Self, KeyFileError> {
        let meta = std::fs::metadata(path).map_err(KeyFileError::io(path))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).map_err(KeyFileError::io(path))? {
                let file = entry.map_err(KeyFileError::io(path))?.path();
                if file.extension() == Some(OsStr::new("pub")) {
                    files.push(file);
                }
            }
            // read_dir order is unspecified; sorting makes the reported bad file reproducible.
            files.sort();
        } else {
            files.push(path.to_path_buf());
        }
        let mut set = Self::new();
        for file in files {
            let invalid = |reason| KeyFileError::Invalid {
                path: file.clone(),
                reason,
            };
            let kid = kid_from_file_name(&file).ok_or_else(|| invalid(KeyFormatError::FileName))?;
            let text = std::fs::read_to_string(&file).map_err(KeyFileError::io(&file))?;
            let key = decode_public(&text).map_err(|e| match e {
                KeyFileError::Format(reason) => invalid(reason),
                other => other,
            })?;
            set.insert(kid, key);
        }
        if set.is_empty() {
            return Err(KeyFileError::NoKeys {
                path: path.to_path_buf(),
            });
        }
        Ok(set)
    }
}

fn kid_from_file_name(file: &Path) -> Option<&str> {
    if file.extension() != Some(OsStr::new("pub")) {
        return None;
    }
    file.file_stem()?.to_str().filter(|kid| !kid.is_empty())
}

/// `k4.secret.<base64url(seed || public)>`.
pub fn encode_secret(k: &SigningKey) -> String {
    let mut out = String::from(PASERK_SECRET);
    URL_SAFE_NO_PAD.encode_string(k.to_keypair_bytes(), &mut out);
    out
}

/// Parses `k4.secret.…`; surrounding whitespace is ignored and the public
/// half must match the seed.
pub fn decode_secret(s: &str) -> Result<SigningKey, KeyFileError> {
    let bytes: [u8; KEYPAIR_LENGTH] = decode_paserk(s, PASERK_SECRET)?;
    SigningKey::from_keypair_bytes(&bytes).map_err(|_| KeyFormatError::KeypairMismatch.into())
}

/// `k4.public.<base64url(public key)>`.
pub fn encode_public(k: &VerifyingKey) -> String {
    let mut out = String::from(PASERK_PUBLIC);
    URL_SAFE_NO_PAD.encode_string(k.as_bytes(), &mut out);
    out
}

/// Parses `k4.public.…`; surrounding whitespace is ignored. Small-order
/// ("weak") keys are refused here rather than failing every token later.
pub fn decode_public(s: &str) -> Result<VerifyingKey, KeyFileError> {
    let bytes: [u8; PUBLIC_KEY_LENGTH] = decode_paserk(s, PASERK_PUBLIC)?;
    match VerifyingKey::from_bytes(&bytes) {
        Ok(key) if !key.is_weak() => Ok(key),
        _ => Err(KeyFormatError::InvalidPublicKey.into()),
    }
}

fn decode_paserk<const N: usize>(s: &str, prefix: &'static str) -> Result<[u8; N], KeyFormatError> {
    let b64 = s
        .trim()
        .strip_prefix(prefix)
        .ok_or(KeyFormatError::WrongPrefix(prefix))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| KeyFormatError::Base64)?;
    bytes.try_into().map_err(|_| KeyFormatError::Length)
}

#[cfg(test)]
mod tests {
    use std::fmt;

    use super::*;
    use crate::token::testkit::{b64, claims, hex, key, keys, opts, NOW};
    use crate::token::{mint, verify};
    use rstest::rstest;

    #[test]
    fn insert_replaces_same_kid() {
        let mut set = keys();
        set.insert("k1", key(3).verifying_key());
        assert_eq!(set.len(), 2);
        let token = mint(&claims(), "k1", &key(3));
        assert_eq!(verify(&token, &set, NOW, &opts()), Ok(claims()));
    }

    // PASERK k4 vectors (paseto-standard/test-vectors, PASERK/k4.*.json).
    // The k4.public vectors only test the encoding: their bytes are not
    // usable Ed25519 points, so `decode_public` must still refuse them.
    #[rstest]
    #[case::k4_public_1(
        "0000000000000000000000000000000000000000000000000000000000000000",
        "k4.public.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    )]
    #[case::k4_public_2(
        "707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f",
        "k4.public.cHFyc3R1dnd4eXp7fH1-f4CBgoOEhYaHiImKi4yNjo8"
    )]
    #[case::k4_public_3(
        "707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e90",
        "k4.public.cHFyc3R1dnd4eXp7fH1-f4CBgoOEhYaHiImKi4yNjpA"
    )]
    fn paserk_public_vectors(#[case] key_hex: &str, #[case] paserk: &str) {
        let raw: [u8; PUBLIC_KEY_LENGTH] = decode_paserk(paserk, PASERK_PUBLIC).unwrap();
        assert_eq!(raw.as_slice(), hex(key_hex));
        assert_eq!(
            format_err(decode_public(paserk)),
            KeyFormatError::InvalidPublicKey
        );
    }

    #[test]
    fn paserk_public_round_trips() {
        let pk = key(1).verifying_key();
        assert_eq!(decode_public(&encode_public(&pk)).unwrap(), pk);
    }

    #[rstest]
    #[case::k4_secret_1(
        "00000000000000000000000000000000000000000000000000000000000000003b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
        "k4.secret.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA7aie8zrakLWKjqNAqbw1zZTIVdx3iQ6Y6wEihi1naKQ"
    )]
    #[case::k4_secret_2(
        "707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e8f1ce56a48c82ff99162a14bc544612674e5d61fb9317e65d4055780fdbcb4dc35",
        "k4.secret.cHFyc3R1dnd4eXp7fH1-f4CBgoOEhYaHiImKi4yNjo8c5WpIyC_5kWKhS8VEYSZ05dYfuTF-ZdQFV4D9vLTcNQ"
    )]
    #[case::k4_secret_3(
        "707172737475767778797a7b7c7d7e7f808182838485868788898a8b8c8d8e9060fe37571a5d6e7d30b15154ce4a9fb92c70c870848f4ccdf1626588097f73f7",
        "k4.secret.cHFyc3R1dnd4eXp7fH1-f4CBgoOEhYaHiImKi4yNjpBg_jdXGl1ufTCxUVTOSp-5LHDIcISPTM3xYmWICX9z9w"
    )]
    fn paserk_secret_vectors(#[case] key_hex: &str, #[case] paserk: &str) {
        let key = decode_secret(paserk).unwrap();
        assert_eq!(key.to_keypair_bytes().as_slice(), hex(key_hex));
        assert_eq!(encode_secret(&key), paserk);
    }

    fn format_err(r: Result<impl fmt::Debug, KeyFileError>) -> KeyFormatError {
        match r.unwrap_err() {
            KeyFileError::Format(e) => e,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paserk_rejects() {
        let pk = encode_public(&key(1).verifying_key());
        let sk = encode_secret(&key(1));
        assert_eq!(
            format_err(decode_public(&pk.replace("k4.", "k2."))),
            KeyFormatError::WrongPrefix("k4.public.")
        );
        assert_eq!(
            format_err(decode_public(&sk)),
            KeyFormatError::WrongPrefix("k4.public.")
        );
        assert_eq!(
            format_err(decode_public(&format!("{pk}="))),
            KeyFormatError::Base64
        );
        // k4.secret-fail-1: a 31-byte key.
        let short = format!("k4.secret.{}", b64(&[0x70; 31]));
        assert_eq!(format_err(decode_secret(&short)), KeyFormatError::Length);
        let long = format!("k4.public.{}", b64(&[0x70; 33]));
        assert_eq!(format_err(decode_public(&long)), KeyFormatError::Length);
        let mut pair = key(1).to_keypair_bytes();
        pair[63] ^= 1;
        let mismatched = format!("k4.secret.{}", b64(&pair));
        assert_eq!(
            format_err(decode_secret(&mismatched)),
            KeyFormatError::KeypairMismatch
        );
        // Whitespace around a key (a file's trailing newline) is fine.
        assert!(decode_public(&format!("  {pk}\n")).is_ok());
        // Messages never echo the key text.
        let shown = format!("{:?}", decode_secret(&mismatched).unwrap_err());
        assert!(!shown.contains(&mismatched[10..20]));
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("token-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, file: &str, text: &str) -> PathBuf {
            let path = self.0.join(file);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn load_dir_reads_pub_files() {
        let dir = TempDir::new("ok");
        dir.write(
            "k1.pub",
            &format!("{}\n", encode_public(&key(1).verifying_key())),
        );
        dir.write("k2.pub", &encode_public(&key(2).verifying_key()));
        dir.write("k3.secret", &encode_secret(&key(3)));
        dir.write("README", "not a key");
        let set = KeySet::load_dir(&dir.0).unwrap();
        assert_eq!(set.len(), 2);
        for (kid, n) in [("k1", 1), ("k2", 2)] {
            let token = mint(&claims(), kid, &key(n));
            assert_eq!(verify(&token, &set, NOW, &opts()), Ok(claims()));
        }
        let one = KeySet::load_dir(&dir.0.join("k2.pub")).unwrap();
        assert_eq!(one.len(), 1);
        assert!(one.get("k2").is_some());
    }

    #[test]
    fn load_dir_errors_name_the_file() {
        let dir = TempDir::new("bad");
        dir.write("good.pub", &encode_public(&key(1).verifying_key()));
        let bad = dir.write("bad.pub", "k4.public.no*pe");
        let err = KeySet::load_dir(&dir.0).unwrap_err();
        assert!(
            matches!(&err, KeyFileError::Invalid { path, reason: KeyFormatError::Base64 } if *path == bad)
        );
        assert!(err.to_string().contains("bad.pub"), "{err}");

        let not_pub = dir.write("key.txt", &encode_public(&key(1).verifying_key()));
        let err = KeySet::load_dir(&not_pub).unwrap_err();
        assert!(matches!(
            &err,
            KeyFileError::Invalid {
                reason: KeyFormatError::FileName,
                ..
            }
        ));
        assert!(err.to_string().contains("key.txt"), "{err}");

        let missing = dir.0.join("missing");
        let err = KeySet::load_dir(&missing).unwrap_err();
        assert!(matches!(&err, KeyFileError::Io { path, .. } if *path == missing));

        let empty = TempDir::new("empty");
        let err = KeySet::load_dir(&empty.0).unwrap_err();
        assert!(matches!(&err, KeyFileError::NoKeys { .. }), "{err}");
    }
}
