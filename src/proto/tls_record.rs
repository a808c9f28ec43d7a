//! The TLS 1.3 record layer of a client connection once its handshake is
//! done: rustls runs the handshake, then hands over the traffic keys
//! (`ServerConnection::dangerous_extract_secrets`) and the session opens
//! and seals application-data records itself (RFC 8446 §5).
//!
//! Why: rustls's buffered API copies every byte twice each way (into its
//! deframer and out to the caller's buffer; into a record and out to the
//! caller's send buffer). Here a received record is copied once, from the
//! ring buffer to the session's plaintext, and decrypted in place there; a
//! sealed record is copied once, from the send queue to the send buffer,
//! and encrypted in place. This is also the seam where kTLS would go: the
//! same keys and sequence numbers handed to the kernel (`TLS_TX`/`TLS_RX`)
//! instead of to [`Sealer`] / [`Opener`].
//!
//! What a client may still send after the handshake: application data, a
//! close_notify or another alert, and KeyUpdate (RFC 8446 §4.6.3), which
//! is followed with the traffic secrets rustls logs through [`capture`].
//! Anything else ends the connection, as rustls would.

use std::cell::RefCell;
use std::sync::Arc;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, NONCE_LEN};
use ring::hkdf::{self, KeyType as _};
use rustls::ConnectionTrafficSecrets;

/// A record's header: type, legacy version, length.
pub const HEADER: usize = 5;
const TAG: usize = 16;
/// The most plaintext one record carries.
pub const MAX_PLAIN: usize = 1 << 14;
/// The longest ciphertext a TLS 1.3 record may have (§5.2).
pub const MAX_CIPHER: usize = MAX_PLAIN + 256;
/// What sealing adds to each record: header, inner type and tag.
pub const OVERHEAD: usize = HEADER + 1 + TAG;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;

/// Records sealed under one key before it is updated: well inside
/// AES-GCM's limit of 2^24.5 records (§5.5).
const TX_UPDATE_AT: u64 = 1 << 23;
/// KeyUpdates in a row, with no application data between them, before the
/// peer is refused: each costs an open, three HKDF expansions and a new
/// key, so an endless run of them is work for nothing (rustls and
/// BoringSSL allow 32 too).
const KEY_UPDATES_IN_A_ROW: u8 = 32;

/// Alert descriptions (§6).
pub mod alert {
    pub const CLOSE_NOTIFY: u8 = 0;
    pub const UNEXPECTED_MESSAGE: u8 = 10;
    pub const BAD_RECORD_MAC: u8 = 20;
    pub const RECORD_OVERFLOW: u8 = 22;
    pub const ILLEGAL_PARAMETER: u8 = 47;
    pub const DECODE_ERROR: u8 = 50;
    /// A closure alert like close_notify, which usually follows it (§6.1).
    pub const USER_CANCELED: u8 = 90;
}

/// Why a record was refused: the alert owed to the peer, and a reason
/// for the log.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub alert: Option<u8>,
    pub what: &'static str,
}

fn refused(alert: u8, what: &'static str) -> Refused {
    Refused {
        alert: Some(alert),
        what,
    }
}

/// What an opened record was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data, appended to the caller's plaintext.
    Data,
    /// close_notify: the peer sends nothing more.
    Closed,
    /// Nothing to act on (user_canceled, an empty record).
    Nothing,
    /// The peer updated its key; `requested`: it asks us to update ours.
    KeyUpdated { requested: bool },
}

/// Checks a record header: only application-data records (TLS 1.3's outer
/// type) of a legal length follow the handshake. Returns the whole
/// record's length.
pub fn frame(h: &[u8; HEADER]) -> Result<usize, Refused> {
    if h[0] != APPLICATION_DATA {
        return Err(refused(alert::UNEXPECTED_MESSAGE, "record type"));
    }
    if h[1] != 3 {
        return Err(refused(alert::DECODE_ERROR, "record version"));
    }
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    if len > MAX_CIPHER {
        return Err(refused(alert::RECORD_OVERFLOW, "record too long"));
    }
    if len < TAG + 1 {
        return Err(refused(alert::DECODE_ERROR, "record too short"));
    }
    Ok(HEADER + len)
}

