//! Join tokens and the enrolment proof bound to the TLS session.
//!
//! A token `ragd1-<ca fingerprint>-<secret>` (both parts 32 bytes in lowercase base32 without
//! padding, 52 characters each) tells a worker which CA to trust (the fingerprint) and lets it
//! prove it was given the token (the secret), without ever sending the secret: the worker sends
//! `HMAC-SHA256(secret, transcript)` where the transcript holds keying material exported from
//! this very TLS session, so a proof cannot be replayed on another connection.

use super::error::{IdentityError, Result};
use super::Fingerprint;
use data_encoding::Encoding;
use ring::rand::SecureRandom;
use std::fmt;
use std::str::FromStr;
use std::sync::LazyLock;
use zeroize::Zeroize;

/// Label for `quinn::Connection::export_keying_material` when computing an enrolment proof
/// (with an empty context: `conn.export_keying_material(&mut [0; EKM_LEN], EKM_LABEL, b"")`).
pub const EKM_LABEL: &[u8] = b"EXPORTER-ragd-enrolment-v1";

/// Length of the exported keying material used in an enrolment proof.
pub const EKM_LEN: usize = 32;

/// Prefix (and format version) of join tokens.
const TOKEN_PREFIX: &str = "ragd1";
/// Base32 length of 32 bytes without padding.
const PART_LEN: usize = 52;
/// Domain separation for the proof MAC.
const PROOF_DOMAIN: &[u8] = b"ragd enrolment proof v1";

/// Lowercase RFC 4648 base32 without padding.
static BASE32_LOWER: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.encoding()
        .expect("a fixed, valid base32 specification")
});

/// The secret half of a join token: 32 random bytes, wiped on drop, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinSecret(pub [u8; 32]);

impl JoinSecret {
    /// A new random secret from the system's CSPRNG.
    pub fn generate() -> Result<Self> {
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| IdentityError::Random {
                what: "a join secret",
            })?;
        Ok(Self(bytes))
    }
}

impl Drop for JoinSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinSecret(<redacted>)")
    }
}

/// What a worker needs to enrol: the cluster CA's fingerprint and the join secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the cluster CA certificate; the worker trusts only a coordinator under it.
    pub ca_fingerprint: Fingerprint,
    /// The shared secret proving the worker was given the token.
    pub secret: JoinSecret,
}

impl JoinToken {
    /// A new token for the cluster whose CA has fingerprint `ca_fingerprint`, with a fresh secret.
    pub fn generate(ca_fingerprint: Fingerprint) -> Result<Self> {
        Ok(Self {
            ca_fingerprint,
            secret: JoinSecret::generate()?,
        })
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("secret", &self.secret)
            .finish()
    }
}

/// The copy-pasteable form `ragd1-<fingerprint>-<secret>`. It contains the secret: print it
/// only for the operator, never into logs.
impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}-{}-{}",
            BASE32_LOWER.encode(&self.ca_fingerprint.0),
            BASE32_LOWER.encode(&self.secret.0)
        )
    }
}

impl FromStr for JoinToken {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |problem: String| IdentityError::BadJoinToken { problem };
        let text = s.trim().to_ascii_lowercase();
        let parts: Vec<&str> = text.split('-').collect();
        if parts.first() != Some(&TOKEN_PREFIX) {
            return Err(bad(format!(
                "it does not start with \"{TOKEN_PREFIX}-\" (a token from a newer ragd, or not a token at all)"
            )));
        }
        if parts.len() != 3 {
            return Err(bad(format!(
                "it has {} parts separated by '-', expected 3 (prefix, CA fingerprint, secret)",
                parts.len()
            )));
        }
        let fingerprint = decode_part(parts[1], "CA fingerprint")?;
        let secret = decode_part(parts[2], "secret")?;
        Ok(Self {
            ca_fingerprint: Fingerprint(fingerprint),
            secret: JoinSecret(secret),
        })
    }
}

fn decode_part(part: &str, name: &str) -> Result<[u8; 32]> {
    let bad = |problem: String| IdentityError::BadJoinToken { problem };
    if part.len() != PART_LEN {
        return Err(bad(format!(
            "its {name} part has {} characters, expected {PART_LEN} (was the token cut off while copying?)",
            part.chars().count()
        )));
    }
    if let Some((pos, c)) = part
        .char_indices()
        .find(|(_, c)| !matches!(c, 'a'..='z' | '2'..='7'))
    {
        return Err(bad(format!(
            "its {name} part has {c:?} at position {}; tokens use only a-z and 2-7",
            pos + 1
        )));
    }
    let bytes = BASE32_LOWER.decode(part.as_bytes()).map_err(|_| {
        bad(format!(
            "its {name} part does not decode (the last character is wrong; check for a typo)"
        ))
    })?;
    bytes
        .try_into()
        .map_err(|_| bad(format!("its {name} part does not decode to 32 bytes")))
}

