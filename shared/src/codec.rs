//! The one place that turns protocol messages into bytes and back (bincode 2 over serde).
//!
//! A message travels as a *frame*: a [`LEN_PREFIX_BYTES`]-byte big-endian length, then that many
//! bytes of bincode body. Every length is checked against [`MAX_FRAME_LEN`] before anything is
//! allocated or read, so a hostile or confused peer cannot make a node allocate gigabytes, and no
//! function here panics on any input (checked by property tests and a fuzz target in
//! `shared/fuzz`).
//!
//! The encoding is positional: append enum variants and struct fields at the end only. Swapping
//! the format later means changing this module only.

use bincode::config::{self, Configuration, Limit, LittleEndian, Varint};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::any::type_name;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame body accepted or produced, in bytes (16 MiB). Bulk data goes through
/// `transfer` instead.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Size of the big-endian `u32` length prefix in front of every frame body.
pub const LEN_PREFIX_BYTES: usize = 4;

/// The bincode configuration of the wire format: varint integers, and a decode limit so a length
/// inside a body cannot claim more than a frame can hold.
type WireConfig = Configuration<LittleEndian, Varint, Limit<MAX_FRAME_LEN>>;

/// Start read buffers at most this large; they grow only as bytes actually arrive.
const INITIAL_READ_CAPACITY: usize = 64 * 1024;

fn wire_config() -> WireConfig {
    config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Why a message could not be encoded, framed, read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame length above [`MAX_FRAME_LEN`], announced by a peer or produced locally.
    #[error(
        "frame of {} exceeds the {} limit: if a peer sent it, the peer is not a ragd node or \
         speaks another protocol (check the address and port); if this node built it, send the \
         data as a bulk transfer instead of a message",
        human_bytes(*.len), human_bytes(*.max as u64)
    )]
    FrameTooLarge {
        /// The length announced or produced, in bytes.
        len: u64,
        /// The limit, in bytes.
        max: usize,
    },
    /// A buffer ends before the frame it starts is complete.
    #[error(
        "frame truncated: {needed} bytes needed, only {available} available; the peer closed \
         the stream mid-message or the buffer was cut"
    )]
    Truncated {
        /// Bytes the whole frame needs (prefix included).
        needed: usize,
        /// Bytes that were there.
        available: usize,
    },
    /// bincode could not encode a message (a type that serde cannot express in bincode).
    #[error("could not encode a {what}: {source}; this is a bug in ragd, please report it")]
    Encode {
        /// The Rust type being encoded.
        what: &'static str,
        /// bincode's error.
        #[source]
        source: bincode::error::EncodeError,
    },
    /// A frame body is not a valid encoding of the expected message.
    #[error(
        "received bytes that are not a valid {what}: {source}; the peer runs an incompatible \
         ragd version or is not a ragd node"
    )]
    Decode {
        /// The Rust type expected.
        what: &'static str,
        /// bincode's error.
        #[source]
        source: bincode::error::DecodeError,
    },
    /// A frame body holds a valid message followed by bytes that belong to nothing.
    #[error(
        "a {what} was followed by {extra} unexpected bytes in its frame; the peer runs an \
         incompatible ragd version"
    )]
    TrailingBytes {
        /// The Rust type decoded.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// Reading or writing the underlying stream failed.
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a length prefix.
    #[error(
        "the stream ended inside a frame length prefix; the peer closed the connection \
         mid-message"
    )]
    UnexpectedEof,
}

/// Encodes a message body (no length prefix). Fails if the body exceeds [`MAX_FRAME_LEN`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let body =
        bincode::serde::encode_to_vec(msg, wire_config()).map_err(|source| CodecError::Encode {
            what: type_name::<T>(),
            source,
        })?;
    check_len(body.len() as u64)?;
    Ok(body)
}

/// Decodes a message body (no length prefix); every byte must belong to the message.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    check_len(body.len() as u64)?;
    let (msg, used) =
        bincode::serde::decode_from_slice::<T, _>(body, wire_config()).map_err(|source| {
            CodecError::Decode {
                what: type_name::<T>(),
                source,
            }
        })?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes {
            what: type_name::<T>(),
            extra: body.len() - used,
        });
    }
    Ok(msg)
}

/// Encodes a message as a whole frame: big-endian `u32` length, then the body.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let mut frame = vec![0u8; LEN_PREFIX_BYTES];
    bincode::serde::encode_into_std_write(msg, &mut frame, wire_config()).map_err(|source| {
        CodecError::Encode {
            what: type_name::<T>(),
            source,
        }
    })?;
    let body_len = frame.len() - LEN_PREFIX_BYTES;
    let prefix = check_len(body_len as u64)?;
    frame[..LEN_PREFIX_BYTES].copy_from_slice(&prefix);
    Ok(frame)
}

/// Decodes the frame at the start of `buf`; returns the message and how many bytes it used.
///
/// Never panics: a short buffer gives [`CodecError::Truncated`], a length above
/// [`MAX_FRAME_LEN`] gives [`CodecError::FrameTooLarge`] (checked before the body is looked at).
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), CodecError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX_BYTES>() else {
        return Err(CodecError::Truncated {
            needed: LEN_PREFIX_BYTES,
            available: buf.len(),
        });
    };
    let body_len = body_len_from_prefix(*prefix, MAX_FRAME_LEN)?;
    let needed = LEN_PREFIX_BYTES + body_len;
    let Some(body) = buf.get(LEN_PREFIX_BYTES..needed) else {
        return Err(CodecError::Truncated {
            needed,
            available: buf.len(),
        });
    };
    Ok((decode(body)?, needed))
}