/// Cuts received bytes into whole records. A record that lies whole in
/// the input is passed from there; only the one partial record that ends
/// an input is kept, and copied, until the next.
#[derive(Default)]
pub struct Records {
    staged: Vec<u8>,
}

impl Records {
    /// Passes each whole record in `data` (after the one begun earlier) to
    /// `each`, which says whether to go on (`false`: the peer is done, the
    /// rest is ignored). A bad header refuses the rest.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<bool, Refused>,
    ) -> Result<(), Refused> {
        if !self.staged.is_empty() {
            if self.staged.len() < HEADER {
                let n = (HEADER - self.staged.len()).min(data.len());
                self.staged.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.staged.len() < HEADER {
                    return Ok(());
                }
            }
            let len = frame(self.staged[..HEADER].try_into().unwrap())?;
            let n = (len - self.staged.len()).min(data.len());
            self.staged.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.staged.len() < len {
                return Ok(());
            }
            let go_on = each(&self.staged);
            self.staged.clear();
            if !go_on? {
                return Ok(());
            }
        }
        while data.len() >= HEADER {
            let len = frame(data[..HEADER].try_into().unwrap())?;
            if len > data.len() {
                break;
            }
            if !each(&data[..len])? {
                return Ok(());
            }
            data = &data[len..];
        }
        self.staged.extend_from_slice(data);
        Ok(())
    }

    /// Bytes of a partial record held.
    pub fn held(&self) -> usize {
        self.staged.len()
    }
}