/// The MAC a worker sends to prove it holds the join secret, bound to this TLS session
/// (`exported_keying_material` from [`EKM_LABEL`]/[`EKM_LEN`]), its worker id and its CSR.
pub fn enrolment_proof(
    secret: &JoinSecret,
    exported_keying_material: &[u8],
    worker_id: &str,
    csr_pem: &str,
) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret.0);
    let transcript = transcript(exported_keying_material, worker_id, csr_pem);
    let tag = ring::hmac::sign(&key, &transcript);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Checks an enrolment proof in constant time.
pub fn verify_enrolment_proof(
    secret: &JoinSecret,
    exported_keying_material: &[u8],
    worker_id: &str,
    csr_pem: &str,
    proof: &[u8],
) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret.0);
    let transcript = transcript(exported_keying_material, worker_id, csr_pem);
    ring::hmac::verify(&key, &transcript, proof).is_ok()
}

/// Domain-separated, length-prefixed (u64 big-endian) concatenation of the proof's inputs.
fn transcript(ekm: &[u8], worker_id: &str, csr_pem: &str) -> Vec<u8> {
    let fields: [&[u8]; 4] = [PROOF_DOMAIN, ekm, worker_id.as_bytes(), csr_pem.as_bytes()];
    let mut out = Vec::with_capacity(fields.iter().map(|f| f.len() + 8).sum());
    for field in fields {
        out.extend_from_slice(&(field.len() as u64).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> JoinToken {
        JoinToken::generate(Fingerprint::of_der(b"ca")).unwrap()
    }

    #[test]
    fn token_round_trip() {
        let t = token();
        let text = t.to_string();
        assert!(text.starts_with("ragd1-"));
        assert_eq!(text.len(), 6 + 52 + 1 + 52);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        assert_eq!(text.parse::<JoinToken>().unwrap(), t);
        assert_eq!(
            format!("  {}\n", text.to_uppercase())
                .parse::<JoinToken>()
                .unwrap(),
            t
        );
    }

    #[test]
    fn secrets_are_random_and_redacted() {
        let (a, b) = (
            JoinSecret::generate().unwrap(),
            JoinSecret::generate().unwrap(),
        );
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "JoinSecret(<redacted>)");
        let t = token();
        assert!(!format!("{t:?}").contains(&BASE32_LOWER.encode(&t.secret.0)));
    }

    #[test]
    fn token_parse_errors_say_what_is_wrong() {
        let good = token().to_string();
        let expect = |input: String, needle: &str| {
            let err = input.parse::<JoinToken>().unwrap_err();
            assert!(matches!(err, IdentityError::BadJoinToken { .. }));
            assert!(err.to_string().contains(needle), "{input}: {err}");
        };
        expect(good.replacen("ragd1", "ragd2", 1), "does not start with");
        expect(good[..good.len() - 3].to_string(), "expected 52");
        expect(format!("{good}-extra"), "4 parts");
        let mut chars: Vec<char> = good.chars().collect();
        chars[10] = '1';
        expect(chars.iter().collect(), "'1' at position 5");
        expect(String::new(), "does not start with");
    }

    #[test]
    fn proof_verifies_and_binds_every_input() {
        let secret = JoinSecret::generate().unwrap();
        let ekm = [7u8; EKM_LEN];
        let proof = enrolment_proof(&secret, &ekm, "w1", "CSR");
        assert!(verify_enrolment_proof(&secret, &ekm, "w1", "CSR", &proof));

        let other = JoinSecret::generate().unwrap();
        assert!(!verify_enrolment_proof(&other, &ekm, "w1", "CSR", &proof));
        assert!(!verify_enrolment_proof(
            &secret,
            &[8u8; EKM_LEN],
            "w1",
            "CSR",
            &proof
        ));
        assert!(!verify_enrolment_proof(&secret, &ekm, "w2", "CSR", &proof));
        assert!(!verify_enrolment_proof(&secret, &ekm, "w1", "CSR2", &proof));
        assert!(!verify_enrolment_proof(
            &secret,
            &ekm,
            "w1",
            "CSR",
            &proof[..31]
        ));
        // Length prefixes keep field boundaries: moving a byte between fields changes the MAC.
        assert_ne!(
            enrolment_proof(&secret, &ekm, "w1", "xCSR"),
            enrolment_proof(&secret, &ekm, "w1x", "CSR")
        );
    }
}
