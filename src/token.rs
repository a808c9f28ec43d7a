//! PASETO v4.public tokens: verification on the session setup path, minting
//! for `eval-proxy token mint`, `--dev` and tests.
//!
//! Hand-rolled on ed25519-dalek instead of a PASETO crate: eval-proxy needs
//! one version and one purpose, every data shard verifies on its hot path, and
//! the whole format is a few dozen lines.
//!
//! # Layout
//! - Wire format: `v4.public.<b64url(m || sig)>.<b64url(f)>`, base64url
//!   without padding; `sig` is Ed25519 over `PAE("v4.public.", m, f, i)` with
//!   the implicit assertion `i` always empty. `m` is the claims JSON, `f` the
//!   footer JSON `{"kid":"…"}` that picks the public key, so keys can rotate.
//! - [`verify`] runs its checks in a fixed order so each token gets exactly
//!   one [`TokenError`]: shape and base64 → footer kid → signature → claims
//!   → `nbf`/`exp` with leeway → cluster.
//! - [`mint`], the PASERK-style key text forms (`k4.public.`, `k4.secret.`)
//!   and [`KeySet::load_dir`].
//! - A small RFC 3339 `date-time` ⇄ unix seconds converter (no chrono).
//!
//! No clock (time is a parameter) and no IO except [`KeySet::load_dir`].
//! Token text never appears in an error: tokens are credentials and errors
//! end up in logs.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{
    Signature, Signer as _, SigningKey, VerifyingKey, KEYPAIR_LENGTH, PUBLIC_KEY_LENGTH,
    SIGNATURE_LENGTH,
};
use serde::{Deserialize, Serialize};

const HEADER: &str = "v4.public.";
const PASERK_PUBLIC: &str = "k4.public.";
const PASERK_SECRET: &str = "k4.secret.";

/// Our footers are `{"kid":"…"}`; the PASETO spec asks verifiers to bound
/// footer JSON before parsing it, and this also bounds work on garbage.
const MAX_FOOTER_B64_LEN: usize = 1024;

/// Kid of [`dev_signing_key`].
pub const DEV_KID: &str = "dev";

/// **INSECURE, PUBLICLY KNOWN.** The seed is in this source file, so anyone
/// can mint tokens that a proxy trusting this key accepts. Only for
/// `eval-proxy --dev` and tests; never load its public key in production.
const DEV_SEED: [u8; 32] = *b"eval-proxy dev key: NOT A SECRET";

/// The claims eval-proxy needs. Times are unix seconds (on the wire they are
/// RFC 3339 strings, as the PASETO spec requires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub repl: String,
    pub user: String,
    pub cluster: String,
    pub exp: i64,
    pub nbf: i64,
    pub jti: String,
}

/// Why a token was refused. Carries no data, so the token can't leak into
/// logs through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Not a well-formed v4.public token with a JSON `kid` footer, or claims
    /// that are not the JSON object / RFC 3339 times the spec requires.
    Malformed,
    UnknownKid,
    BadSignature,
    Expired,
    NotYetValid,
    WrongCluster,
    MissingClaim,
}

impl TokenError {
    /// Metric label and Close-frame reason.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownKid => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongCluster => "wrong_cluster",
            Self::MissingClaim => "missing_claim",
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for TokenError {}

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

#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Clock skew allowance in seconds, applied to both `nbf` and `exp`;
    /// negative counts as 0.
    pub leeway_s: i64,
    /// If set, the `cluster` claim must equal it.
    pub cluster: Option<String>,
}

/// Verifies a v4.public token and returns its claims.
///
/// The footer is required and must be JSON with a `kid` naming a key in
/// `keys`. A token is valid for `nbf - leeway <= now_unix <= exp + leeway`.
/// `iat`, if present, must be a valid RFC 3339 time but is not compared with
/// `now_unix`. Other claims and footer fields are ignored.
pub fn verify(
    token: &str,
    keys: &KeySet,
    now_unix: i64,
    opts: &VerifyOptions,
) -> Result<Claims, TokenError> {
    let opened = Opened::parse(token)?;
    let key = key_of(&opened, keys)?;
    key.verify_strict(&opened.pae, &opened.signature)
        .map_err(|_| TokenError::BadSignature)?;
    claims_of(&opened, now_unix, opts)
}

/// [`verify`] for several tokens at once, with one Ed25519 batch
/// verification for all the signatures: per signature it costs 69 % of a
/// single verify for 2 tokens, 57 % for 4, 49 % for 8 (`cargo bench
/// --bench token`). If the batch fails, each signature is checked alone, so
/// one bad token costs the others nothing but time. The batch equation is
/// not the strict one of [`verify`]: a signature with a small-order
/// component may pass it. That admits no forgery (claims still need the
/// key holder's signature), only alternative encodings of a valid one.
pub fn verify_many(
    tokens: &[&str],
    keys: &KeySet,
    now_unix: i64,
    opts: &VerifyOptions,
) -> Vec<Result<Claims, TokenError>> {
    let opened: Vec<Result<(Opened, VerifyingKey), TokenError>> = tokens
        .iter()
        .map(|t| {
            let o = Opened::parse(t)?;
            let k = *key_of(&o, keys)?;
            Ok((o, k))
        })
        .collect();
    let ok: Vec<&(Opened, VerifyingKey)> = opened.iter().filter_map(|r| r.as_ref().ok()).collect();
    let batch_ok = ok.len() >= 2 && {
        let msgs: Vec<&[u8]> = ok.iter().map(|(o, _)| o.pae.as_slice()).collect();
        let sigs: Vec<Signature> = ok.iter().map(|(o, _)| o.signature).collect();
        let vks: Vec<VerifyingKey> = ok.iter().map(|(_, k)| *k).collect();
        ed25519_dalek::verify_batch(&msgs, &sigs, &vks).is_ok()
    };
    opened
        .into_iter()
        .map(|r| {
            let (o, k) = r?;
            if !batch_ok {
                k.verify_strict(&o.pae, &o.signature)
                    .map_err(|_| TokenError::BadSignature)?;
            }
            claims_of(&o, now_unix, opts)
        })
        .collect()
}