/// One direction's traffic keys.
struct Keys {
    aead: &'static aead::Algorithm,
    hkdf: hkdf::Algorithm,
    /// The traffic secret the key and IV came from; KeyUpdate derives the
    /// next one from it.
    secret: Vec<u8>,
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    /// `seq` and the key rustls extracted, with the traffic secret it
    /// logged (the two must agree).
    fn new(seq: u64, keys: ConnectionTrafficSecrets, secret: Vec<u8>) -> Result<Keys, String> {
        let (aead, hkdf, key, iv) = match keys {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, hkdf::HKDF_SHA256, key, iv)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, hkdf::HKDF_SHA384, key, iv)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256, key, iv)
            }
            _ => return Err("a cipher suite without a TLS 1.3 record layer here".into()),
        };
        let (k, i) = material(aead, hkdf, &secret)?;
        if k != key.as_ref() || i[..] != *iv.as_ref() {
            return Err("the logged traffic secret does not match the extracted key".into());
        }
        Keys::build(aead, hkdf, secret, &k, i, seq)
    }

    /// The keys of `secret`, sequence number 0.
    fn derive(
        aead: &'static aead::Algorithm,
        hkdf: hkdf::Algorithm,
        secret: Vec<u8>,
    ) -> Result<Keys, String> {
        let (key, iv) = material(aead, hkdf, &secret)?;
        Keys::build(aead, hkdf, secret, &key, iv, 0)
    }

    fn build(
        aead: &'static aead::Algorithm,
        hkdf: hkdf::Algorithm,
        secret: Vec<u8>,
        key: &[u8],
        iv: [u8; NONCE_LEN],
        seq: u64,
    ) -> Result<Keys, String> {
        let key = UnboundKey::new(aead, key).map_err(|_| "a key of the wrong length")?;
        Ok(Keys {
            aead,
            hkdf,
            secret,
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The next generation of keys (§7.2).
    fn update(&mut self) {
        let mut next = vec![0; self.hkdf.len()];
        expand_label(self.hkdf, &self.secret, b"traffic upd", &mut next);
        // The lengths are the suite's own: derive cannot fail here.
        *self = Keys::derive(self.aead, self.hkdf, next).expect("keys of the suite's lengths");
    }

    /// The per-record nonce: the IV xor the sequence number (§5.3).
    fn nonce(&self) -> Nonce {
        let mut n = self.iv;
        for (b, s) in n[NONCE_LEN - 8..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        Nonce::assume_unique_for_key(n)
    }
}

/// The key and IV of a traffic secret (§7.3).
fn material(
    aead: &'static aead::Algorithm,
    hkdf: hkdf::Algorithm,
    secret: &[u8],
) -> Result<(Vec<u8>, [u8; NONCE_LEN]), String> {
    if secret.len() != hkdf.len() {
        return Err("a traffic secret of the wrong length".into());
    }
    let mut key = vec![0; aead.key_len()];
    expand_label(hkdf, secret, b"key", &mut key);
    let mut iv = [0; NONCE_LEN];
    expand_label(hkdf, secret, b"iv", &mut iv);
    Ok((key, iv))
}

/// HKDF-Expand-Label(secret, label, "", out.len()) (§7.1).
fn expand_label(alg: hkdf::Algorithm, secret: &[u8], label: &[u8], out: &mut [u8]) {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let len = (out.len() as u16).to_be_bytes();
    let label_len = [(6 + label.len()) as u8];
    let info: [&[u8]; 5] = [&len, &label_len, b"tls13 ", label, &[0]];
    let prk = hkdf::Prk::new_less_safe(alg, secret);
    // Lengths of a key, an IV or a hash: far below HKDF's 255 × hash limit.
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("an HKDF output within its limit");
}

/// Opens the peer's records.
pub struct Opener(Keys, u8);

impl Opener {
    pub fn new(seq: u64, keys: ConnectionTrafficSecrets, secret: Vec<u8>) -> Result<Self, String> {
        Keys::new(seq, keys, secret).map(|k| Opener(k, 0))
    }

    /// Opens one whole record (`rec`, header included, its length checked
    /// by [`frame`]): application data is appended to `plain`, copied
    /// there once and decrypted in place; anything else leaves `plain` as
    /// it was.
    pub fn open(&mut self, rec: &[u8], plain: &mut Vec<u8>) -> Result<Opened, Refused> {
        let (hdr, body) = rec.split_at(HEADER);
        // §5.5 limits what a sender seals under one key; the nonce itself
        // only runs out at 2^64.
        if self.0.seq == u64::MAX {
            return Err(refused(
                alert::UNEXPECTED_MESSAGE,
                "sequence number exhausted",
            ));
        }
        let at = plain.len();
        plain.extend_from_slice(body);
        let nonce = self.0.nonce();
        let n = match self
            .0
            .key
            .open_in_place(nonce, Aad::from(hdr), &mut plain[at..])
        {
            Ok(p) => p.len(),
            Err(_) => {
                plain.truncate(at);
                return Err(refused(
                    alert::BAD_RECORD_MAC,
                    "record does not authenticate",
                ));
            }
        };
        self.0.seq += 1;
        // TLSInnerPlaintext: content, the type, then zero padding; all of
        // it within 2^14 + 1 bytes (§5.4).
        if n > MAX_PLAIN + 1 {
            plain.truncate(at);
            return Err(refused(alert::RECORD_OVERFLOW, "plaintext too long"));
        }
        let Some(t) = plain[at..at + n].iter().rposition(|&b| b != 0) else {
            plain.truncate(at);
            return Err(refused(alert::UNEXPECTED_MESSAGE, "record without a type"));
        };
        let typ = plain[at + t];
        if typ == APPLICATION_DATA {
            plain.truncate(at + t);
            if t > 0 {
                self.1 = 0;
            }
            return Ok(Opened::Data);
        }
        // Control messages are a few bytes: the first five tell them.
        let mut msg = [0u8; 5];
        let len = t.min(msg.len());
        msg[..len].copy_from_slice(&plain[at..at + len]);
        plain.truncate(at);
        match typ {
            ALERT => match (t, msg[0], msg[1]) {
                (2, 1 | 2, alert::CLOSE_NOTIFY) => Ok(Opened::Closed),
                (2, 1 | 2, alert::USER_CANCELED) => Ok(Opened::Nothing),
                (2, 1 | 2, _) => Err(Refused {
                    alert: None,
                    what: "the peer sent an alert",
                }),
                (2, _, _) => Err(refused(alert::ILLEGAL_PARAMETER, "alert level")),
                _ => Err(refused(alert::DECODE_ERROR, "alert length")),
            },
            HANDSHAKE if t >= 4 && msg[0] == KEY_UPDATE => {
                if msg[1..4] != [0, 0, 1] || t != 5 {
                    return Err(refused(alert::DECODE_ERROR, "KeyUpdate length"));
                }
                if msg[4] > 1 {
                    return Err(refused(alert::ILLEGAL_PARAMETER, "KeyUpdate request"));
                }
                self.1 += 1;
                if self.1 > KEY_UPDATES_IN_A_ROW {
                    return Err(refused(
                        alert::UNEXPECTED_MESSAGE,
                        "too many KeyUpdates in a row",
                    ));
                }
                self.0.update();
                Ok(Opened::KeyUpdated {
                    requested: msg[4] == 1,
                })
            }
            // A KeyUpdate split over records (§5.1 allows it; nobody does)
            // lands here too.
            HANDSHAKE => Err(refused(
                alert::UNEXPECTED_MESSAGE,
                "a handshake message after the handshake",
            )),
            _ => Err(refused(alert::UNEXPECTED_MESSAGE, "record type")),
        }
    }
}

/// Seals our records.
pub struct Sealer(Keys);

impl Sealer {
    pub fn new(seq: u64, keys: ConnectionTrafficSecrets, secret: Vec<u8>) -> Result<Self, String> {
        Keys::new(seq, keys, secret).map(Sealer)
    }

    /// Seals `data` as application-data records appended to `out`: copied
    /// once and encrypted in place. Past [`TX_UPDATE_AT`] records, a
    /// KeyUpdate goes first and the next key seals the rest.
    pub fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for piece in data.chunks(MAX_PLAIN) {
            if self.0.seq >= TX_UPDATE_AT {
                self.record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out);
                self.0.update();
            }
            self.record(APPLICATION_DATA, piece, out);
        }
    }

    /// A warning alert `desc` (close_notify, or what a refused record
    /// owes the peer).
    pub fn alert(&mut self, desc: u8, out: &mut Vec<u8>) {
        let level = if desc == alert::CLOSE_NOTIFY { 1 } else { 2 };
        self.record(ALERT, &[level, desc], out);
    }

    /// Our answer to a KeyUpdate that asked for one: announced under the
    /// old key, then the new key seals what follows.
    pub fn key_update(&mut self, out: &mut Vec<u8>) {
        self.record(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out);
        self.0.update();
    }

    /// One record of inner type `typ` (whatever it is) around `content`,
    /// for tests and fuzzing: padding is content's own trailing zeros.
    #[doc(hidden)]
    pub fn seal_raw(&mut self, typ: u8, content: &[u8], out: &mut Vec<u8>) {
        self.record(typ, content, out);
    }

    fn record(&mut self, typ: u8, content: &[u8], out: &mut Vec<u8>) {
        let len = (content.len() + 1 + TAG) as u16;
        let [hi, lo] = len.to_be_bytes();
        let hdr = [APPLICATION_DATA, 3, 3, hi, lo];
        out.reserve(content.len() + OVERHEAD);
        out.extend_from_slice(&hdr);
        let at = out.len();
        out.extend_from_slice(content);
        out.push(typ);
        let nonce = self.0.nonce();
        // Sealing fails only for inputs beyond the AEAD's limit (GiBs).
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(hdr), &mut out[at..])
            .expect("a record within the AEAD's limit");
        out.extend_from_slice(tag.as_ref());
        self.0.seq += 1;
    }
}

