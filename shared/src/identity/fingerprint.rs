//! SHA-256 fingerprints of certificates.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// SHA-256 of a certificate's DER encoding; shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fingerprint {input:?}: expected 64 hexadecimal digits (a SHA-256), as printed by `ragd-coord`")]
pub struct ParseFingerprintError {
    /// The text that was given.
    pub input: String,
}

impl FromStr for Fingerprint {
    type Err = ParseFingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseFingerprintError {
            input: s.to_owned(),
        };
        let lower = s.trim().to_ascii_lowercase();
        let bytes = data_encoding::HEXLOWER
            .decode(lower.as_bytes())
            .map_err(|_| err())?;
        let array: [u8; 32] = bytes.try_into().map_err(|_| err())?;
        Ok(Self(array))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            self.0.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(deserializer).map(Self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_round_trip() {
        let fp = Fingerprint::of_der(b"not really a certificate");
        let text = fp.to_string();
        assert_eq!(text.len(), 64);
        assert!(text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(text.to_uppercase().parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn known_sha256() {
        // SHA-256 of the empty string.
        assert_eq!(
            Fingerprint::of_der(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn bad_input_is_refused() {
        assert!("abc".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
        assert!("ab".repeat(33).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn serde_text_form_is_hex() {
        let fp = Fingerprint::of_der(b"x");
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"{fp}\""));
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
        assert!(serde_json::from_str::<Fingerprint>("\"abcd\"").is_err());
    }

    #[test]
    fn serde_binary_round_trip() {
        let fp = Fingerprint::of_der(b"x");
        let bin = bincode::serde::encode_to_vec(fp, bincode::config::standard()).unwrap();
        assert_eq!(bin.len(), 32);
        let (back, _): (Fingerprint, _) =
            bincode::serde::decode_from_slice(&bin, bincode::config::standard()).unwrap();
        assert_eq!(back, fp);
    }
}