fn key_of<'k>(opened: &Opened, keys: &'k KeySet) -> Result<&'k VerifyingKey, TokenError> {
    let footer: Footer<'_> =
        serde_json::from_slice(opened.footer()).map_err(|_| TokenError::Malformed)?;
    keys.get(&footer.kid.0).ok_or(TokenError::UnknownKid)
}

/// The claims of a token whose signature has been checked.
fn claims_of(opened: &Opened, now_unix: i64, opts: &VerifyOptions) -> Result<Claims, TokenError> {
    let raw: RawClaims<'_> =
        serde_json::from_slice(opened.message()).map_err(|_| TokenError::Malformed)?;
    let (Some(repl), Some(user), Some(cluster), Some(exp), Some(nbf), Some(jti)) =
        (raw.repl, raw.user, raw.cluster, raw.exp, raw.nbf, raw.jti)
    else {
        return Err(TokenError::MissingClaim);
    };
    let exp = parse_rfc3339(&exp.0).ok_or(TokenError::Malformed)?;
    let nbf = parse_rfc3339(&nbf.0).ok_or(TokenError::Malformed)?;
    if let Some(iat) = raw.iat {
        parse_rfc3339(&iat.0).ok_or(TokenError::Malformed)?;
    }

    let leeway = opts.leeway_s.max(0);
    if now_unix.saturating_add(leeway) < nbf {
        return Err(TokenError::NotYetValid);
    }
    if now_unix.saturating_sub(leeway) > exp {
        return Err(TokenError::Expired);
    }
    if opts
        .cluster
        .as_deref()
        .is_some_and(|want| want != cluster.0)
    {
        return Err(TokenError::WrongCluster);
    }
    // Strings are only copied once the token is accepted.
    Ok(Claims {
        repl: repl.0.into_owned(),
        user: user.0.into_owned(),
        cluster: cluster.0.into_owned(),
        exp,
        nbf,
        jti: jti.0.into_owned(),
    })
}

/// Signs `claims` into a v4.public token with footer `{"kid":kid}`.
///
/// `exp`/`nbf` outside what RFC 3339 can express (years 0000–9999) saturate
/// to the nearest end, so a huge `exp` means "never expires".
pub fn mint(claims: &Claims, kid: &str, key: &SigningKey) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        repl: &'a str,
        user: &'a str,
        cluster: &'a str,
        exp: String,
        nbf: String,
        jti: &'a str,
    }
    let message = serde_json::to_vec(&Wire {
        repl: &claims.repl,
        user: &claims.user,
        cluster: &claims.cluster,
        exp: format_rfc3339(claims.exp),
        nbf: format_rfc3339(claims.nbf),
        jti: &claims.jti,
    })
    .expect("a struct of strings always serializes");
    let footer =
        serde_json::to_vec(&FooterOut { kid }).expect("a struct of strings always serializes");
    seal(&message, &footer, key)
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

/// A fixed, publicly known development key (kid [`DEV_KID`]).
///
/// **INSECURE: anyone can mint tokens with it.** The seed is a constant in
/// this source file. Only `eval-proxy --dev` and tests may use it; a
/// production proxy must never trust its public key.
pub fn dev_signing_key() -> SigningKey {
    SigningKey::from_bytes(&DEV_SEED)
}

#[derive(Deserialize)]
#[serde(transparent)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct Footer<'a> {
    #[serde(borrow)]
    kid: Text<'a>,
}

#[derive(Serialize)]
struct FooterOut<'a> {
    kid: &'a str,
}

/// Borrowed from the decoded payload: nothing is allocated unless a string
/// holds JSON escapes, or until the token is accepted.
#[derive(Deserialize)]
struct RawClaims<'a> {
    #[serde(borrow)]
    repl: Option<Text<'a>>,
    #[serde(borrow)]
    user: Option<Text<'a>>,
    #[serde(borrow)]
    cluster: Option<Text<'a>>,
    #[serde(borrow)]
    exp: Option<Text<'a>>,
    #[serde(borrow)]
    nbf: Option<Text<'a>>,
    #[serde(borrow)]
    iat: Option<Text<'a>>,
    #[serde(borrow)]
    jti: Option<Text<'a>>,
}

/// A decoded token whose one buffer is laid out as the PAE that the signature
/// covers, with message and footer read from inside it: one allocation per
/// verify instead of separate decode and PAE buffers.
struct Opened {
    pae: Vec<u8>,
    signature: Signature,
    message: (usize, usize),
    footer: (usize, usize),
}

/// `LE64(4) || LE64(10) || "v4.public."`, followed by `LE64(len(m))`.
const PAE_HEAD: [u8; 26] = {
    let mut out = [0u8; 26];
    out[0] = 4;
    out[8] = HEADER.len() as u8;
    let h = HEADER.as_bytes();
    let mut i = 0;
    while i < h.len() {
        out[16 + i] = h[i];
        i += 1;
    }
    out
};