/// A sealer and an opener with the keys of `secret` (ChaCha20-Poly1305,
/// sequence 0), for tests and fuzzing.
#[doc(hidden)]
pub fn pair_from_secret(secret: [u8; 32]) -> (Sealer, Opener) {
    let keys = || Keys::derive(&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256, secret.to_vec());
    // 32 bytes is the suite's length: derive cannot fail.
    (
        Sealer(keys().expect("a SHA-256 secret")),
        Opener(keys().expect("a SHA-256 secret"), 0),
    )
}

/// Catches the TLS 1.3 application traffic secrets rustls logs while it
/// processes a client's handshake ([`rustls::KeyLog`]), for KeyUpdate.
/// The shard's thread runs one session's rustls call at a time, and what
/// was logged is taken right after each call: a thread-local slot is
/// enough, and nothing is ever written anywhere.
pub mod capture {
    use super::*;

    /// (client's, server's) traffic secret 0.
    #[derive(Default)]
    pub struct Secrets {
        pub client: Option<Vec<u8>>,
        pub server: Option<Vec<u8>>,
    }

    thread_local! {
        static CAUGHT: RefCell<Secrets> = RefCell::default();
    }

    const CLIENT: &str = "CLIENT_TRAFFIC_SECRET_0";
    const SERVER: &str = "SERVER_TRAFFIC_SECRET_0";