/// Writes one frame and flushes the writer.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), CodecError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the stream ends cleanly before a new frame starts.
///
/// The announced length is checked against [`MAX_FRAME_LEN`] before any body byte is read, and
/// the body buffer grows only as bytes arrive. The stream ending mid-frame is an error:
/// [`CodecError::UnexpectedEof`] inside the prefix, [`CodecError::Truncated`] inside the body.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, CodecError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(r, MAX_FRAME_LEN).await
}

/// [`read_frame`] with a tighter limit: a body announced above `max_len` bytes (or above
/// [`MAX_FRAME_LEN`]) is refused before any of it is read. For peers that have not
/// authenticated, whose messages are small.
pub async fn read_frame_within<R, T>(r: &mut R, max_len: usize) -> Result<Option<T>, CodecError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; LEN_PREFIX_BYTES];
    let mut filled = 0;
    while filled < LEN_PREFIX_BYTES {
        let n = r.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(CodecError::UnexpectedEof)
            };
        }
        filled += n;
    }
    let body_len = body_len_from_prefix(prefix, max_len)?;
    let mut body = Vec::with_capacity(body_len.min(INITIAL_READ_CAPACITY));
    (&mut *r)
        .take(body_len as u64)
        .read_to_end(&mut body)
        .await?;
    if body.len() < body_len {
        return Err(CodecError::Truncated {
            needed: LEN_PREFIX_BYTES + body_len,
            available: LEN_PREFIX_BYTES + body.len(),
        });
    }
    decode(&body).map(Some)
}

/// The body length a prefix announces, refused if above `max_len` or [`MAX_FRAME_LEN`].
fn body_len_from_prefix(
    prefix: [u8; LEN_PREFIX_BYTES],
    max_len: usize,
) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(prefix);
    check_len(u64::from(len))?;
    if len as usize > max_len {
        return Err(CodecError::FrameTooLarge {
            len: u64::from(len),
            max: max_len,
        });
    }
    // check_len bounds it by MAX_FRAME_LEN, which fits every usize this code builds for.
    Ok(len as usize)
}

/// Refuses lengths above [`MAX_FRAME_LEN`]; returns the big-endian prefix for an accepted one.
fn check_len(len: u64) -> Result<[u8; LEN_PREFIX_BYTES], CodecError> {
    match u32::try_from(len) {
        Ok(small) if len <= MAX_FRAME_LEN as u64 => Ok(small.to_be_bytes()),
        _ => Err(CodecError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        }),
    }
}

/// A byte count for people: "16 MiB", "3.0 GiB", "512 B".
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::handshake::{Hello, Role};

    fn hello() -> Hello {
        Hello::new(Role::Worker, "worker-1")
    }

    #[test]
    fn frame_is_prefix_plus_body() {
        let body = encode(&hello()).unwrap();
        let frame = encode_frame(&hello()).unwrap();
        assert_eq!(frame.len(), LEN_PREFIX_BYTES + body.len());
        assert_eq!(&frame[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&frame[4..], &body[..]);
        let (back, used) = decode_frame::<Hello>(&frame).unwrap();
        assert_eq!(back, hello());
        assert_eq!(used, frame.len());
    }

    #[test]
    fn trailing_bytes_in_a_body_are_refused() {
        let mut body = encode(&hello()).unwrap();
        body.push(0);
        match decode::<Hello>(&body) {
            Err(CodecError::TrailingBytes { what, extra: 1 }) => assert!(what.ends_with("Hello")),
            other => panic!("expected TrailingBytes, got {other:?}"),
        }
    }

    #[test]
    fn a_huge_length_prefix_is_refused_with_advice() {
        let mut frame = 3_000_000_000u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        let err = decode_frame::<Hello>(&frame).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::FrameTooLarge {
                    len: 3_000_000_000,
                    max: MAX_FRAME_LEN
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("2.8 GiB") && text.contains("16 MiB"),
            "{text}"
        );
        assert!(text.contains("not a ragd node"), "{text}");
    }

    #[test]
    fn an_oversized_message_is_not_encoded() {
        let big = vec![7u8; MAX_FRAME_LEN];
        assert!(matches!(
            encode(&big),
            Err(CodecError::FrameTooLarge {
                max: MAX_FRAME_LEN,
                ..
            })
        ));
        assert!(matches!(
            encode_frame(&big),
            Err(CodecError::FrameTooLarge {
                max: MAX_FRAME_LEN,
                ..
            })
        ));
    }

    #[test]
    fn a_body_of_the_wrong_type_is_a_decode_error() {
        let err = decode::<Hello>(&[0xff; 8]).unwrap_err();
        assert!(matches!(err, CodecError::Decode { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn stream_round_trip_and_clean_eof() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for _ in 0..3 {
                write_frame(&mut a, &hello()).await.unwrap();
            }
        });
        for _ in 0..3 {
            assert_eq!(read_frame::<_, Hello>(&mut b).await.unwrap(), Some(hello()));
        }
        writer.await.unwrap();
        assert_eq!(read_frame::<_, Hello>(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn eof_mid_frame_is_an_error() {
        let frame = encode_frame(&hello()).unwrap();
        let mut in_prefix = &frame[..2];
        assert!(matches!(
            read_frame::<_, Hello>(&mut in_prefix).await,
            Err(CodecError::UnexpectedEof)
        ));
        let mut in_body = &frame[..frame.len() - 1];
        match read_frame::<_, Hello>(&mut in_body).await {
            Err(CodecError::Truncated { needed, available }) => {
                assert_eq!((needed, available), (frame.len(), frame.len() - 1));
            }
            other => panic!("expected Truncated, got {other:?}"),
        }
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(16 * 1024 * 1024), "16 MiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