impl Opened {
    fn parse(token: &str) -> Result<Self, TokenError> {
        let rest = token.strip_prefix(HEADER).ok_or(TokenError::Malformed)?;
        let (body, footer) = rest.split_once('.').ok_or(TokenError::Malformed)?;
        if footer.is_empty() || footer.len() > MAX_FOOTER_B64_LEN || footer.contains('.') {
            return Err(TokenError::Malformed);
        }
        // base64's decode_vec grows the buffer to this estimate before trimming.
        let estimate = |n: usize| n.div_ceil(4) * 3;
        let mut pae = Vec::with_capacity(
            PAE_HEAD.len() + 8 + estimate(body.len()) + 8 + estimate(footer.len()) + 8,
        );
        pae.extend_from_slice(&PAE_HEAD);
        pae.extend_from_slice(&[0; 8]);
        let m_start = pae.len();
        URL_SAFE_NO_PAD
            .decode_vec(body, &mut pae)
            .map_err(|_| TokenError::Malformed)?;
        let m_len = (pae.len() - m_start)
            .checked_sub(SIGNATURE_LENGTH)
            .ok_or(TokenError::Malformed)?;
        let m_end = m_start + m_len;
        let mut sig = [0u8; SIGNATURE_LENGTH];
        sig.copy_from_slice(&pae[m_end..]);
        pae.truncate(m_end);
        pae[m_start - 8..m_start].copy_from_slice(&le64(m_len));

        pae.extend_from_slice(&[0; 8]);
        let f_start = pae.len();
        URL_SAFE_NO_PAD
            .decode_vec(footer, &mut pae)
            .map_err(|_| TokenError::Malformed)?;
        let f_end = pae.len();
        pae[f_start - 8..f_start].copy_from_slice(&le64(f_end - f_start));
        // The implicit assertion is always empty for eval-proxy.
        pae.extend_from_slice(&le64(0));
        Ok(Self {
            pae,
            signature: Signature::from_bytes(&sig),
            message: (m_start, m_end),
            footer: (f_start, f_end),
        })
    }

    fn message(&self) -> &[u8] {
        &self.pae[self.message.0..self.message.1]
    }

    fn footer(&self) -> &[u8] {
        &self.pae[self.footer.0..self.footer.1]
    }
}

/// PASETO's LE64: little-endian with the top bit cleared.
fn le64(n: usize) -> [u8; 8] {
    (n as u64 & (u64::MAX >> 1)).to_le_bytes()
}

/// PASETO pre-authentication encoding.
fn pae(pieces: &[&[u8]]) -> Vec<u8> {
    let len = 8 + pieces.iter().map(|p| 8 + p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&le64(pieces.len()));
    for piece in pieces {
        out.extend_from_slice(&le64(piece.len()));
        out.extend_from_slice(piece);
    }
    out
}

fn seal(message: &[u8], footer: &[u8], key: &SigningKey) -> String {
    let signature = key.sign(&pae(&[HEADER.as_bytes(), message, footer, b""]));
    let mut body = Vec::with_capacity(message.len() + SIGNATURE_LENGTH);
    body.extend_from_slice(message);
    body.extend_from_slice(&signature.to_bytes());
    let mut out = String::with_capacity(HEADER.len() + (body.len() + footer.len()) * 4 / 3 + 4);
    out.push_str(HEADER);
    URL_SAFE_NO_PAD.encode_string(&body, &mut out);
    if !footer.is_empty() {
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(footer, &mut out);
    }
    out
}

/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the range RFC 3339's
/// four-digit years can express.
const MIN_RFC3339: i64 = -62_167_219_200;
const MAX_RFC3339: i64 = 253_402_300_799;