    #[derive(Debug)]
    pub struct Capture;

    impl rustls::KeyLog for Capture {
        fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
            CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                match label {
                    CLIENT => c.client = Some(secret.to_vec()),
                    SERVER => c.server = Some(secret.to_vec()),
                    _ => {}
                }
            });
        }

        fn will_log(&self, label: &str) -> bool {
            label == CLIENT || label == SERVER
        }
    }

    pub fn key_log() -> Arc<dyn rustls::KeyLog> {
        Arc::new(Capture)
    }

    /// What was logged on this thread since the last take.
    pub fn take() -> Secrets {
        CAUGHT.with(|c| std::mem::take(&mut *c.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8448 §3 (simple 1-RTT handshake): the server's application
    /// traffic secret and the key and IV derived from it.
    #[test]
    fn keys_derive_as_in_rfc_8448() {
        let secret = hex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643");
        let k = Keys::derive(&aead::AES_128_GCM, hkdf::HKDF_SHA256, secret.clone()).unwrap();
        assert_eq!(k.iv.to_vec(), hex("cf782b88dd83549aadf1e984"));
        let mut key = [0; 16];
        expand_label(hkdf::HKDF_SHA256, &secret, b"key", &mut key);
        assert_eq!(key.to_vec(), hex("9f02283b6c9c07efc26bb9f2ac92e356"));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn frame_refuses_what_cannot_follow_a_tls13_handshake() {
        assert_eq!(frame(&[23, 3, 3, 0, 17]), Ok(22));
        assert_eq!(frame(&[23, 3, 3, 0x41, 0x00]), Ok(HEADER + MAX_CIPHER));
        for (h, alert) in [
            ([22, 3, 3, 0, 40], alert::UNEXPECTED_MESSAGE),
            ([21, 3, 3, 0, 2], alert::UNEXPECTED_MESSAGE),
            ([23, 2, 0, 0, 40], alert::DECODE_ERROR),
            ([23, 3, 3, 0x41, 0x01], alert::RECORD_OVERFLOW),
            ([23, 3, 3, 0, 16], alert::DECODE_ERROR),
        ] {
            assert_eq!(frame(&h).unwrap_err().alert, Some(alert), "{h:?}");
        }
    }

    fn pair(seq: u64) -> (Sealer, Opener) {
        let (mut s, mut o) = pair_from_secret([7; 32]);
        s.0.seq = seq;
        o.0.seq = seq;
        (s, o)
    }

    /// The check at the handover: rustls's extracted key must be the one
    /// the logged secret gives.
    #[test]
    fn a_secret_that_does_not_give_the_extracted_key_is_refused() {
        let secret = vec![7u8; 32];
        let k = Keys::derive(&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256, secret.clone()).unwrap();
        let mut key = [0u8; 32];
        expand_label(hkdf::HKDF_SHA256, &secret, b"key", &mut key);
        let keys = |key: [u8; 32]| ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: key.into(),
            iv: k.iv.into(),
        };
        assert!(Opener::new(5, keys(key), secret.clone()).is_ok());
        key[0] ^= 1;
        assert!(Opener::new(5, keys(key), secret).is_err());
    }

    fn open_all(o: &mut Opener, mut wire: &[u8]) -> (Vec<u8>, Vec<Opened>) {
        let mut plain = Vec::new();
        let mut what = Vec::new();
        while !wire.is_empty() {
            let n = frame(wire[..HEADER].try_into().unwrap()).unwrap();
            what.push(o.open(&wire[..n], &mut plain).unwrap());
            wire = &wire[n..];
        }
        (plain, what)
    }

    #[test]
    fn sealed_records_open_and_a_changed_byte_does_not() {
        let (mut s, mut o) = pair(3);
        let msg: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        s.seal(&msg, &mut wire);
        assert_eq!(wire.len(), msg.len() + 3 * OVERHEAD, "three records");
        let (plain, what) = open_all(&mut o, &wire);
        assert_eq!(plain, msg);
        assert_eq!(what, vec![Opened::Data; 3]);
        let mut wire = Vec::new();
        s.seal(b"x", &mut wire);
        wire[7] ^= 1;
        let mut plain = b"kept".to_vec();
        let e = o.open(&wire, &mut plain).unwrap_err();
        assert_eq!(e.alert, Some(alert::BAD_RECORD_MAC));
        assert_eq!(plain, b"kept", "nothing of a forged record stays");
    }

    /// However the bytes are cut, each record is opened once and whole,
    /// and at most one partial record is held between inputs.
    #[test]
    fn records_are_cut_whole_at_every_split() {
        let (mut s, _) = pair(0);
        let msg: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = Vec::new();
        for piece in msg.chunks(7_000) {
            s.seal(piece, &mut wire);
        }
        for cut in [1, 2, 5, 6, 999, 16_406, 16_500, wire.len()] {
            let (_, mut o) = pair(0);
            let mut rs = Records::default();
            let mut plain = Vec::new();
            for input in wire.chunks(cut) {
                rs.feed(input, |rec| {
                    assert_eq!(o.open(rec, &mut plain)?, Opened::Data);
                    Ok(true)
                })
                .unwrap();
                assert!(rs.held() < HEADER + 7_000 + OVERHEAD, "cut {cut}");
            }
            assert_eq!(plain, msg, "cut {cut}");
            assert_eq!(rs.held(), 0);
        }
        // A header that cannot be, even split, refuses the input.
        let mut rs = Records::default();
        rs.feed(&[23, 3], |_| Ok(true)).unwrap();
        let e = rs.feed(&[3, 0xff, 0xff], |_| Ok(true)).unwrap_err();
        assert_eq!(e.alert, Some(alert::RECORD_OVERFLOW));
    }

    #[test]
    fn key_updates_both_ways_keep_the_stream_readable() {
        let (mut s, mut o) = pair(0);
        let mut wire = Vec::new();
        s.seal(b"before", &mut wire);
        s.key_update(&mut wire);
        s.seal(b"after", &mut wire);
        let (plain, what) = open_all(&mut o, &wire);
        assert_eq!(plain, b"beforeafter");
        assert_eq!(what[1], Opened::KeyUpdated { requested: false });
        // Past the limit the sealer updates by itself.
        s.0.seq = TX_UPDATE_AT;
        o.0.seq = TX_UPDATE_AT;
        let mut wire = Vec::new();
        s.seal(b"late", &mut wire);
        let (plain, what) = open_all(&mut o, &wire);
        assert_eq!(plain, b"late");
        assert_eq!(what[0], Opened::KeyUpdated { requested: false });
    }

    /// An endless run of KeyUpdates is refused; data between them resets
    /// the count.
    #[test]
    fn key_updates_in_a_row_are_capped() {
        let (mut s, mut o) = pair(0);
        let mut wire = Vec::new();
        for _ in 0..KEY_UPDATES_IN_A_ROW {
            s.key_update(&mut wire);
        }
        s.seal(b"x", &mut wire);
        for _ in 0..KEY_UPDATES_IN_A_ROW {
            s.key_update(&mut wire);
        }
        let (plain, _) = open_all(&mut o, &wire);
        assert_eq!(plain, b"x");
        let mut wire = Vec::new();
        s.key_update(&mut wire);
        let e = o.open(&wire, &mut Vec::new()).unwrap_err();
        assert_eq!(e.what, "too many KeyUpdates in a row");
    }

    /// The whole inner plaintext, padding included, is bounded (§5.4).
    #[test]
    fn padding_past_the_record_limit_is_an_overflow() {
        let (mut s, mut o) = pair(0);
        let mut content = vec![1u8; MAX_PLAIN];
        let mut wire = Vec::new();
        s.seal_raw(APPLICATION_DATA, &content, &mut wire);
        assert!(o.open(&wire, &mut Vec::new()).is_ok());
        content.push(APPLICATION_DATA);
        content.push(0);
        let mut wire = Vec::new();
        s.seal_raw(0, &content, &mut wire);
        let e = o.open(&wire, &mut Vec::new()).unwrap_err();
        assert_eq!(e.alert, Some(alert::RECORD_OVERFLOW));
    }

    #[test]
    fn alerts_and_stray_handshake_messages() {
        let (mut s, mut o) = pair(0);
        let mut wire = Vec::new();
        s.alert(alert::CLOSE_NOTIFY, &mut wire);
        assert_eq!(open_all(&mut o, &wire).1, vec![Opened::Closed]);
        let mut wire = Vec::new();
        s.alert(alert::DECODE_ERROR, &mut wire);
        assert_eq!(o.open(&wire, &mut Vec::new()).unwrap_err().alert, None);
        let mut wire = Vec::new();
        s.record(HANDSHAKE, &[4, 0, 0, 0], &mut wire);
        assert_eq!(
            o.open(&wire, &mut Vec::new()).unwrap_err().alert,
            Some(alert::UNEXPECTED_MESSAGE)
        );
        // user_canceled is a closure alert; a bad level or length is not
        // an alert at all.
        for (content, want) in [
            (&[1, alert::USER_CANCELED][..], Ok(Opened::Nothing)),
            (&[3, 0][..], Err(Some(alert::ILLEGAL_PARAMETER))),
            (&[1, 0, 0][..], Err(Some(alert::DECODE_ERROR))),
            (
                &[KEY_UPDATE, 0, 0, 1, 2][..],
                Err(Some(alert::ILLEGAL_PARAMETER)),
            ),
            (
                &[KEY_UPDATE, 0, 0, 2, 0, 0][..],
                Err(Some(alert::DECODE_ERROR)),
            ),
        ] {
            let typ = if content[0] == KEY_UPDATE {
                HANDSHAKE
            } else {
                ALERT
            };
            let mut wire = Vec::new();
            s.record(typ, content, &mut wire);
            assert_eq!(
                o.open(&wire, &mut Vec::new()).map_err(|e| e.alert),
                want,
                "{content:?}"
            );
        }
        // Padding only, no type.
        let mut wire = Vec::new();
        s.record(0, &[0, 0], &mut wire);
        assert_eq!(
            o.open(&wire, &mut Vec::new()).unwrap_err().what,
            "record without a type"
        );
    }
}