/// RFC 3339 `date-time` (section 5.6) to unix seconds. Accepts `T`/`t`,
/// `Z`/`z` or a `±HH:MM` offset, and a leap second `:60` (counted as the next
/// second, as unix time has none). Fractional seconds are truncated.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |at: usize, n: usize| -> Option<i64> {
        let digits = b.get(at..at + n)?;
        digits.iter().try_fold(0i64, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + i64::from(d - b'0'))
        })
    };
    let sep = |at: usize, want: &[u8]| b.get(at).is_some_and(|c| want.contains(c));

    let year = num(0, 4)?;
    let month = num(5, 2)?;
    let day = num(8, 2)?;
    let hour = num(11, 2)?;
    let minute = num(14, 2)?;
    let second = num(17, 2)?;
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let mut i = 19;
    if sep(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    let offset = match *b.get(i)? {
        b'Z' | b'z' => {
            i += 1;
            0
        }
        sign @ (b'+' | b'-') => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if !sep(i + 3, b":") || oh > 23 || om > 59 {
                return None;
            }
            i += 6;
            let off = oh * 3600 + om * 60;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    if i != b.len()
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Unix seconds to `YYYY-MM-DDTHH:MM:SS+00:00` (the form the PASETO spec's
/// examples use), saturating to the years 0000–9999.
fn format_rfc3339(t: i64) -> String {
    let t = t.clamp(MIN_RFC3339, MAX_RFC3339);
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Inverse of [`days_from_civil`].
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    const NOW: i64 = 1_795_773_600; // 2026-11-27T10:00:00Z

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn keys() -> KeySet {
        let mut set = KeySet::new();
        set.insert("k1", key(1).verifying_key());
        set.insert("k2", key(2).verifying_key());
        set
    }

    fn claims() -> Claims {
        Claims {
            repl: "repl-123".into(),
            user: "user-9".into(),
            cluster: "us-east-1".into(),
            exp: NOW + 3600,
            nbf: NOW - 60,
            jti: "jti-abc".into(),
        }
    }

    fn opts() -> VerifyOptions {
        VerifyOptions {
            leeway_s: 30,
            cluster: Some("us-east-1".into()),
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs arbitrary claims JSON with key(1) under kid k1.
    fn sealed(claims_json: &str) -> String {
        seal(claims_json.as_bytes(), br#"{"kid":"k1"}"#, &key(1))
    }

    // Official PASETO v4 test vectors (paseto-standard/test-vectors, v4.json),
    // as shipped in the pasetors crate.
    const SPEC_SK: &str = "b4cbfb43df4ce210727d953e4a713307fa19bb7d9f85041438d9e11b942a37741eb9dbbbbc047c03fd70604e0071f0987e16b28b757225c11f00415d0e20b1a2";
    const SPEC_PK: &str = "1eb9dbbbbc047c03fd70604e0071f0987e16b28b757225c11f00415d0e20b1a2";
    const SPEC_PAYLOAD: &str =
        r#"{"data":"this is a signed message","exp":"2022-01-01T00:00:00+00:00"}"#;
    const SPEC_FOOTER: &str = r#"{"kid":"zVhMiPBP9fRf2snEcT7gFTioeA9COcNy9DfgL1W60haN"}"#;
    const SPEC_KID: &str = "zVhMiPBP9fRf2snEcT7gFTioeA9COcNy9DfgL1W60haN";
    const VECTOR_4_S_1: &str = "v4.public.eyJkYXRhIjoidGhpcyBpcyBhIHNpZ25lZCBtZXNzYWdlIiwiZXhwIjoiMjAyMi0wMS0wMVQwMDowMDowMCswMDowMCJ9bg_XBBzds8lTZShVlwwKSgeKpLT3yukTw6JUz3W4h_ExsQV-P0V54zemZDcAxFaSeef1QlXEFtkqxT1ciiQEDA";
    const VECTOR_4_S_2: &str = "v4.public.eyJkYXRhIjoidGhpcyBpcyBhIHNpZ25lZCBtZXNzYWdlIiwiZXhwIjoiMjAyMi0wMS0wMVQwMDowMDowMCswMDowMCJ9v3Jt8mx_TdM2ceTGoqwrh4yDFn0XsHvvV_D0DtwQxVrJEBMl0F2caAdgnpKlt4p7xBnx1HcO-SPo8FPp214HDw.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";
    const VECTOR_4_S_3: &str = "v4.public.eyJkYXRhIjoidGhpcyBpcyBhIHNpZ25lZCBtZXNzYWdlIiwiZXhwIjoiMjAyMi0wMS0wMVQwMDowMDowMCswMDowMCJ9NPWciuD3d0o5eXJXG5pJy-DiVEoyPYWs1YSTwWHNJq6DZD3je5gf-0M4JR9ipdUSJbIovzmBECeaWmaqcaP0DQ.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";
    const VECTOR_4_F_1: &str = "v4.local.vngXfCISbnKgiP6VWGuOSlYrFYU300fy9ijW33rznDYgxHNPwWluAY2Bgb0z54CUs6aYYkIJ-bOOOmJHPuX_34Agt_IPlNdGDpRdGNnBz2MpWJvB3cttheEc1uyCEYltj7wBQQYX.YXJiaXRyYXJ5LXN0cmluZy10aGF0LWlzbid0LWpzb24";
    const VECTOR_4_F_2: &str = "v4.public.eyJpbnZhbGlkIjoidGhpcyBzaG91bGQgbmV2ZXIgZGVjb2RlIn22Sp4gjCaUw0c7EH84ZSm_jN_Qr41MrgLNu5LIBCzUr1pn3Z-Wukg9h3ceplWigpoHaTLcwxj0NsI1vjTh67YB.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";
    const VECTOR_4_F_3: &str = "v3.local.23e_2PiqpQBPvRFKzB0zHhjmxK3sKo2grFZRRLM-U7L0a8uHxuF9RlVz3Ic6WmdUUWTxCaYycwWV1yM8gKbZB2JhygDMKvHQ7eBf8GtF0r3K0Q_gF1PXOxcOgztak1eD1dPe9rLVMSgR0nHJXeIGYVuVrVoLWQ.YXJiaXRyYXJ5LXN0cmluZy10aGF0LWlzbid0LWpzb24";
    const VECTOR_4_F_4: &str = "v4.local.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQAr68PS4AXe7If_ZgesdkUMvSwscFlAl1pk5HC0e8kApeaqMfGo_7OpBnwJOAbY9V7WU6abu74MmcUE8YWAiaArVI8XJ5hOb_4v9RmDkneN0S92dx0OW4pgy7omxgf3S8c3LlQh";
    const VECTOR_4_F_5: &str = "v4.local.32VIErrEkmY4JVILovbmfPXKW9wT1OdQepjMTC_MOtjA4kiqw7_tcaOM5GNEcnTxl60WkwMsYXw6FSNb_UdJPXjpzm0KW9ojM5f4O2mRvE2IcweP-PRdoHjd5-RHCiExR1IK6t4x-RMNXtQNbz7FvFZ_G-lFpk5RG3EOrwDL6CgDqcerSQ==.eyJraWQiOiJ6VmhNaVBCUDlmUmYyc25FY1Q3Z0ZUaW9lQTlDT2NOeTlEZmdMMVc2MGhhTiJ9";

    fn spec_signing_key() -> SigningKey {
        SigningKey::from_keypair_bytes(&hex(SPEC_SK).try_into().unwrap()).unwrap()
    }

    fn spec_keys() -> KeySet {
        let mut set = KeySet::new();
        let pk = VerifyingKey::from_bytes(&hex(SPEC_PK).try_into().unwrap()).unwrap();
        set.insert(SPEC_KID, pk);
        set
    }

    /// Batch verification answers exactly what one-by-one verification
    /// does, for any mix of good and bad tokens.
    #[rstest::rstest]
    #[case::all_good(&[0, 0, 0, 0])]
    #[case::one_forged(&[0, 1, 0])]
    #[case::mixed(&[2, 0, 3, 1, 0, 4])]
    #[case::single(&[0])]
    #[case::only_bad(&[1, 2])]
    fn verify_many_matches_verify(#[case] kinds: &[u8]) {
        let good = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let mut keys = KeySet::new();
        keys.insert("k", good.verifying_key());
        let tokens: Vec<String> = kinds
            .iter()
            .enumerate()
            .map(|(i, kind)| {
                let mut c = claims();
                c.jti = format!("{i}");
                match kind {
                    0 => mint(&c, "k", &good),
                    1 => mint(&c, "k", &other),
                    2 => mint(&c, "nope", &good),
                    3 => "v4.public.garbage".to_string(),
                    _ => {
                        c.exp = NOW - 3600;
                        mint(&c, "k", &good)
                    }
                }
            })
            .collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let many = verify_many(&refs, &keys, NOW, &opts());
        let one: Vec<_> = refs
            .iter()
            .map(|t| verify(t, &keys, NOW, &opts()))
            .collect();
        assert_eq!(many, one);
    }

    #[test]
    fn spec_vectors_seal_byte_for_byte() {
        // Ed25519 is deterministic, so sealing the vectors' inputs must
        // reproduce the published tokens exactly.
        let sk = spec_signing_key();
        assert_eq!(hex(SPEC_PK), sk.verifying_key().as_bytes());
        assert_eq!(seal(SPEC_PAYLOAD.as_bytes(), b"", &sk), VECTOR_4_S_1);
        assert_eq!(
            seal(SPEC_PAYLOAD.as_bytes(), SPEC_FOOTER.as_bytes(), &sk),
            VECTOR_4_S_2
        );
    }

    #[test]
    fn spec_vector_4_s_2_opens_and_verifies() {
        let opened = Opened::parse(VECTOR_4_S_2).unwrap();
        assert_eq!(opened.message(), SPEC_PAYLOAD.as_bytes());
        assert_eq!(opened.footer(), SPEC_FOOTER.as_bytes());
        assert_eq!(
            opened.pae,
            pae(&[
                HEADER.as_bytes(),
                SPEC_PAYLOAD.as_bytes(),
                SPEC_FOOTER.as_bytes(),
                b""
            ])
        );
        let pk = spec_keys();
        let pk = pk.get(SPEC_KID).unwrap();
        assert!(pk.verify_strict(&opened.pae, &opened.signature).is_ok());
        // Signature passes; the vector just lacks eval-proxy's claims.
        assert_eq!(
            verify(VECTOR_4_S_2, &spec_keys(), NOW, &VerifyOptions::default()),
            Err(TokenError::MissingClaim)
        );
    }

    #[rstest]
    #[case::s1_no_footer(VECTOR_4_S_1, TokenError::Malformed)]
    #[case::s3_nonempty_implicit_assertion(VECTOR_4_S_3, TokenError::BadSignature)]
    #[case::f1_local(VECTOR_4_F_1, TokenError::Malformed)]
    #[case::f2_bad_signature(VECTOR_4_F_2, TokenError::BadSignature)]
    #[case::f3_v3(VECTOR_4_F_3, TokenError::Malformed)]
    #[case::f4_local_no_footer(VECTOR_4_F_4, TokenError::Malformed)]
    #[case::f5_padded(VECTOR_4_F_5, TokenError::Malformed)]
    fn spec_vectors_rejected(#[case] token: &str, #[case] want: TokenError) {
        assert_eq!(
            verify(token, &spec_keys(), NOW, &VerifyOptions::default()),
            Err(want)
        );
    }

    #[rstest]
    #[case::no_pieces(&[], "0000000000000000")]
    #[case::one_empty(&[b"".as_slice()], "01000000000000000000000000000000")]
    #[case::test(&[b"test".as_slice()], "0100000000000000040000000000000074657374")]
    fn pae_matches_spec(#[case] pieces: &[&[u8]], #[case] want: &str) {
        assert_eq!(pae(pieces), hex(want));
    }

    #[test]
    fn mint_then_verify_round_trips() {
        let token = mint(&claims(), "k1", &key(1));
        assert!(token.starts_with("v4.public."));
        assert_eq!(verify(&token, &keys(), NOW, &opts()), Ok(claims()));
    }

    #[test]
    fn cluster_not_checked_without_option() {
        let mut c = claims();
        c.cluster = "eu-west-1".into();
        let token = mint(&c, "k1", &key(1));
        assert_eq!(
            verify(&token, &keys(), NOW, &VerifyOptions::default()),
            Ok(c)
        );
    }

    fn with_footer(token: &str, footer: &[u8]) -> String {
        let (body, _) = token.rsplit_once('.').unwrap();
        format!("{body}.{}", b64(footer))
    }

    fn tampered_payload(token: &str) -> String {
        let mut bytes = URL_SAFE_NO_PAD
            .decode(token[HEADER.len()..].split('.').next().unwrap())
            .unwrap();
        // Flip a byte inside the claims JSON ("repl-123" -> "repl-133").
        let at = bytes.windows(3).position(|w| w == b"123").unwrap() + 1;
        bytes[at] = b'3';
        let footer = token.rsplit('.').next().unwrap();
        format!("{HEADER}{}.{footer}", b64(&bytes))
    }

    fn case(name: &str) -> String {
        let good = mint(&claims(), "k1", &key(1));
        let mut c = claims();
        match name {
            "empty" => String::new(),
            "header_only" => HEADER.into(),
            "local" => good.replacen("v4.public.", "v4.local.", 1),
            "v3" => good.replacen("v4.", "v3.", 1),
            "no_footer" => good.rsplit_once('.').unwrap().0.into(),
            "empty_footer" => format!("{}.", good.rsplit_once('.').unwrap().0),
            "extra_part" => format!("{good}.e30"),
            "bad_char" => good.replacen("v4.public.ey", "v4.public.e*", 1),
            "padded" => {
                let (body, footer) = good[HEADER.len()..].split_once('.').unwrap();
                format!("{HEADER}{body}==.{footer}")
            }
            "short_body" => format!("{HEADER}{}.{}", b64(&[0; 63]), b64(br#"{"kid":"k1"}"#)),
            "footer_not_json" => with_footer(&good, b"k1"),
            "footer_no_kid" => with_footer(&good, br#"{"key":"k1"}"#),
            "footer_kid_number" => with_footer(&good, br#"{"kid":1}"#),
            "footer_duplicate_kid" => with_footer(&good, br#"{"kid":"k1","kid":"k2"}"#),
            "footer_too_long" => with_footer(&good, &[b' '; 800]),
            "payload_not_json" => sealed("not json"),
            "payload_array" => sealed("[]"),
            "exp_number" => sealed(
                r#"{"repl":"r","user":"u","cluster":"c","exp":1,"nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            "exp_not_rfc3339" => sealed(
                r#"{"repl":"r","user":"u","cluster":"c","exp":"tomorrow","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            "bad_iat" => sealed(
                r#"{"repl":"r","user":"u","cluster":"c","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","iat":"x","jti":"j"}"#,
            ),
            "duplicate_claim" => sealed(
                r#"{"repl":"r","repl":"s","user":"u","cluster":"c","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            "unknown_kid" => mint(&claims(), "k9", &key(1)),
            "other_key" => mint(&claims(), "k1", &key(2)),
            "tampered_payload" => tampered_payload(&good),
            // The footer is signed: pointing at another known key must fail.
            "footer_swapped" => with_footer(&good, br#"{"kid":"k2"}"#),
            "expired" => {
                c.exp = NOW - 3600;
                mint(&c, "k1", &key(1))
            }
            "not_yet_valid" => {
                c.nbf = NOW + 3600;
                mint(&c, "k1", &key(1))
            }
            "wrong_cluster" => {
                c.cluster = "eu-west-1".into();
                mint(&c, "k1", &key(1))
            }
            "null_claim" => sealed(
                r#"{"repl":null,"user":"u","cluster":"c","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
            ),
            other => {
                // "missing_<claim>": a valid claim set minus one claim.
                let claim = other.strip_prefix("missing_").unwrap();
                let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
                    r#"{"repl":"r","user":"u","cluster":"us-east-1","exp":"2027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j"}"#,
                )
                .unwrap();
                assert!(v.remove(claim).is_some());
                sealed(&serde_json::Value::Object(v).to_string())
            }
        }
    }

    #[rstest]
    #[case::empty("empty", TokenError::Malformed)]
    #[case::header_only("header_only", TokenError::Malformed)]
    #[case::local("local", TokenError::Malformed)]
    #[case::v3("v3", TokenError::Malformed)]
    #[case::no_footer("no_footer", TokenError::Malformed)]
    #[case::empty_footer("empty_footer", TokenError::Malformed)]
    #[case::extra_part("extra_part", TokenError::Malformed)]
    #[case::bad_char("bad_char", TokenError::Malformed)]
    #[case::padded("padded", TokenError::Malformed)]
    #[case::short_body("short_body", TokenError::Malformed)]
    #[case::footer_not_json("footer_not_json", TokenError::Malformed)]
    #[case::footer_no_kid("footer_no_kid", TokenError::Malformed)]
    #[case::footer_kid_number("footer_kid_number", TokenError::Malformed)]
    #[case::footer_duplicate_kid("footer_duplicate_kid", TokenError::Malformed)]
    #[case::footer_too_long("footer_too_long", TokenError::Malformed)]
    #[case::payload_not_json("payload_not_json", TokenError::Malformed)]
    #[case::payload_array("payload_array", TokenError::Malformed)]
    #[case::exp_number("exp_number", TokenError::Malformed)]
    #[case::exp_not_rfc3339("exp_not_rfc3339", TokenError::Malformed)]
    #[case::bad_iat("bad_iat", TokenError::Malformed)]
    #[case::duplicate_claim("duplicate_claim", TokenError::Malformed)]
    #[case::unknown_kid("unknown_kid", TokenError::UnknownKid)]
    #[case::other_key("other_key", TokenError::BadSignature)]
    #[case::tampered_payload("tampered_payload", TokenError::BadSignature)]
    #[case::footer_swapped("footer_swapped", TokenError::BadSignature)]
    #[case::expired("expired", TokenError::Expired)]
    #[case::not_yet_valid("not_yet_valid", TokenError::NotYetValid)]
    #[case::wrong_cluster("wrong_cluster", TokenError::WrongCluster)]
    #[case::null_claim("null_claim", TokenError::MissingClaim)]
    #[case::missing_repl("missing_repl", TokenError::MissingClaim)]
    #[case::missing_user("missing_user", TokenError::MissingClaim)]
    #[case::missing_cluster("missing_cluster", TokenError::MissingClaim)]
    #[case::missing_exp("missing_exp", TokenError::MissingClaim)]
    #[case::missing_nbf("missing_nbf", TokenError::MissingClaim)]
    #[case::missing_jti("missing_jti", TokenError::MissingClaim)]
    fn rejects(#[case] name: &str, #[case] want: TokenError) {
        let token = case(name);
        let err = verify(&token, &keys(), NOW, &opts()).unwrap_err();
        assert_eq!(err, want);
        // Errors carry no token text.
        let shown = format!("{err} {err:?}");
        assert!(shown.len() < 40, "{shown}");
    }

    #[rstest]
    #[case::exp_now(NOW, 0, 0, None)]
    #[case::exp_one_past(NOW - 1, 0, 0, Some(TokenError::Expired))]
    #[case::exp_within_leeway(NOW - 30, 0, 30, None)]
    #[case::exp_past_leeway(NOW - 30 - 1, 0, 30, Some(TokenError::Expired))]
    #[case::nbf_now(NOW + 60, NOW, 0, None)]
    #[case::nbf_one_ahead(NOW + 60, NOW + 1, 0, Some(TokenError::NotYetValid))]
    #[case::nbf_within_leeway(NOW + 60, NOW + 30, 30, None)]
    #[case::nbf_past_leeway(NOW + 60, NOW + 30 + 1, 30, Some(TokenError::NotYetValid))]
    #[case::negative_leeway_is_zero(NOW, 0, -100, None)]
    #[case::huge_leeway_saturates(i64::MIN + 1, 0, i64::MAX, None)]
    fn leeway_edges(
        #[case] exp: i64,
        #[case] nbf: i64,
        #[case] leeway_s: i64,
        #[case] want: Option<TokenError>,
    ) {
        let c = Claims {
            exp,
            nbf,
            ..claims()
        };
        let token = mint(&c, "k1", &key(1));
        let opts = VerifyOptions {
            leeway_s,
            cluster: None,
        };
        let got = verify(&token, &keys(), NOW, &opts);
        match want {
            None => assert_eq!(got.map(|c| (c.exp, c.nbf)), Ok((exp.max(MIN_RFC3339), nbf))),
            Some(e) => assert_eq!(got, Err(e)),
        }
    }

    #[test]
    fn key_rotation_each_kid_verifies_its_own() {
        let set = keys();
        for (kid, n) in [("k1", 1), ("k2", 2)] {
            let token = mint(&claims(), kid, &key(n));
            assert_eq!(verify(&token, &set, NOW, &opts()), Ok(claims()));
        }
        // After dropping k1 from the set, its tokens stop verifying.
        let mut only_k2 = KeySet::new();
        only_k2.insert("k2", key(2).verifying_key());
        let old = mint(&claims(), "k1", &key(1));
        assert_eq!(
            verify(&old, &only_k2, NOW, &opts()),
            Err(TokenError::UnknownKid)
        );
    }

    #[test]
    fn insert_replaces_same_kid() {
        let mut set = keys();
        set.insert("k1", key(3).verifying_key());
        assert_eq!(set.len(), 2);
        let token = mint(&claims(), "k1", &key(3));
        assert_eq!(verify(&token, &set, NOW, &opts()), Ok(claims()));
    }

    #[test]
    fn token_of_16000_chars_verifies() {
        // Unpadded base64 never has length 1 mod 4, so vary the kid too.
        let mut set = keys();
        set.insert("k10", key(1).verifying_key());
        let mut c = claims();
        let token = (11_500..12_000)
            .flat_map(|n| ["k1", "k10"].map(|kid| (n, kid)))
            .find_map(|(n, kid)| {
                c.user = "u".repeat(n);
                let t = mint(&c, kid, &key(1));
                (t.len() == 16_000).then_some(t)
            })
            .unwrap();
        assert_eq!(verify(&token, &set, NOW, &opts()), Ok(c));
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let token = sealed(
            r#"{"repl":"r\u0031","user":"\"u\"","cluster":"us-east-1","exp":"\u0032027-01-01T00:00:00Z","nbf":"2026-01-01T00:00:00Z","jti":"j","extra":{"a":[1,2]}}"#,
        );
        let got = verify(&token, &keys(), NOW, &opts()).unwrap();
        assert_eq!((got.repl.as_str(), got.user.as_str()), ("r1", "\"u\""));
        assert_eq!(got.exp, 1_798_761_600);
    }

    #[test]
    fn claims_borrow_from_payload() {
        let raw: RawClaims<'_> =
            serde_json::from_slice(br#"{"repl":"r","user":"\u0075"}"#).unwrap();
        assert!(matches!(raw.repl, Some(Text(Cow::Borrowed("r")))));
        assert!(matches!(raw.user, Some(Text(Cow::Owned(ref u))) if u == "u"));
    }

    #[test]
    fn dev_key_is_fixed() {
        assert_eq!(dev_signing_key().to_bytes(), DEV_SEED);
        let mut set = KeySet::new();
        set.insert(DEV_KID, dev_signing_key().verifying_key());
        let token = mint(&claims(), DEV_KID, &dev_signing_key());
        assert_eq!(verify(&token, &set, NOW, &opts()), Ok(claims()));
    }

    #[test]
    fn error_labels() {
        use TokenError::*;
        let all = [
            Malformed,
            UnknownKid,
            BadSignature,
            Expired,
            NotYetValid,
            WrongCluster,
            MissingClaim,
        ];
        let labels: Vec<_> = all.iter().map(TokenError::as_str).collect();
        assert_eq!(
            labels,
            [
                "malformed",
                "unknown_kid",
                "bad_signature",
                "expired",
                "not_yet_valid",
                "wrong_cluster",
                "missing_claim"
            ]
        );
        assert_eq!(Expired.to_string(), "expired");
    }

    #[rstest]
    #[case::epoch("1970-01-01T00:00:00Z", 0)]
    #[case::spec_example("2022-01-01T00:00:00+00:00", 1_640_995_200)]
    #[case::z_form("2026-11-27T10:00:00Z", NOW)]
    #[case::offset_form("2026-11-27T10:00:00+00:00", NOW)]
    #[case::lowercase("2026-11-27t10:00:00z", NOW)]
    #[case::unknown_local_offset("2026-11-27T10:00:00-00:00", NOW)]
    #[case::positive_offset("2026-11-27T15:30:00+05:30", NOW)]
    #[case::negative_offset("2026-11-27T02:00:00-08:00", NOW)]
    #[case::fraction("2026-11-27T10:00:00.999999999Z", NOW)]
    #[case::fraction_with_offset("2026-11-27T11:00:00.5+01:00", NOW)]
    #[case::before_epoch("1969-12-31T23:59:59Z", -1)]
    #[case::leap_day("2024-02-29T00:00:00Z", 1_709_164_800)]
    #[case::leap_400("2000-02-29T00:00:00Z", 951_782_400)]
    #[case::leap_second("2016-12-31T23:59:60Z", 1_483_228_800)]
    #[case::min("0000-01-01T00:00:00Z", MIN_RFC3339)]
    #[case::max("9999-12-31T23:59:59Z", MAX_RFC3339)]
    fn rfc3339_parses(#[case] s: &str, #[case] want: i64) {
        assert_eq!(parse_rfc3339(s), Some(want));
    }

    #[rstest]
    #[case::empty("")]
    #[case::date_only("2026-11-27")]
    #[case::no_offset("2026-11-27T10:00:00")]
    #[case::space_separator("2026-11-27 10:00:00Z")]
    #[case::short_year("226-11-27T10:00:00Z")]
    #[case::one_digit_month("2026-1-27T10:00:00Z")]
    #[case::month_13("2026-13-27T10:00:00Z")]
    #[case::month_0("2026-00-27T10:00:00Z")]
    #[case::day_0("2026-11-00T10:00:00Z")]
    #[case::nov_31("2026-11-31T10:00:00Z")]
    #[case::feb_29_non_leap("2023-02-29T00:00:00Z")]
    #[case::feb_29_1900("1900-02-29T00:00:00Z")]
    #[case::hour_24("2026-11-27T24:00:00Z")]
    #[case::minute_60("2026-11-27T10:60:00Z")]
    #[case::second_61("2026-11-27T10:00:61Z")]
    #[case::empty_fraction("2026-11-27T10:00:00.Z")]
    #[case::offset_no_colon("2026-11-27T10:00:00+0000")]
    #[case::offset_hour_24("2026-11-27T10:00:00+24:00")]
    #[case::offset_short("2026-11-27T10:00:00+00")]
    #[case::trailing("2026-11-27T10:00:00Zx")]
    #[case::sign_in_year("+026-11-27T10:00:00Z")]
    #[case::unix_number("1795773600")]
    #[case::non_ascii("2026-11-27T10:00:00Z\u{e9}")]
    fn rfc3339_rejects(#[case] s: &str) {
        assert_eq!(parse_rfc3339(s), None);
    }

    #[rstest]
    #[case::epoch(0, "1970-01-01T00:00:00+00:00")]
    #[case::now(NOW, "2026-11-27T10:00:00+00:00")]
    #[case::before_epoch(-1, "1969-12-31T23:59:59+00:00")]
    #[case::saturates_high(i64::MAX, "9999-12-31T23:59:59+00:00")]
    #[case::saturates_low(i64::MIN, "0000-01-01T00:00:00+00:00")]
    fn rfc3339_formats(#[case] t: i64, #[case] want: &str) {
        assert_eq!(format_rfc3339(t), want);
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

    fn b64ish() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_=.-]{0,200}".prop_map(|s| format!("{HEADER}{s}"))
    }

    proptest! {
        #[test]
        fn verify_never_panics(s in any::<String>(), now in any::<i64>(), leeway in any::<i64>()) {
            let opts = VerifyOptions { leeway_s: leeway, cluster: Some("c".into()) };
            let _ = verify(&s, &keys(), now, &opts);
        }

        #[test]
        fn verify_never_panics_on_token_shapes(s in b64ish()) {
            prop_assert!(verify(&s, &keys(), NOW, &opts()).is_err());
        }

        #[test]
        fn verify_never_panics_on_signed_garbage(payload in any::<Vec<u8>>(), footer in any::<Vec<u8>>()) {
            let token = seal(&payload, &footer, &key(1));
            let _ = verify(&token, &keys(), NOW, &VerifyOptions::default());
        }

        #[test]
        fn rfc3339_never_panics(s in "[0-9T:.Zz+-]{0,40}") {
            let _ = parse_rfc3339(&s);
        }

        #[test]
        fn rfc3339_round_trips(t in MIN_RFC3339..=MAX_RFC3339) {
            prop_assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }

        #[test]
        fn mint_verify_round_trips(
            repl in any::<String>(), user in any::<String>(), jti in any::<String>(), kid in any::<String>(),
            exp in NOW..=MAX_RFC3339, nbf in MIN_RFC3339..=NOW,
        ) {
            let c = Claims { repl, user, cluster: "us-east-1".into(), exp, nbf, jti };
            let mut set = KeySet::new();
            set.insert(&kid, key(7).verifying_key());
            let token = mint(&c, &kid, &key(7));
            // Kids whose JSON escaping blows past the footer bound are refused as Malformed.
            let footer_len = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&FooterOut { kid: &kid }).unwrap()).len();
            if footer_len <= MAX_FOOTER_B64_LEN {
                prop_assert_eq!(verify(&token, &set, NOW, &opts()), Ok(c));
            } else {
                prop_assert_eq!(verify(&token, &set, NOW, &opts()), Err(TokenError::Malformed));
            }
        }
    }
}
